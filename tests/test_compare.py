"""``fairness compare`` end to end on the real toy world: a small config with every method,
the written table, CSV, markdown and HTML page, and the errors a bad config gets."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
import yaml

from fairness.adapters import AdapterSpec, attach_adapter, export_adapter
from fairness.baselines.distribution_guidance import ADPTrainConfig, train_adp
from fairness.cli import main
from fairness.config import ConfigError
from fairness.models.loading import load_perception, load_pipeline
from fairness.toyworld import world

pytestmark = [pytest.mark.timeout(600), pytest.mark.usefixtures("one_torch_thread")]

PROMPTS = ["a photo of an engineer", "a picture of a teacher"]
METHODS = ["original", "fair-diffusion", "distribution-guidance", "ethical-intervention", "ours"]


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> dict[str, Path]:
    """A tiny ADP and a text-LoRA adapter perturbed at random (real files, real loaders)."""
    root = tmp_path_factory.mktemp("compare-assets")
    pipe = load_pipeline("toyworld", device="cpu")
    train_adp(pipe, load_perception("toyworld"), world.prompts("train")[::60][:6], root / "adp",
              ADPTrainConfig(images_per_prompt=4, num_steps=4, epochs=3), attributes=["tone"], progress=False)
    adapter = attach_adapter(pipe, AdapterSpec(kind="text_lora", rank=2))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in adapter.parameters():
            param.add_(torch.randn(param.shape, generator=gen) * 0.1)
    export_adapter(adapter, root / "adapter")
    return {"adp": root / "adp", "adapter": root / "adapter"}


def _config(tmp_path: Path, assets: dict[str, Path], **over) -> Path:
    data = {
        "name": "small", "model": {"path": "toyworld", "device": "cpu"}, "perception": "toyworld",
        "prompts": [{"name": "test", "prompts": PROMPTS}],
        "laws": {"uniform": {"marginals": {"tone": "uniform"}},
                 "light75": {"marginals": {"tone": {"light": 0.75, "dark": 0.25}}}},
        "images_per_prompt": 4, "steps": 4, "grid_prompts": 1, "grid_images": 4,
        "methods": [
            {"method": "original"},
            {"method": "fair-diffusion", "edit_texts": {"tone": ["a photo of a person in light",
                                                                  "a photo of a person in dark"]}},
            {"method": "distribution-guidance", "adp": str(assets["adp"])},
            {"method": "ethical-intervention", "attribute": "tone", "suffix": "in {classes}", "joiner": " "},
            {"method": "ours", "adapters": {"uniform": str(assets["adapter"])}, "training_seconds": {"uniform": 12.5}},
        ],
        **over,
    }
    path = tmp_path / "compare.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_compare_writes_every_method_side_by_side(tmp_path, assets, capsys):
    out = tmp_path / "out"
    assert main(["compare", "--config", str(_config(tmp_path, assets)), "--out", str(out), "--quiet"]) == 0
    printed = capsys.readouterr().out
    data = json.loads((out / "compare.json").read_text())
    runs = {(r["law"], r["method"]) for r in data["runs"]}
    expected = {(law, m) for law in ("uniform", "light75") for m in METHODS} - {("light75", "ours")}
    assert runs == expected
    assert data["skipped"] == [{"method": "ours", "law": "light75", "why": "no adapter for this law"}]
    for r in data["runs"]:
        summary = r["audit"]["summary"]
        assert summary["prompts"] == 2 and summary["images_per_prompt"] == 4
        assert {"tone", "color", "tone*color"} <= set(summary["bias"])
        assert {"clip_i", "clip_t", "dino"} <= set(summary["semantics"])
        assert r["seconds_per_image"] > 0 and set(r["target_gap"]) == {"tone"}
    costs = {(r["law"], r["method"]): r["training_seconds"] for r in data["runs"]}
    assert costs[("uniform", "ours")] == 12.5 and costs[("uniform", "distribution-guidance")] > 0
    assert costs[("uniform", "fair-diffusion")] == 0
    original = next(r for r in data["runs"] if r["method"] == "original")
    assert original["audit"]["summary"]["semantics"]["clip_i"]["mean"] == pytest.approx(1.0, abs=1e-5)
    # The same noise for every method: law-independent methods are one audit listed under each law.
    by = {(r["law"], r["method"]): r["audit"]["prompts"] for r in data["runs"]}
    assert by[("uniform", "ethical-intervention")] == by[("light75", "ethical-intervention")]
    with (out / "compare_test.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(expected) and {"bias tone", "gap tone", "clip_i", "s/image", "training s"} <= set(rows[0])
    assert (out / "compare_test.md").read_text().startswith("| law | method | bias tone")
    page = (out / "compare.html").read_text()
    assert page.count("data-name=\"grid_test_") == 2 and "data-name=\"freq_test_uniform_fair-diffusion_tone\"" in page
    assert "ours under light75: no adapter for this law" in page
    assert "gap tone" in printed and "distribution-guidance" in printed


@pytest.mark.parametrize(("method", "match"), [
    ({"method": "sega"}, "unknown method 'sega'"),
    ({"method": "distribution-guidance", "adp": "/nonexistent/adp"}, "no attribute distribution predictor"),
    ({"method": "fair-diffusion", "edit_texts": {"tone": ["light"]}}, "1 texts for the 2 classes"),
])
def test_bad_configs_fail_before_any_image(tmp_path, assets, capsys, method, match):
    path = _config(tmp_path, assets, methods=[{"method": "original"}, method])
    assert main(["compare", "--config", str(path), "--out", str(tmp_path / "out"), "--quiet"]) == 2
    assert match in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_a_method_twice_needs_labels_and_the_original_is_required(tmp_path, assets, capsys):
    fd = {"method": "fair-diffusion", "edit_texts": {"tone": ["light", "dark"]}}
    path = _config(tmp_path, assets, methods=[{"method": "original"}, fd, fd])
    assert main(["compare", "--config", str(path), "--quiet"]) == 2
    assert "methods named more than once: ['fair-diffusion']" in capsys.readouterr().err
    path = _config(tmp_path, assets, methods=[fd, {**fd, "label": "fd-strong", "edit_guidance_scale": 8}])
    assert main(["compare", "--config", str(path), "--quiet"]) == 2
    assert "needs the 'original' method" in capsys.readouterr().err


def test_shipped_example_config_is_valid():
    from fairness.baselines.compare import load_compare_config

    path = Path(__file__).parents[1] / "pipelines/configs/toyworld/compare.yaml"
    cfg = load_compare_config(path)
    assert {s.method for s in cfg.specs()} == set(METHODS) and set(cfg.laws) == {"uniform", "light75"}
    # The second seed's table is the same file with overrides (docs/baselines.md).
    dg = next(i for i, m in enumerate(cfg.methods) if m["method"] == "distribution-guidance")
    other = load_compare_config(path, {"seed": 1, f"methods.{dg}.adp": "runs/adp-tone-s1"})
    assert other.seed == 1 and other.methods[dg]["adp"] == "runs/adp-tone-s1"
    assert [m for i, m in enumerate(other.methods) if i != dg] == [m for i, m in enumerate(cfg.methods) if i != dg]
    with pytest.raises(ConfigError, match=r"methods\.9\.adp: '9' is not an index of a list of 5"):
        load_compare_config(path, {"methods.9.adp": "x"})


def test_ours_training_cost_is_read_from_its_run_directory(tmp_path):
    from fairness.baselines.methods import training_seconds_of

    (tmp_path / "run" / "adapter").mkdir(parents=True)
    (tmp_path / "run" / "log.jsonl").write_text('{"step": 1, "seconds": 2.5}\n{"step": 2, "seconds": 4.0}\n')
    assert training_seconds_of(str(tmp_path / "run" / "adapter")) == 6.5
    assert training_seconds_of(str(tmp_path / "elsewhere" / "adapter")) is None
    assert not (tmp_path / "elsewhere").exists()


def test_seeds_table_averages_two_seeds_and_refuses_mismatched_runs(tmp_path, assets):
    from fairness.report.compare_seeds import SeedsMismatch, seeds_table
    from fairness.report.html import format_cell

    light = [{"method": "original"},
             {"method": "ethical-intervention", "attribute": "tone", "suffix": "in {classes}", "joiner": " "}]
    folders = []
    for seed in (0, 1):
        (tmp_path / f"s{seed}").mkdir()
        cfg = _config(tmp_path / f"s{seed}", assets, seed=seed, methods=light, grid_prompts=0)
        assert main(["compare", "--config", str(cfg), "--out", str(tmp_path / f"out{seed}"), "--quiet"]) == 0
        folders.append(tmp_path / f"out{seed}")
    per_seed = [next(r for r in json.loads((f / "compare.json").read_text())["runs"]
                     if r["method"] == "original" and r["law"] == "uniform") for f in folders]
    biases = [r["audit"]["summary"]["bias"]["tone"]["mean"] for r in per_seed]
    text = seeds_table(folders)
    row = next(line for line in text.splitlines() if line.startswith("| uniform | original |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    header = next(line for line in text.splitlines() if line.startswith("| law |"))
    column = [c.strip() for c in header.strip("|").split("|")].index("bias tone")
    assert cells[column] == f"{format_cell(sum(biases) / 2)} ({format_cell(biases[0])} / {format_cell(biases[1])})"
    assert text.startswith("**test** (seeds 0, 1")
    with pytest.raises(SeedsMismatch, match="share a seed"):
        seeds_table([folders[0], folders[0]])
    (tmp_path / "other").mkdir()
    other = _config(tmp_path / "other", assets, seed=2, methods=light[:1], grid_prompts=0)
    assert main(["compare", "--config", str(other), "--out", str(tmp_path / "other-out"), "--quiet"]) == 0
    with pytest.raises(SeedsMismatch, match="rows differ"):
        seeds_table([folders[0], tmp_path / "other-out"])
