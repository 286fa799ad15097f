"""The paper's experiment configs for Stable Diffusion 1.5: each validates, names prompt files that
exist, states a target the sd15-paper perception preset can measure, and keeps the held-out
occupations out of training."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from fairness.config import load_config
from fairness.data.prompts import read_corpus
from fairness.perception.presets import write_preset
from fairness.targets.distributions import TargetSpec

ROOT = Path(__file__).parent.parent
SD15 = ROOT / "pipelines" / "configs" / "sd15"
CONFIGS = sorted(p.name for p in SD15.glob("*.yaml"))
TEMPLATE = re.compile(r"^a photo of the face of a (.+), a person$")


@pytest.fixture(scope="module")
def preset_attributes(tmp_path_factory) -> dict[str, list[str]]:
    """The attributes and classes the sd15-paper bundle's training classifier names."""
    out = write_preset("sd15-paper", tmp_path_factory.mktemp("sd15-bundle"))
    spec = json.loads((out / "bundle.json").read_text())["components"]["train_classifier"]["config"]
    return {attr: list(classes) for attr, classes in spec["attributes"].items()}


def test_every_paper_experiment_has_a_config():
    assert set(CONFIGS) == {"gender.yaml", "race.yaml", "gender_race.yaml", "gender_race_age.yaml",
                            "gender_soft_tokens.yaml", "multi_concept.yaml", "gender_unet_lora.yaml"}


@pytest.mark.parametrize("name", CONFIGS)
def test_config_validates_with_existing_prompt_files(name, monkeypatch, preset_attributes):
    monkeypatch.chdir(ROOT)  # prompt paths are relative to the repository root
    cfg = load_config(SD15 / name)
    sets = cfg.prompts.train + cfg.prompts.val + cfg.prompts.test
    assert cfg.prompts.val and cfg.prompts.test
    for ps in sets:
        assert ps.file is not None and Path(ps.file).exists(), ps.file
        assert read_corpus(ps.file).prompts
    groups = TargetSpec.from_dict(cfg.target).compile(preset_attributes)
    assert groups
    # Appendix A's shared hyperparameters.
    assert cfg.train.lr == 5e-5 and cfg.train.checkpoint_every == 200 and cfg.train.ema_decay == 0.996
    assert cfg.dft.steps == (19, 23) and cfg.dft.guidance_scale == 7.5
    assert cfg.adapter.kind == "soft_tokens" or cfg.adapter.rank == 50


def test_paper_weights_per_experiment(monkeypatch):
    monkeypatch.chdir(ROOT)
    joint = load_config(SD15 / "gender_race.yaml")
    assert (joint.train.images_per_prompt, joint.loss.confidence_threshold, joint.loss.face_weight) == (32, 0.6, 0.1)
    assert joint.loss.img_weights("race").nonface_factor == 0.6 and joint.loss.img_weights("race").face_factor == 0.3
    assert joint.loss.img_weights("gender").nonface_factor == 0.2
    age = load_config(SD15 / "gender_race_age.yaml")
    assert age.train.images_per_prompt == 40 and age.loss.confidence_threshold == 0.7
    assert age.target["conditional"][0]["probs"] == {"young": 0.75, "old": 0.25}
    assert load_config(SD15 / "gender_soft_tokens.yaml").adapter.num_tokens == 5
    assert load_config(SD15 / "gender_unet_lora.yaml").adapter.kind == "unet_lora"


def _occupations(name: str) -> list[str]:
    prompts = read_corpus(SD15 / "prompts" / name).prompts
    matches = [TEMPLATE.match(p) for p in prompts]
    assert all(matches), [p for p, m in zip(prompts, matches) if not m][:3]
    return [m.group(1) for m in matches if m]


def test_occupation_lists_are_the_papers_and_training_is_disjoint():
    test, val, train = (_occupations(f"occupations_{s}.txt") for s in ("test", "val", "train"))
    assert (len(test), len(val)) == (50, 10) and "electrical and electronics repairer" in test
    assert len(set(train)) == len(train) >= 500
    held = test + val
    # Disjoint as words, not only as strings: "judge" would leak "administrative law judge".
    leaks = [(o, h) for o in train for h in held
             if re.search(rf"\b{re.escape(h)}\b", o) or re.search(rf"\b{re.escape(o)}\b", h)]
    assert not leaks, leaks[:5]


def test_other_prompt_families_keep_train_and_test_apart():
    folder = SD15 / "prompts"
    for family in ("sports", "styled_occupations", "descriptors"):
        train = set(read_corpus(folder / f"{family}_train.txt").prompts)
        test = set(read_corpus(folder / f"{family}_test.txt").prompts)
        assert train and test and not train & test, family
    assert len(read_corpus(folder / "laion_occupations.txt").prompts) == 40
