"""Config schema validation and the bias metric."""

from __future__ import annotations

import numpy as np
import pytest
import yaml

from fairness.config import ConfigError, load_config
from fairness.metrics.audit import movements
from fairness.metrics.bias import (bias, bias_floor, frequencies, gap_left, joint_classes, mean_bias_floor, mean_std,
                                   movement_shares, target_gap)
from fairness.targets.distributions import TargetGroup

BASE = {"prompts": {"train": [{"prompts": ["a photo of the doctor"]}]}, "target": {"marginals": {"gender": "uniform"}}}


def _write(tmp_path, data):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_valid_config_round_trips_and_overrides(tmp_path):
    cfg = load_config(_write(tmp_path, BASE), {"train.iterations": 7, "adapter.kind": "soft_tokens"})
    assert cfg.train.iterations == 7 and cfg.adapter.kind == "soft_tokens"
    again = load_config(_write(tmp_path, yaml.safe_load(cfg.to_yaml())))
    assert again == cfg


@pytest.mark.parametrize("patch, message", [
    ({"trian": {}}, "trian: Extra inputs are not permitted"),
    ({"train": {"iterations": 0}}, "train.iterations"),
    ({"loss": {"confidence_threshold": 1.5}}, "confidence threshold must lie in"),
    ({"dft": {"steps": [5, 3]}}, "min <= max"),
    ({"prompts": {"train": [{"prompts": []}]}}, "prompt list is empty"),
    ({"prompts": {"train": [{"prompts": ["x"], "file": "y.txt"}]}}, "exactly one of"),
    ({"adapter": {"kind": "dora"}}, "adapter.kind"),
])
def test_invalid_configs_name_the_field(tmp_path, patch, message):
    with pytest.raises(ConfigError, match=message):
        load_config(_write(tmp_path, {**BASE, **patch}))


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("a: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def test_bias_metric_matches_paper_definition():
    assert bias([0.5, 0.5]) == 0
    assert bias([1.0, 0.0]) == 1
    assert bias([1, 0, 0, 0]) == pytest.approx(0.5)
    assert bias([0.4, 0.3, 0.2, 0.1]) == pytest.approx((0.1 + 0.2 + 0.3 + 0.1 + 0.2 + 0.1) / 6)
    np.testing.assert_allclose(frequencies(np.array([0, 1, 1, -1]), 2), [1 / 3, 2 / 3])
    assert frequencies(np.array([-1, -1]), 3).sum() == 0


def test_bias_floor_is_what_a_perfectly_fair_generator_scores():
    assert bias_floor(2, 1) == 1.0 and bias_floor(4, 1) == 0.5  # one image is always one class
    for n in (32, 60, 200):  # binary: E|2f - 1| with f ~ Bin(n, 1/2) / n, about sqrt(2 / (pi n))
        assert bias_floor(2, n) == pytest.approx(np.sqrt(2 / (np.pi * n)), rel=0.06)
    assert bias_floor(8, 160) < bias_floor(8, 32) < bias_floor(4, 32) < bias_floor(2, 32)
    assert bias_floor(2, 32) == bias_floor.__wrapped__(2, 32)  # seeded: the same every call
    assert np.isnan(bias_floor(2, 0))
    assert mean_bias_floor([32, 0, 1], 2) == pytest.approx((bias_floor(2, 32) + 1) / 2)  # prompts without faces skipped


def test_joint_classes_row_major_and_missing():
    j = joint_classes({"g": np.array([0, 1, 1, -1]), "r": np.array([3, 0, 2, 1])}, {"g": 2, "r": 4}, ["g", "r"])
    np.testing.assert_array_equal(j, [3, 4, 6, -1])
    assert mean_std([1.0, 3.0, float("nan")]) == {"mean": 2.0, "std": 1.0, "n": 2}


def test_target_gap_averages_joint_and_marginal_total_variation():
    uniform = TargetGroup(("g", "r"), (("m", "f"), ("a", "b", "c", "d")), np.full((2, 4), 1 / 8))
    sizes = {"g": 2, "r": 4}
    balanced = {"g": np.repeat([0, 1], 4), "r": np.tile([0, 1, 2, 3], 2)}
    assert target_gap(balanced, sizes, uniform) == 0
    one_class = {"g": np.zeros(8, int), "r": np.zeros(8, int)}  # joint TV 7/8, marginals 1/2 and 3/4
    assert target_gap(one_class, sizes, uniform) == pytest.approx((7 / 8 + 1 / 2 + 3 / 4) / 3)
    # Images without a face/object are left out of every law; none at all -> NaN.
    half = TargetGroup(("g",), (("m", "f"),), np.array([0.5, 0.5]))
    assert target_gap({"g": np.array([0, 1, -1]), "r": np.array([2, 2, 3])}, sizes, half) == 0
    assert np.isnan(target_gap({"g": np.array([-1, -1])}, sizes, half))


def test_gap_left_tells_a_swapped_stereotype_from_a_kept_one():
    half = [0.5, 0.5]
    # Mean bias scores 100/0 and 0/100 the same; the gap left is +1 and -1.
    assert bias([1, 0]) == bias([0, 1])
    assert gap_left([1, 0], [1, 0], half) == 1 and gap_left([1, 0], [0, 1], half) == -1
    assert gap_left([1, 0], [0.5, 0.5], half) == 0
    assert gap_left([1, 0], [0.7, 0.3], half) == pytest.approx(0.4)
    assert gap_left([0.9, 0.1], [0.3, 0.7], half) == pytest.approx(-0.5)
    assert np.isnan(gap_left(half, [1, 0], half))  # no direction to measure against
    # Four classes: a red-only prompt drawn green-only is swapped, not near the uniform target.
    quarter = [0.25] * 4
    assert gap_left([1, 0, 0, 0], [0, 1, 0, 0], quarter) == -1
    assert gap_left([1, 0, 0, 0], [0.5, 0.5, 0, 0], quarter) == pytest.approx(2 / 3)
    assert gap_left([0.4, 0.4, 0.2, 0], [0.25, 0.25, 0.25, 0.25], quarter) == 0


def test_movement_shares_split_prompts_at_half_the_gap():
    shares = movement_shares([1.0, 0.6, 0.5, 0.2, -0.2, -0.5, -1.0, float("nan")])
    assert shares == {"kept": pytest.approx(3 / 7), "near": pytest.approx(2 / 7), "reversed": pytest.approx(2 / 7)}
    assert all(np.isnan(v) for v in movement_shares([float("nan")]).values())


def test_movements_count_prompts_with_an_object_before_and_after():
    def row(light, faces=32):
        return {"freq": {"tone": [light, 1 - light]}, "faces": faces}

    before = [row(1.0), row(1.0), row(0.0), row(1.0), row(1.0, faces=0)]
    after = [row(1.0), row(0.5), row(1.0), row(0.9, faces=0), row(0.0)]
    out = movements(before, after, {"tone": [0.5, 0.5], "color": [0.25] * 4})
    assert set(out) == {"tone"}  # laws the rows do not carry are left out
    assert out["tone"] == {"kept": pytest.approx(1 / 3), "near": pytest.approx(1 / 3), "reversed": pytest.approx(1 / 3)}


def test_extends_merges_mappings_and_replaces_the_rest(tmp_path):
    (tmp_path / "base.yaml").write_text(yaml.safe_dump({**BASE, "train": {"iterations": 5, "lr": 0.1}}))
    (tmp_path / "child.yaml").write_text(yaml.safe_dump({"extends": "base.yaml", "train": {"iterations": 9},
                                                         "target": {"marginals": {"race": "uniform"}}}))
    cfg = load_config(tmp_path / "child.yaml")
    assert cfg.train.iterations == 9 and cfg.train.lr == 0.1
    assert cfg.target == {"marginals": {"race": "uniform"}}  # a target replaces, never merges
    (tmp_path / "loop.yaml").write_text("extends: loop.yaml\n")
    with pytest.raises(ConfigError, match="cycle"):
        load_config(tmp_path / "loop.yaml")
