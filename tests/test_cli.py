"""End to end through the console command: debias -> export -> generate -> audit."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch
import yaml
from diffusers import StableDiffusionPipeline
from safetensors.torch import load_file, save_file

from fairness.cli import main
from tests.helpers import PROMPTS, tiny_config


def test_help_everywhere():
    for cmd in ([], ["job"], ["debias"], ["audit"], ["generate"], ["export"], ["toyworld", "build"], ["toyworld", "fidelity"],
                ["perception", "init"], ["classifier", "train"]):
        out = subprocess.run([sys.executable, "-m", "fairness.cli", *cmd, "--help"], capture_output=True, text=True)
        assert out.returncode == 0 and "usage: fairness" in out.stdout


def test_perception_init_writes_an_editable_bundle_and_keeps_an_existing_one(tmp_path, capsys):
    out = tmp_path / "sd15"
    assert main(["perception", "init", "--preset", "sd15-paper", "--out", str(out)]) == 0
    spec = json.loads((out / "bundle.json").read_text())
    assert spec["components"]["detector"]["backend"] == "real.mtcnn"
    assert set(spec["components"]["train_classifier"]["config"]["attributes"]) == {"gender", "race", "age"}
    capsys.readouterr()
    assert main(["perception", "init", "--preset", "sd15-paper", "--out", str(out)]) == 2  # never overwritten silently
    assert "exists" in capsys.readouterr().err
    assert main(["perception", "init", "--preset", "sd14-unknown", "--out", str(tmp_path / "x")]) == 2
    assert "sd15-paper" in capsys.readouterr().err  # the error lists the known presets


def test_debias_export_generate_audit(tmp_path, capsys):
    cfg = tiny_config(tmp_path)
    config = tmp_path / "job.yaml"
    config.write_text(cfg.to_yaml())
    run = tmp_path / "run"
    assert main(["debias", "--config", str(config), "--run-dir", str(run), "--quiet", "--set", "train.iterations=3",
                 "--set", "train.checkpoint_every=3"]) == 0
    assert yaml.safe_load((run / "config.yaml").read_text())["train"]["iterations"] == 3
    rows = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert len(rows) == 3 and all(r["loss/total"] == r["loss/total"] for r in rows)

    # The adapter loads into a stock pipeline by plain diffusers calls.
    pipe = StableDiffusionPipeline.from_pretrained(cfg.model.path)
    pipe.load_lora_weights(str(run / "adapter"))
    img = pipe(PROMPTS[0], num_inference_steps=3, output_type="pt", generator=torch.Generator().manual_seed(0)).images
    assert img.shape == (1, 3, 32, 32)

    assert main(["export", "--run-dir", str(run), "--out", str(tmp_path / "exported")]) == 0
    assert (tmp_path / "exported" / "pytorch_lora_weights.safetensors").exists()

    assert main(["generate", "--model", cfg.model.path, "--adapter", str(run / "adapter"), "--prompt", PROMPTS[0],
                 "-n", "2", "--steps", "3", "--out", str(tmp_path / "gen")]) == 0
    assert sorted(p.name for p in (tmp_path / "gen").iterdir()) == ["000.png", "001.png"]

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS[:2]) + "\n")
    out = tmp_path / "audit"
    assert main(["audit", "--model", cfg.model.path, "--adapter", str(run / "adapter"), "--perception", cfg.perception,
                 "--prompts", str(prompts), "--images-per-prompt", "4", "--seed", "0", "--steps", "3",
                 "--out", str(out), "--quiet"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    summary = metrics["summary"]
    for name in ("gender", "race", "gender*race"):
        assert 0 <= summary["bias"][name]["mean"] <= 1
    for metric in ("clip_t", "clip_i", "dino"):
        assert metric in summary["semantics"]
    assert len(metrics["sets"]["audit"]["after"]["prompts"]) == 2
    assert (out / "metrics_audit.csv").read_text().count("\n") == 5  # header + 2 prompts x (original, debiased)
    # `--classifier train` measures with the classifier the loss trained against (the gaming
    # check): force that one to the gender the evaluation classifier saw least, then audit again.
    eval_freq = metrics["sets"]["audit"]["after"]["prompts"][0]["freq"]["gender"]
    forced = min(range(len(eval_freq)), key=eval_freq.__getitem__)
    weights = Path(cfg.perception) / "train_classifier.safetensors"
    state = load_file(str(weights))
    state["heads.gender.weight"].zero_()
    state["heads.gender.bias"] = torch.where(torch.arange(len(eval_freq)) == forced, 50.0, -50.0)
    save_file(state, str(weights))
    assert main(["audit", "--model", cfg.model.path, "--adapter", str(run / "adapter"), "--perception", cfg.perception,
                 "--prompts", str(prompts), "--images-per-prompt", "4", "--seed", "0", "--steps", "3",
                 "--classifier", "train", "--out", str(tmp_path / "audit_train"), "--quiet"]) == 0
    train = json.loads((tmp_path / "audit_train" / "metrics.json").read_text())
    assert train["summary"]["semantics"] == summary["semantics"]  # the same images
    for row in train["sets"]["audit"]["after"]["prompts"]:
        assert row["freq"]["gender"] == [float(i == forced) for i in range(len(eval_freq))]
    assert train["summary"]["agreement"] == {}  # one classifier: nothing to compare
    # The default audit reports how often the training classifier agrees with the evaluation
    # one; the forced classifier always names `forced`, so it agrees exactly where the
    # evaluation classifier sees that class.
    assert main(["audit", "--model", cfg.model.path, "--adapter", str(run / "adapter"), "--perception", cfg.perception,
                 "--prompts", str(prompts), "--images-per-prompt", "4", "--seed", "0", "--steps", "3",
                 "--out", str(tmp_path / "audit_agree"), "--quiet"]) == 0
    agree = json.loads((tmp_path / "audit_agree" / "metrics.json").read_text())
    for row in agree["sets"]["audit"]["after"]["prompts"]:
        assert row["agreement"]["gender"] == row["freq"]["gender"][forced]
    assert "agreement.gender" in (tmp_path / "audit_agree" / "metrics_audit.csv").read_text().splitlines()[0]


def test_bad_inputs_fail_with_clear_messages(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"prompts": {"train": [{"prompts": ["x"]}]}, "target": {"marginals": {"sex": "uniform"}},
                                   "model": {"path": str(tmp_path / "missing")}}))
    assert main(["debias", "--config", str(bad), "--run-dir", str(tmp_path / "r"), "--quiet"]) == 2
    assert "no diffusers pipeline" in capsys.readouterr().err
    assert main(["debias", "--config", str(tmp_path / "nope.yaml")]) == 2
    assert "config file not found" in capsys.readouterr().err
    cfg = tiny_config(tmp_path, target={"marginals": {"sex": "uniform"}})
    good = tmp_path / "good.yaml"
    good.write_text(cfg.to_yaml())
    assert main(["debias", "--config", str(good), "--run-dir", str(tmp_path / "r2"), "--quiet"]) == 2
    assert "unknown attribute 'sex'" in capsys.readouterr().err
