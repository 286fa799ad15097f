"""Every shipped experiment config is valid and its target compiles against the toy world."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from fairness.config import load_config
from fairness.targets.assignment import unreachable_targets
from fairness.targets.distributions import TargetSpec
from fairness.toyworld.world import ATTRIBUTES, prompts
from fairness.training.prompts import resolve_prompts

CONFIGS = sorted((Path(__file__).parent.parent / "pipelines" / "configs" / "toyworld").glob("[ms]*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_config_is_valid(path):
    cfg = load_config(path)
    groups = TargetSpec.from_dict(cfg.target).compile(ATTRIBUTES)
    assert groups
    for ps in cfg.prompts.train + cfg.prompts.val + cfg.prompts.test:
        assert resolve_prompts(ps)
    names = {ps.name for ps in cfg.prompts.test}
    assert {"test-concepts", "unseen-templates", "unseen-contexts"} <= names
    # Every targeted class can get a confident target at the config's batch and thresholds.
    assert [u.message() for u in unreachable_targets(groups, cfg.train.images_per_prompt, cfg.loss.threshold)] == []


def test_conditional_scenario_targets_25_percent_striped():
    cfg = load_config(CONFIGS[0].parent / "s4_joint_conditional.yaml")
    (group,) = TargetSpec.from_dict(cfg.target).compile(ATTRIBUTES)
    assert group.marginal("pattern")[1] == pytest.approx(0.25)


def test_the_marginal_ablation_of_s4_targets_the_same_law():
    """s4_pattern_marginal aligns pattern on its own; the law it targets is s4's product law."""
    (joint,) = TargetSpec.from_dict(load_config(CONFIGS[0].parent / "s4_joint_conditional.yaml").target).compile(ATTRIBUTES)
    groups = {g.name: g for g in TargetSpec.from_dict(
        load_config(CONFIGS[0].parent / "s4_pattern_marginal.yaml").target).compile(ATTRIBUTES)}
    assert set(groups) == {"pattern", "tone*color"} and joint.attributes == ("tone", "color", "pattern")
    product = np.multiply.outer(groups["tone*color"].probs, groups["pattern"].probs)
    np.testing.assert_allclose(product, joint.probs)


def test_the_overfit_diagnostic_uses_training_prompts_only():
    """research/configs/overfit_four_prompts.yaml trains, validates and tests on the same four
    prompts: all of them from the training split, so no held-out concept is ever trained on."""
    cfg = load_config(Path(__file__).parent.parent / "research" / "configs" / "overfit_four_prompts.yaml")
    train = set(prompts("train"))
    sets = [set(resolve_prompts(ps)) for ps in cfg.prompts.train + cfg.prompts.val + cfg.prompts.test]
    assert len(sets[0]) == 4 and all(s == sets[0] for s in sets) and sets[0] <= train
    assert cfg.train.images_per_prompt == 16 and TargetSpec.from_dict(cfg.target).compile(ATTRIBUTES)
