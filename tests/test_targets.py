"""Target distributions and OT target assignment (SPEC section 1)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

from fairness.losses.alignment import confident_mask
from fairness.targets.assignment import (MAP_LIMIT, _count_vectors, _transport_rows, assign_targets, binary_q,
                                         binary_tolerance, class_cost, expected_assignment, expected_plan,
                                         num_count_vectors, reachable_confidence, unreachable_targets)
from fairness.targets.distributions import TargetError, TargetSpec

CPU = torch.device("cpu")
KNOWN = {"gender": ["male", "female"], "race": ["w", "a", "b", "i"], "age": ["young", "old"]}


@pytest.mark.parametrize("bad, message", [
    ({"marginals": {"gender": {"male": 0.7, "female": 0.7}}}, "sum to 1.4"),
    ({"marginals": {"gender": {"male": -0.5, "female": 1.5}}}, "negative"),
    ({"marginals": {"gender": {"male": float("nan"), "female": 1.0}}}, "not finite"),
    ({"marginals": {"gender": {"male": float("inf"), "female": 1.0}}}, "not finite"),
    ({"marginals": {"sex": "uniform"}}, "unknown attribute 'sex'"),
    ({"marginals": {"gender": {"man": 1.0}}}, "unknown class"),
    ({"marginals": {"gender": {}}}, "empty"),
    ({}, "target is empty"),
    ({"marginals": {"gender": "uniform"}, "joint": {"attributes": ["gender", "race"]}}, "both"),
    ({"joint": {"attributes": ["gender"]}}, r"2\+ distinct"),
    ({"conditional": [{"attribute": "age", "given": ["gender"], "probs": "uniform"}]}, "no target of its own"),
    ({"colour": {}}, "unknown key"),
])
def test_invalid_targets_get_precise_errors(bad, message):
    with pytest.raises(TargetError, match=message):
        TargetSpec.from_dict(bad).compile(KNOWN)


def test_per_attribute_targets_are_independent_groups():
    groups = TargetSpec.from_dict({"marginals": {"gender": "uniform", "race": {"w": .4, "a": .2, "b": .2, "i": .2}}}).compile(KNOWN)
    assert [g.name for g in groups] == ["gender", "race"]
    np.testing.assert_allclose(groups[1].flat(), [.4, .2, .2, .2])


def test_joint_and_conditional_target():
    spec = {"joint": {"attributes": ["gender", "race"], "probs": "uniform"},
            "conditional": [{"attribute": "age", "given": ["gender", "race"], "probs": {"young": .75, "old": .25}}]}
    (g,) = TargetSpec.from_dict(spec).compile(KNOWN)
    assert g.attributes == ("gender", "race", "age") and g.probs.shape == (2, 4, 2)
    np.testing.assert_allclose(g.probs.sum(), 1.0)
    # 25% old within every gender x race group.
    np.testing.assert_allclose(g.probs[..., 1] / g.probs.sum(-1), 0.25)


def test_conditional_per_group_distributions():
    spec = {"marginals": {"gender": "uniform"},
            "conditional": [{"attribute": "age", "given": ["gender"],
                             "probs": {"male": {"young": .5, "old": .5}, "female": {"young": .9, "old": .1}}}]}
    (g,) = TargetSpec.from_dict(spec).compile(KNOWN)
    np.testing.assert_allclose(g.probs, [[.25, .25], [.45, .05]])


def test_binary_closed_form_agrees_with_exact_and_monte_carlo():
    rng = np.random.default_rng(0)
    p = rng.dirichlet([1, 1], size=24)
    d = np.array([.3, .7])
    qb = expected_assignment(p, d, method="binary")
    qe = expected_assignment(p, d, method="exact")  # every count vector: the expectation itself
    qm = expected_assignment(p, d, method="monte_carlo", samples=20000, seed=1)
    assert np.abs(qb - qe).max() < 1e-9
    assert np.abs(qb - qm).max() < 0.02


def test_edge_cases_single_image_identical_predictions_and_no_detection():
    q = expected_assignment(np.array([[.3, .7]]), np.array([.5, .5]))
    np.testing.assert_allclose(q, [[.5, .5]])
    same = np.tile([[.25, .25, .25, .25]], (6, 1))
    q = expected_assignment(same, np.full(4, .25))
    np.testing.assert_allclose(q.sum(1), 1.0)
    np.testing.assert_allclose(q.sum(0), 6 * np.full(4, .25), atol=0.15)
    groups = TargetSpec.from_dict({"marginals": {"gender": "uniform"}}).compile(KNOWN)
    probs = {"gender": np.array([[.9, .1], [.2, .8], [.5, .5]])}
    t = assign_targets(groups, probs, valid=np.array([True, False, True]))["gender"]
    assert t.targets[1] == -1 and t.confidence[1] == 0
    t = assign_targets(groups, probs, valid=np.zeros(3, bool))["gender"]
    assert (t.targets == -1).all()
    joint = TargetSpec.from_dict({"joint": {"attributes": ["gender", "race"], "probs": "uniform"}}).compile(KNOWN)
    probs["race"] = np.full((3, 4), 0.25)
    out = assign_targets(joint, probs, valid=np.zeros(3, bool))  # a batch without any face
    assert (out["gender"].targets == -1).all() and (out["race"].targets == -1).all()


def test_sixteen_joint_classes_use_monte_carlo_and_are_deterministic():
    spec = {"joint": {"attributes": ["gender", "race", "age"], "probs": "uniform"}}
    groups = TargetSpec.from_dict(spec).compile(KNOWN)
    assert groups[0].num_joint_classes == 16 and num_count_vectors(40, 16) > 10**6
    rng = np.random.default_rng(3)
    probs = {a: rng.dirichlet(np.ones(len(c)), size=40) for a, c in KNOWN.items()}
    a = assign_targets(groups, probs, seed=7)
    b = assign_targets(groups, probs, seed=7)
    for attr in KNOWN:
        np.testing.assert_array_equal(a[attr].q, b[attr].q)
        np.testing.assert_allclose(a[attr].q.sum(1), 1.0)


@settings(max_examples=25, deadline=None)
@given(n=st.integers(40, 120), d1=st.floats(0.1, 0.9), seed=st.integers(0, 10**6))
def test_target_frequencies_match_distribution_as_n_grows(n, d1, seed):
    p = np.random.default_rng(seed).dirichlet([1, 1], size=n)
    q = binary_q(p[:, 1], d1)
    # The expected share of class-1 targets equals d1 exactly; hard targets are within sampling error.
    assert abs(q[:, 1].mean() - d1) < 1e-9
    assert abs((q.argmax(1) == 1).mean() - d1) <= 2.5 / np.sqrt(n) + 1 / n


@settings(max_examples=15, deadline=None)
@given(counts=st.lists(st.integers(2, 8), min_size=3, max_size=4), seed=st.integers(0, 1000))
def test_already_matching_one_hot_predictions_keep_their_classes(counts, seed):
    k = len(counts)
    labels = np.repeat(np.arange(k), counts)
    np.random.default_rng(seed).shuffle(labels)
    p = np.eye(k)[labels] * 0.98 + 0.02 / k
    d = np.asarray(counts) / sum(counts)
    q = expected_assignment(p, d, method="monte_carlo", samples=400, seed=seed)
    assert (q.argmax(1) == labels).all()


@pytest.mark.parametrize("n, female, threshold", [(16, 0.5, 0.8), (24, 0.5, 0.8), (16, 0.5, 0.6), (16, 0.3, 0.7),
                                                  (16, 0.5, 0.5)])
def test_tolerance_band_is_where_the_assigned_targets_agree_with_a_sure_classifier(n, female, threshold):
    groups = TargetSpec.from_dict({"marginals": {"gender": {"male": 1 - female, "female": female}}}).compile(KNOWN)
    lo, hi = binary_tolerance(n, female, threshold)
    jitter = np.random.default_rng(n).uniform(0, 1e-3, n)
    silent = []
    for k in range(n + 1):
        labels = (np.arange(n) < k).astype(int)
        p1 = np.where(labels == 1, 0.99, 0.01) - jitter
        t = assign_targets(groups, {"gender": np.stack([1 - p1, p1], 1)})["gender"]
        pushed = confident_mask(t, threshold, CPU).numpy() & (t.targets != labels)  # the loss's own mask
        silent.append(not pushed.any())
    assert silent == [lo <= k <= hi for k in range(n + 1)]
    assert lo <= round(n * female) <= hi


def test_tolerance_band_of_the_papers_gender_setting():
    assert binary_tolerance(24, 0.5, 0.8) == (10, 14)   # N = 24, C = 0.8: 42-58% female is left alone
    assert binary_tolerance(16, 0.5, 0.8) == (6, 10)
    assert binary_tolerance(16, 0.5, 0.5) == (8, 8)     # C <= 0.5 targets every image
    with pytest.raises(ValueError, match="at least one image"):
        binary_tolerance(0, 0.5, 0.8)


def test_joint_targets_leave_a_still_biased_batch_alone():
    """The joint jobs' tolerance (docs/results-toyworld.md, "What limits efficacy" item 5).

    Over 8 joint classes a 16-image batch is too small for confident marginal targets: with
    gender balanced and races split 6/6/2/2 (a per-prompt race bias of 0.17), no image gets a
    confident race target at C = 0.6, while a one-race batch gets over a third of its images
    pushed.
    """
    groups = TargetSpec.from_dict({"joint": {"attributes": ["gender", "race"], "probs": "uniform"}}).compile(KNOWN)
    rng = np.random.default_rng(0)
    gender = np.arange(16) % 2

    def pushed(race_counts):
        race = np.repeat(np.arange(4), race_counts)
        probs = {}
        for attr, labels, k in (("gender", gender, 2), ("race", race, 4)):
            p = 0.05 * rng.dirichlet(np.ones(k), size=16)  # a sure classifier, 95% on the true class
            p[np.arange(16), labels] += 0.95
            probs[attr] = p
        t = assign_targets(groups, probs, seed=1)["race"]
        return int((confident_mask(t, 0.6, CPU).numpy() & (t.targets != race)).sum())

    assert np.mean([pushed([16, 0, 0, 0]) for _ in range(5)]) >= 6
    assert sum(pushed([6, 6, 2, 2]) for _ in range(5)) == 0


def test_a_conditional_attribute_gets_fewer_pushes_than_the_same_law_as_its_own_target():
    """Why s4's 25% attribute barely moves (docs/results-toyworld.md, "What limits efficacy" item 5).

    "Old 25% within every gender x race group" compiles to one 16-class joint. With a sure
    classifier every wrong joint class is equally far from an image, so a 16-image batch with
    6 old faces gets fewer confident old -> young targets than the same product law gives
    when age is its own binary target (which then no longer ties age to a group).
    """
    conditional = TargetSpec.from_dict({
        "joint": {"attributes": ["gender", "race"], "probs": "uniform"},
        "conditional": [{"attribute": "age", "given": ["gender", "race"], "probs": {"young": 0.75, "old": 0.25}}],
    }).compile(KNOWN)
    separate = TargetSpec.from_dict({
        "joint": {"attributes": ["gender", "race"], "probs": "uniform"},
        "marginals": {"age": {"young": 0.75, "old": 0.25}},
    }).compile(KNOWN)
    labels = {"gender": np.array([1] * 13 + [0] * 3), "race": np.repeat(np.arange(4), [9, 3, 2, 2]),
              "age": np.array([1] * 6 + [0] * 10)}

    def pushed(groups, seed):
        rng = np.random.default_rng(seed)
        probs = {}
        for attr, y in labels.items():
            k = len(KNOWN[attr])
            p = 0.05 * rng.dirichlet(np.ones(k), size=16)
            p[np.arange(16), y] += 0.95
            probs[attr] = p
        t = assign_targets(groups, probs, seed=seed)["age"]
        return int((confident_mask(t, 0.7, CPU).numpy() & (labels["age"] == 1) & (t.targets == 0)).sum())

    joint = [pushed(conditional, s) for s in range(8)]
    alone = [pushed(separate, s) for s in range(8)]
    assert all(a >= 1 for a in alone), alone  # 6 of 16 old against 25%: the binary target always acts
    assert sum(alone) >= 2 * sum(joint), (alone, joint)


@pytest.mark.parametrize("n, k", [(4, 8), (8, 4), (5, 3), (1, 8), (16, 2)])
def test_scoring_every_map_gives_the_plans_ot_emd_solves(n, k):
    """The vectorised plans (every image-to-class map scored at once) equal one ot.emd per
    count vector, weights and all, wherever K^N is small enough to take that path."""
    assert k ** n <= MAP_LIMIT
    rng = np.random.default_rng(n * 100 + k)
    for _ in range(5):
        cost = class_cost(rng.dirichlet(np.full(k, 0.5), size=n))
        counts = _count_vectors(n, k)
        w = rng.random(len(counts))
        solved = sum(wi * _transport_rows(cost, c) for wi, c in zip(w, counts))
        np.testing.assert_allclose(expected_plan(cost, counts, w), solved, atol=1e-9)


@settings(max_examples=20, deadline=None)
@given(n=st.integers(1, 6), k=st.integers(2, 4), seed=st.integers(0, 10**6))
def test_no_target_confidence_exceeds_the_reachable_bound(n, k, seed):
    """q[i, c] <= 1 - (1 - d_c)^N for every image and class (the exact expectation), and the
    binary closed form attains the bound at rank 0."""
    rng = np.random.default_rng(seed)
    d = rng.dirichlet(np.ones(k))
    q = expected_assignment(rng.dirichlet(np.ones(k), size=n), d, method="exact")
    assert (q <= np.array([reachable_confidence(x, n) for x in d]) + 1e-9).all()
    p1 = np.linspace(0.9, 0.1, n)
    assert binary_q(p1, d[0])[0, 1] == pytest.approx(reachable_confidence(d[0], n))


def test_a_class_no_image_can_reach_is_named_with_the_way_out():
    """s4's first config: 25% striped at 4 images per prompt and C = 0.7 (reachable 0.684)."""
    groups = TargetSpec.from_dict({"marginals": {"gender": {"male": 0.75, "female": 0.25}}}).compile(KNOWN)
    (bad,) = unreachable_targets(groups, 4, lambda a: 0.7)
    assert (bad.attribute, bad.cls, bad.bound) == ("gender", "female", pytest.approx(1 - 0.75 ** 4))
    msg = bad.message()
    assert "gender='female' (target share 0.25)" in msg and "= 0.684, below its confidence threshold 0.7" in msg
    assert "to at most 0.68 or raise train.images_per_prompt to 5" in msg
    assert unreachable_targets(groups, 4, lambda a: 0.6) == [] and unreachable_targets(groups, 5, lambda a: 0.7) == []
