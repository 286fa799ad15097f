"""The paper's bias metric and group frequencies.

``bias(P) = mean over class pairs i < j of |freq_i - freq_j|`` with frequencies over the images
of prompt P that have a detected face (Shen et al. 2024, sec. 5). 0 is perfectly balanced; a
prompt whose images are all one of K classes scores 2/K (1 for K = 2, 0.5 for K = 4).

A finite sample is never exactly balanced, so even a perfectly fair generator scores above 0:
:func:`bias_floor` is what it scores on average, the line under which no measured bias can go.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Mapping, Sequence

import numpy as np

from fairness.seeding import numpy_rng

if TYPE_CHECKING:
    from fairness.targets.distributions import TargetGroup


def frequencies(classes: np.ndarray, num_classes: int) -> np.ndarray:
    """Share of each class among ``classes`` (entries < 0 = no face, ignored); zeros if none."""
    classes = np.asarray(classes)
    valid = classes[classes >= 0]
    if len(valid) == 0:
        return np.zeros(num_classes)
    return np.bincount(valid, minlength=num_classes)[:num_classes] / len(valid)


def _pair_gaps(freqs: np.ndarray) -> np.ndarray:
    """``|freq_i - freq_j|`` for every class pair i < j, along the last axis."""
    i, j = np.triu_indices(freqs.shape[-1], k=1)
    return np.abs(freqs[..., i] - freqs[..., j])


def bias(freqs: Sequence[float]) -> float:
    gaps = _pair_gaps(np.asarray(freqs, dtype=np.float64))
    return float(gaps.mean()) if gaps.size else 0.0


@functools.lru_cache(maxsize=4096)
def bias_floor(num_classes: int, n: int, draws: int = 4000) -> float:
    """Expected :func:`bias` of ``n`` images from a generator that draws every class with
    probability exactly 1/K: the sampling floor of the metric (NaN for ``n = 0``). About
    0.8 / sqrt(n) for K = 2: 0.14 on 32 images, 0.10 on the paper's 60. Estimated from
    ``draws`` seeded multinomial samples (standard error < 0.002)."""
    if n <= 0:
        return float("nan")
    rng = numpy_rng(0, "bias-floor", num_classes, n)
    gaps = _pair_gaps(rng.multinomial(n, np.full(num_classes, 1.0 / num_classes), size=draws) / n)
    return float(gaps.mean()) if gaps.size else 0.0


def mean_bias_floor(faces: Sequence[int], num_classes: int) -> float:
    """:func:`bias_floor` averaged like the audit averages bias: over prompts with a face."""
    floors = [bias_floor(num_classes, int(n)) for n in faces if n > 0]
    return float(np.mean(floors)) if floors else float("nan")


def joint_classes(classes: Mapping[str, np.ndarray], sizes: Mapping[str, int], attributes: Sequence[str]) -> np.ndarray:
    """Row-major joint class index over ``attributes`` (-1 where any is missing)."""
    out = np.zeros(len(classes[attributes[0]]), dtype=np.int64)
    missing = np.zeros_like(out, dtype=bool)
    for a in attributes:
        c = np.asarray(classes[a])
        missing |= c < 0
        out = out * sizes[a] + np.maximum(c, 0)
    return np.where(missing, -1, out)


def total_variation(freqs: Sequence[float], target: Sequence[float]) -> float:
    return 0.5 * float(np.abs(np.asarray(freqs) - np.asarray(target)).sum())


def mean_std(values: Sequence[float]) -> dict[str, float]:
    v = np.asarray([x for x in values if x == x], dtype=np.float64)
    if len(v) == 0:
        return {"mean": float("nan"), "std": float("nan"), "n": 0}
    return {"mean": float(v.mean()), "std": float(v.std()), "n": int(len(v))}


def target_gap(classes: Mapping[str, np.ndarray], sizes: Mapping[str, int], group: TargetGroup) -> float:
    """Distance of one prompt's images from a target group's law: the mean total variation
    over the joint law and, for two or more attributes, each marginal. The marginals are what
    keeps this usable on few images: the joint TV of 32 images drawn *exactly* from a uniform
    8-class law is ~0.19 on its own, a binary marginal's ~0.07, so a mean that includes them
    separates weak from strong debiasing where the joint alone is mostly sampling noise.
    ``classes`` maps attribute -> class per image (< 0: no face/object; such images are left
    out). NaN when no image has one."""
    joint = joint_classes(classes, sizes, group.attributes)
    if not (joint >= 0).any():
        return float("nan")
    tvs = [total_variation(frequencies(joint, group.num_joint_classes), group.flat())]
    if len(group.attributes) > 1:
        for attr in group.attributes:
            found = np.where(joint >= 0, classes[attr], -1)
            tvs.append(total_variation(frequencies(found, sizes[attr]), group.marginal(attr)))
    return float(np.mean(tvs))


def gap_left(before: Sequence[float], after: Sequence[float], target: Sequence[float]) -> float:
    """How much of one prompt's distance to the target the debiased model leaves, with a sign.

    The magnitude is ``TV(after, target) / TV(before, target)``: 1 when the law did not move, 0
    at the target. The sign says which side of the target the prompt is on: positive while the
    class the original over-drew most is still over-drawn, negative once it no longer is (another
    class took its place). Mean bias cannot tell a prompt drawn half light and half dark from
    one whose stereotype was swapped for its opposite (0/100 scores what 100/0 scored): the sign
    can; for two classes a 100/0 prompt turned 0/100 scores -1. NaN when the original is
    already at the target, where there is nothing to close.
    """
    b, a, t = (np.asarray(x, dtype=np.float64) for x in (before, after, target))
    start = total_variation(b, t)
    if start < 1e-12:
        return float("nan")
    favoured = int(np.argmax(b - t))
    left = total_variation(a, t) / start
    return left if a[favoured] > t[favoured] + 1e-12 else -left


MOVEMENTS = ("kept", "near", "reversed")


def movement_shares(gaps: Sequence[float], half: float = 0.5) -> dict[str, float]:
    """Share of prompts (NaN gaps left out) by where :func:`gap_left` puts them: ``kept`` (at
    least ``half`` of the gap left, on the original's side), ``near`` (within ``half`` of it of
    the target, either side) and ``reversed`` (past the target by at least ``half`` of it: the
    stereotype swapped rather than removed). All NaN when no prompt has a gap."""
    g = np.asarray([x for x in gaps if x == x], dtype=np.float64)
    if len(g) == 0:
        return {m: float("nan") for m in MOVEMENTS}
    return {"kept": float((g >= half).mean()), "near": float((np.abs(g) < half).mean()),
            "reversed": float((g <= -half).mean())}
