"""Every row of docs/bad-inputs.md: each bad input fails early with its documented message.

"Early" is tested too: a bad target fails at config load (before any model), bad names and
prompt files before the diffusion pipeline loads, a bad adapter folder before the pipeline.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import yaml

import fairness.generation
import fairness.training.debiaser
import fairness.training.loop
from fairness.adapters import AdapterSpec, attach_adapter, export_adapter, load_adapter_into, read_adapter_manifest
from fairness.adapters.io import AdapterMismatchError
from fairness.cli import main
from fairness.config import ConfigError, load_config
from fairness.data.prompts import CorpusError
from fairness.models.tiny import build_tiny_pipeline
from fairness.targets.assignment import UnreachableTargetWarning
from fairness.targets.distributions import TargetError
from fairness.training.debiaser import Debiaser
from fairness.training.loop import NonFiniteLossError, Trainer
from tests.helpers import PROMPTS, tiny_config

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("world")
    tiny_config(root)  # builds the tiny model and bundle once
    return root


def _never(what: str):
    def fail(*args, **kwargs):
        raise AssertionError(f"{what} was loaded before the bad input was reported")

    return fail


def _job(tmp_path: Path, **data) -> Path:
    base = {"prompts": {"train": [{"prompts": ["a photo of the doctor"]}]}, "target": {"marginals": {"gender": "uniform"}},
            "model": {"path": str(tmp_path / "no-such-model")}}
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump({**base, **data}))
    return path


# -- targets -------------------------------------------------------------------------------
@pytest.mark.parametrize("target, message", [
    ({"marginals": {"gender": {"male": 0.7, "female": 0.7}}}, "target.marginals.gender: probabilities sum to 1.4, not 1"),
    ({"marginals": {"gender": {"male": -0.5, "female": 1.5}}}, "target.marginals.gender: probability of 'male' is negative (-0.5)"),
    ({"marginals": {"gender": {"male": math.nan, "female": 1.0}}}, "target.marginals.gender: probability of 'male' is not finite (nan)"),
    ({"marginals": {"gender": {"male": "half", "female": 0.5}}}, "target.marginals.gender: probability of 'male' must be a number, got 'half'"),
    ({"joint": {"attributes": ["gender", "race"], "probs": {"male,a": 0.5}}}, "target.joint.probs: probabilities sum to 0.5, not 1"),
    ({"marginals": {"gender": "uniformly"}}, "target.marginals.gender: expected 'uniform' or a mapping class -> probability, got 'uniformly'"),
])
def test_a_bad_target_fails_at_config_load_before_any_model(tmp_path, target, message):
    # The model path does not exist: the target's error must come first.
    with pytest.raises(ConfigError) as info:
        load_config(_job(tmp_path, target=target))
    assert message in str(info.value) and "model" not in str(info.value).split("invalid config")[1]


def test_the_cli_reports_a_bad_target_before_a_missing_model(tmp_path, capsys):
    job = _job(tmp_path, target={"marginals": {"gender": {"male": 0.7, "female": 0.7}}})
    assert main(["debias", "--config", str(job), "--run-dir", str(tmp_path / "run"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "probabilities sum to 1.4, not 1" in err and "no diffusers pipeline" not in err


@pytest.mark.parametrize("target, message", [
    ({"marginals": {"sex": "uniform"}}, "unknown attribute 'sex'; the classifier knows ['gender', 'race']"),
    ({"marginals": {"gender": {"man": 1.0}}}, "target.marginals.gender: unknown class(es) ['man']; known classes are ['male', 'female']"),
])
def test_unknown_attributes_and_classes_fail_before_the_pipeline_loads(world, monkeypatch, target, message):
    cfg = tiny_config(world, target=target)
    monkeypatch.setattr(fairness.training.debiaser, "load_pipeline", _never("the diffusion pipeline"))
    with pytest.raises(TargetError) as info:
        Debiaser(cfg)
    assert message in str(info.value)


def test_a_target_class_no_image_can_reach_is_warned_before_the_pipeline_loads(world, monkeypatch):
    """75/25 gender at 4 images per prompt and C = 0.8: 'female' can never get a confident
    target (at most 1 - 0.75^4 = 0.68), so the loss could only push images away from it."""
    cfg = tiny_config(world, target={"marginals": {"gender": {"male": 0.75, "female": 0.25}}})
    monkeypatch.setattr(fairness.training.debiaser, "load_pipeline", _never("the diffusion pipeline"))
    with pytest.warns(UnreachableTargetWarning, match=r"gender='female' \(target share 0.25\) can never get a confident"):
        with pytest.raises(AssertionError, match="the diffusion pipeline"):  # warned first, then the pipeline
            Debiaser(cfg)


# -- prompt files --------------------------------------------------------------------------
@pytest.mark.parametrize("name, text, message", [
    ("empty.txt", "", "empty.txt: the corpus has no rows"),
    ("bad.jsonl", '{"prompt": "a photo of the doctor"}\n{oops\n{"prompt": ""}\n',
     "bad.jsonl: 3 rows, 1 valid, 2 invalid (invalid_json: row 2; empty: row 3)"),
])
def test_a_bad_prompt_file_fails_with_its_rows_before_any_model(world, tmp_path, monkeypatch, name, text, message):
    (tmp_path / name).write_text(text)
    cfg = tiny_config(world, prompts={"train": [{"file": str(tmp_path / name)}]})
    monkeypatch.setattr(fairness.training.loop, "Debiaser", _never("the model"))
    with pytest.raises(CorpusError) as info:
        Trainer(cfg, tmp_path / "run", progress=False)
    assert message in str(info.value)


# -- missing weights -----------------------------------------------------------------------
def test_a_model_folder_without_model_index_fails_before_the_bundle_loads(world, tmp_path, monkeypatch):
    (tmp_path / "sd").mkdir()
    cfg = tiny_config(world, model__path=str(tmp_path / "sd"))
    monkeypatch.setattr(fairness.training.debiaser, "load_perception", _never("the perception bundle"))
    with pytest.raises(FileNotFoundError, match=r"no diffusers pipeline at .*sd \(model_index.json missing\)"):
        Debiaser(cfg)


def test_a_bundle_folder_without_bundle_json_fails_before_the_pipeline_loads(world, tmp_path, monkeypatch):
    (tmp_path / "perception").mkdir()
    cfg = tiny_config(world, perception=str(tmp_path / "perception"))
    monkeypatch.setattr(fairness.training.debiaser, "load_pipeline", _never("the diffusion pipeline"))
    with pytest.raises(FileNotFoundError, match=r"no perception bundle at .*perception \(missing bundle.json\)"):
        Debiaser(cfg)


# -- config files --------------------------------------------------------------------------
@pytest.mark.parametrize("text, message", [
    ("train: [unclosed\n", "not valid YAML"),
    ("- just\n- a list\n", "the top level must be a mapping"),
    (yaml.safe_dump({"prompts": {"train": [{"prompts": ["x"]}]}, "target": {"marginals": {"gender": "uniform"}},
                     "train": {"iterationz": 3}}), "train.iterationz: Extra inputs are not permitted"),
    (yaml.safe_dump({"prompts": {"train": [{"prompts": ["x"]}]}, "target": {"marginals": {"gender": "uniform"}},
                     "train": {"lr": -1}}), "train.lr: Input should be greater than 0"),
])
def test_invalid_yaml_and_unknown_keys_name_the_file_and_field(tmp_path, capsys, text, message):
    (tmp_path / "job.yaml").write_text(text)
    assert main(["debias", "--config", str(tmp_path / "job.yaml"), "--run-dir", str(tmp_path / "run"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert f"{tmp_path / 'job.yaml'}:" in err and message in err


# -- non-finite losses ---------------------------------------------------------------------
def test_non_finite_losses_are_counted_in_a_warning_and_a_streak_stops_the_run(world, tmp_path):
    cfg = tiny_config(world, prompts={"train": [{"prompts": PROMPTS[:2]}]}, dft__steps=2, train__images_per_prompt=2,
                      train__iterations=8, train__checkpoint_every=8, train__max_nonfinite_steps=3)
    trainer = Trainer(cfg, tmp_path / "run", progress=False)
    loss_for, poisoned = trainer.loss_for, {2, 4, 5, 6}

    def nan_at_some_steps(step):
        loss, logs = loss_for(step)
        return (loss * math.nan if step in poisoned else loss), logs

    trainer.loss_for = nan_at_some_steps
    with pytest.warns(RuntimeWarning, match=r"1 of 3 iterations were skipped: non-finite loss or gradients"):
        trainer.fit(stop_after=3)
    streak = (r"loss or gradients were non-finite \(NaN/inf\) for 3 consecutive iterations \(steps 4-6; "
              r"train.max_nonfinite_steps=3\): the run diverged. 4 iteration")
    with pytest.raises(NonFiniteLossError, match=streak):
        trainer.fit(resume=False)
    assert trainer.step == 6 and trainer.skipped == 4


# -- adapters ------------------------------------------------------------------------------
def _bad_adapter(tmp_path: Path, case: str) -> Path:
    folder = tmp_path / "adapter"
    if case == "missing folder":
        return folder
    folder.mkdir()
    if case == "no manifest":
        (folder / "model.safetensors").write_bytes(b"")
    elif case == "not json":
        (folder / "adapter.json").write_text("{kind: text_lora")
    elif case == "unknown kind":
        (folder / "adapter.json").write_text(json.dumps({"kind": "dreambooth"}))
    elif case == "no weights":
        (folder / "adapter.json").write_text(json.dumps({"kind": "text_lora", "prompt_prefix": ""}))
    return folder


BAD_ADAPTERS = {
    "missing folder": "adapter folder not found: {dir}",
    "no manifest": "{dir} is not a fairness adapter (missing adapter.json)",
    "not json": "{dir}/adapter.json: not valid JSON",
    "unknown kind": "{dir}/adapter.json: unknown adapter kind 'dreambooth'; expected one of",
    "no weights": "{dir}: adapter.json says kind 'text_lora' but pytorch_lora_weights.safetensors is missing",
}


@pytest.mark.parametrize("case", list(BAD_ADAPTERS))
def test_a_bad_adapter_folder_is_refused_before_the_pipeline_loads(world, tmp_path, monkeypatch, capsys, case):
    folder = _bad_adapter(tmp_path, case)
    message = BAD_ADAPTERS[case].format(dir=folder)
    with pytest.raises((FileNotFoundError, ValueError)) as info:
        read_adapter_manifest(folder)
    assert message in str(info.value)
    monkeypatch.setattr(fairness.generation, "load_pipeline", _never("the diffusion pipeline"))
    assert main(["generate", "--model", str(world / "sd"), "--adapter", str(folder), "--prompt", "x", "-n", "1",
                 "--out", str(tmp_path / "out")]) == 2
    assert message in capsys.readouterr().err
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a photo of the doctor\n")
    assert main(["audit", "--model", str(world / "sd"), "--adapter", str(folder), "--perception", str(world / "perception"),
                 "--prompts", str(prompts), "--out", str(tmp_path / "audit"), "--quiet"]) == 2
    assert message in capsys.readouterr().err


def test_an_adapter_trained_on_another_base_model_is_refused(tmp_path):
    adapter = attach_adapter(build_tiny_pipeline(seed=0), AdapterSpec(kind="text_lora", rank=2))
    export_adapter(adapter, tmp_path / "adapter")
    base = json.loads((tmp_path / "adapter" / "adapter.json").read_text())["base_model"]
    assert set(base) == {"path", "text_encoder_config", "unet_config"}
    assert load_adapter_into(build_tiny_pipeline(seed=1), tmp_path / "adapter") == ""  # same architecture: fine
    other = build_tiny_pipeline(seed=0, hidden=48)
    with pytest.raises(AdapterMismatchError, match=r"adapter .*adapter was trained on base model None, which differs from "
                                                   r"this pipeline \(None\) in its text encoder and U-Net \(config hash"):
        load_adapter_into(other, tmp_path / "adapter")
    assert not getattr(other.text_encoder, "peft_config", None)  # nothing was loaded into it
    # Adapters exported before the base was recorded still load (there is nothing to compare).
    manifest = json.loads((tmp_path / "adapter" / "adapter.json").read_text())
    del manifest["base_model"]
    (tmp_path / "adapter" / "adapter.json").write_text(json.dumps(manifest))
    assert load_adapter_into(build_tiny_pipeline(seed=1), tmp_path / "adapter") == ""


def test_the_exported_adapter_names_its_base_model(world, tmp_path):
    cfg = tiny_config(world, prompts={"train": [{"prompts": PROMPTS[:1]}]}, dft__steps=2, train__images_per_prompt=2,
                      train__iterations=1, train__checkpoint_every=1)
    Trainer(cfg, tmp_path / "run", progress=False).fit()
    base = json.loads((tmp_path / "run" / "adapter" / "adapter.json").read_text())["base_model"]
    assert base["path"] == cfg.model.path and len(base["unet_config"]) == 16
