"""The shape-fidelity ablation: each mode trains what it says on the shipped model's pieces and
reports a shape accuracy; the world is left as it was."""

from __future__ import annotations

import json
import shlex

import pytest
import torch

from fairness.models.loading import load_pipeline
from fairness.toyworld import DEFAULT_ASSETS, default_perception_dir, world
from fairness.toyworld.diffusion import DiffusionRecipe, train_diffusion
from research.shape_ablation import main, probe_concepts, run_ablation

# A few steps on a few images: what the modes do, not how well.
TINY = {"unet_steps": 2, "unet_refine_steps": 1, "unet_batch": 4, "train_images": 16, "num_inference_steps": 2}


@pytest.fixture(scope="module")
def one_concept() -> list[world.Concept]:
    return probe_concepts()[:1]


def test_probe_is_every_second_train_concept():
    probe = probe_concepts()
    assert len(probe) == 19
    assert all(c.split == "train" and c.has_objects for c in probe)


def test_scratch_row_measures_a_fresh_denoiser_and_restores_the_world(one_concept):
    before = world.MIN_SIZE
    row = run_ablation("scratch", TINY, min_size=12.0, images_per_concept=2, concepts=one_concept)
    assert world.MIN_SIZE == before
    assert row["mode"] == "scratch" and row["min_size"] == 12.0 and row["init_seed"] == 1
    assert 0.0 <= row["shape_accuracy"] <= 1.0
    assert set(row["tv"]) >= {"tone", "color", "pattern"}
    assert torch.isfinite(torch.tensor([row["stats"]["loss"], row["stats"]["refine_loss"]])).all()


def test_shipped_mode_trains_nothing_and_is_deterministic(one_concept):
    rows = [run_ablation("shipped", {"num_inference_steps": 3}, images_per_concept=2, concepts=one_concept)
            for _ in range(2)]
    assert rows[0]["stats"] == {}
    assert rows[0]["shape_accuracy"] == rows[1]["shape_accuracy"]
    assert rows[0]["tv"] == rows[1]["tv"]


@pytest.mark.parametrize("mode, overrides, min_size, message", [
    ("bogus", {}, None, "mode must be one of"),
    ("scratch", {}, 40.0, "--min-size must lie in"),
    ("scratch", {"unet_stepz": 3}, None, r"unknown DiffusionRecipe fields \['unet_stepz'\]"),
])
def test_bad_arguments_are_refused(mode, overrides, min_size, message):
    before = world.MIN_SIZE
    with pytest.raises(ValueError, match=message):
        run_ablation(mode, overrides, min_size=min_size)
    assert world.MIN_SIZE == before


def _without_time(row: dict) -> dict:
    return {k: v for k, v in row.items() if k != "train_seconds"}


def test_cli_appends_one_json_line(tmp_path, monkeypatch):
    import research.shape_ablation as module
    probe = probe_concepts()[:1]
    monkeypatch.setattr(module, "probe_concepts", lambda: probe)
    out = tmp_path / "rows.jsonl"
    assets = tmp_path / "assets"  # a saved model measured through --assets: here the shipped one again
    assets.mkdir()
    for part in ("sd", "perception"):
        (assets / part).symlink_to(DEFAULT_ASSETS / part)
    for tag, extra in (("a", []), ("b", ["--assets", str(assets)])):
        main(["--tag", tag, "--mode", "shipped", "--recipe", json.dumps({"num_inference_steps": 2}),
              "--out", str(out), *extra])
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["tag"] for r in rows] == ["a", "b"]
    assert rows[0]["shape_accuracy"] == rows[1]["shape_accuracy"]
    assert 0.0 <= rows[0]["vae_shape_accuracy"] <= 1.0
    # Each row carries the command that reproduces it.
    command = shlex.split(rows[0]["command"])
    assert command[:3] == ["python", "-m", "research.shape_ablation"]
    main(command[3:])
    again = json.loads(out.read_text().splitlines()[-1])
    assert _without_time(again) == _without_time(rows[0])


def test_build_refine_run_is_the_continue_mode_run_on_the_first_model(tmp_path, one_concept):
    """The shipped model was trained in two commands (``--mode full``, then ``--mode continue``
    at a lower rate); the build's refine run reproduces that exactly, in one."""
    first = {"vae_steps": 3, "vae_batch": 8, "unet_steps": 3, "unet_batch": 8, "train_images": 64,
             "num_inference_steps": 2, "unet_refine_steps": 0}
    measure = {"images_per_concept": 1, "concepts": one_concept}
    run_ablation("full", first, save_dir=tmp_path / "a" / "sd", **measure)
    (tmp_path / "a" / "perception").symlink_to(default_perception_dir())
    run_ablation("continue", {**first, "unet_steps": 2, "unet_lr": 5e-4}, assets=tmp_path / "a",
                 save_dir=tmp_path / "b", **measure)
    one_build = train_diffusion(tmp_path / "c", recipe=DiffusionRecipe().with_overrides(
        {**first, "unet_refine_steps": 2, "unet_refine_lr": 5e-4}), progress=False)
    two_commands = load_pipeline(str(tmp_path / "b"), device="cpu")
    for part in ("unet", "text_encoder"):
        built, continued = getattr(one_build.pipe, part).state_dict(), getattr(two_commands, part).state_dict()
        assert built.keys() == continued.keys()
        assert all(torch.equal(built[k], continued[k]) for k in built), part
    first_only, refined = load_pipeline(str(tmp_path / "a" / "sd"), device="cpu").unet.state_dict(), two_commands.unet.state_dict()
    assert not all(torch.equal(first_only[k], refined[k]) for k in first_only)  # the refine run trained
