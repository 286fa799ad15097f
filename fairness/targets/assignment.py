r"""Optimal-transport target assignment for the distributional alignment loss (DAL).

Given class probabilities :math:`p_i` of N generated images and a target distribution
:math:`\mathcal D` over K classes, draw N one-hot targets :math:`u_j \sim \mathcal D` iid and
match images to targets by optimal transport,

.. math:: \sigma^* = \arg\min_{\sigma \in S_N} \sum_i \lVert p_i - u_{\sigma_i} \rVert_2 ,

then average over the draws: :math:`q_i = \mathbb E_u[u_{\sigma^*_i}]`. The target class is
:math:`y_i = \arg\max q_i` and its confidence :math:`c_i = \max q_i` (Shen et al., ICLR 2024,
eqs. 4-6). Because targets are one-hot, a draw is fully described by its class-count vector
:math:`n` (multinomial), and the matching is a transport problem from N images (mass 1/N each)
to K classes (mass :math:`n_k/N`), solved exactly with POT's ``ot.emd``.

Four ways to take the expectation:

* ``binary`` (K = 2): sorting solves the matching; image of rank r (0 = most likely class 1)
  gets class 1 iff more than r targets are class 1, so :math:`q_{i,1} = P(\mathrm{Bin}(N, d_1) > r)`.
* ``exact``: enumerate *every* count vector (:math:`\binom{N+K-1}{K-1}` of them), solve each,
  average the plans with their multinomial weights: the expectation itself.
* ``truncated``: enumerate only the most probable count vectors covering ``mass`` of the
  multinomial probability (SPEC: ~95%), renormalise their weights. Cheaper, slightly biased
  toward the typical draws. ``auto`` uses it, at 0.95, when there are few count vectors.
* ``monte_carlo``: draw ``samples`` count vectors, solve each, average (joint attributes,
  large K).

``exact`` and ``truncated`` refuse a problem with more than :data:`ENUMERATION_LIMIT` count
vectors (N = 40 images over K = 16 joint classes has ~10^13) instead of running for ever.

Joint groups (several attributes matched together over their K = prod K_a joint classes) take
one of two transport costs, ``joint_cost``:

* ``joint`` (default): :math:`\lVert p^{\otimes}_i - e_j\rVert_2` between the image's joint
  probabilities (outer product of its per-attribute ones) and the joint class's one-hot;
* ``concatenated`` (the official code's): :math:`\sqrt{\sum_a \lVert p_{i,a} - e_{j_a}\rVert_2^2}`,
  the distance between the concatenated per-attribute probabilities and the concatenated
  per-attribute one-hots of joint class :math:`j = (j_1, \dots)`.

They agree for a single attribute. For a joint group they differ in what a wrong class costs:
for a confidently classified image the joint cost is :math:`\sqrt 2` whether one attribute or
all of them must change, so OT is indifferent between the two; the concatenated cost is
:math:`\sqrt{2m}` for m changed attributes and prefers assignments that change fewer attributes
per image.

Images without a detected face are excluded up front (their rows get no target).
"""

from __future__ import annotations

import functools
import itertools
import math
from dataclasses import dataclass
from typing import Callable, Literal, Mapping

import numpy as np
import ot
from scipy.special import gammaln
from scipy.stats import binom

from fairness.seeding import numpy_rng
from fairness.targets.distributions import TargetGroup

Method = Literal["auto", "binary", "exact", "truncated", "monte_carlo"]
JointCost = Literal["joint", "concatenated"]
ENUMERATION_LIMIT = 100_000  # count vectors; one ot.emd solve each
MAP_LIMIT = 65_536  # image-to-class maps scored at once instead of ot.emd solves (K^N)


@dataclass(frozen=True)
class AttributeTargets:
    """Per-image targets of one attribute: class index (-1: no target), confidence, q."""

    targets: np.ndarray
    confidence: np.ndarray
    q: np.ndarray


def class_cost(p: np.ndarray) -> np.ndarray:
    """(N, K) Euclidean distance of each image's probabilities to each class's one-hot."""
    return ot.dist(p, np.eye(p.shape[1]), metric="euclidean")


def _transport_rows(cost: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Exact OT of N images onto classes with ``counts`` (sum N) under ``cost``: (N, K) plan x N."""
    n = cost.shape[0]
    plan = ot.emd(np.full(n, 1.0 / n), counts.astype(np.float64) / n, cost)
    return plan * n


@functools.lru_cache(maxsize=8)
def _all_maps(n: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Every map of N images to K classes, (K^N, N), and each map's count-vector code."""
    maps = np.array(list(itertools.product(range(k), repeat=n)), dtype=np.int64).reshape(-1, n)
    counts = (maps[:, :, None] == np.arange(k)).sum(1)
    return maps, _count_codes(counts, n)


def _count_codes(counts: np.ndarray, n: int) -> np.ndarray:
    """One integer per count vector (its digits in base N + 1)."""
    return counts @ ((n + 1) ** np.arange(counts.shape[1], dtype=np.int64))


def expected_plan(cost: np.ndarray, counts: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """``sum_c w_c * plan_c`` over count vectors ``counts`` (M, K): the (N, K) expectation of the
    exact OT plans, each scaled to rows summing to 1.

    The marginals are integers over N, so each optimal plan is a vertex of the transport polytope:
    a map of every image to one class with the given counts. When there are at most
    :data:`MAP_LIMIT` maps (K^N: 4 images over 8 joint classes have 4,096), all are scored at
    once and the cheapest of each count vector is taken; that is the plan ``ot.emd`` solves for,
    without one solver call per count vector (the demo's joint targets: ~300 calls per prompt).
    Larger problems call ``ot.emd`` per count vector."""
    n, k = cost.shape
    if k ** n > MAP_LIMIT:
        return sum(w * _transport_rows(cost, c) for w, c in zip(weights, counts))
    maps, codes = _all_maps(n, k)
    total = cost[np.arange(n), maps].sum(1)
    order = np.lexsort((total, codes))  # by count vector, cheapest first
    first_codes, first = np.unique(codes[order], return_index=True)
    best = maps[order[first[np.searchsorted(first_codes, _count_codes(np.asarray(counts), n))]]]
    q = np.zeros((n, k))
    np.add.at(q, (np.broadcast_to(np.arange(n), best.shape), best), np.asarray(weights, dtype=np.float64)[:, None])
    return q


def _count_vectors(n: int, k: int) -> np.ndarray:
    """All vectors of k non-negative integers summing to n (stars and bars)."""
    if k == 1:
        return np.array([[n]])
    out = []
    for first in range(n + 1):
        rest = _count_vectors(n - first, k - 1)
        out.append(np.concatenate([np.full((len(rest), 1), first), rest], axis=1))
    return np.concatenate(out)


def _multinomial_logpmf(counts: np.ndarray, probs: np.ndarray) -> np.ndarray:
    n = counts.sum(1)
    with np.errstate(divide="ignore"):
        logp = np.log(probs)
    terms = np.where(counts > 0, counts * logp, 0.0)
    return gammaln(n + 1) - gammaln(counts + 1).sum(1) + terms.sum(1)


def num_count_vectors(n: int, k: int) -> int:
    return math.comb(n + k - 1, k - 1)


def binary_q(p1: np.ndarray, d1: float) -> np.ndarray:
    """Closed form for K = 2: ``q[:, 1] = P(Bin(N, d1) > rank)`` with ranks by ``p1`` descending."""
    n = len(p1)
    order = np.argsort(-p1, kind="stable")
    rank = np.empty(n, dtype=np.int64)
    rank[order] = np.arange(n)
    q1 = binom.sf(rank, n, d1)
    return np.stack([1.0 - q1, q1], axis=1)


def binary_tolerance(n: int, d1: float, threshold: float) -> tuple[int, int]:
    """The class-1 counts of an N-image batch for which the alignment loss is silent.

    With a sure classifier the k class-1 images take ranks 0..k-1, and the loss pushes an image
    only where its confident target (``max q >= threshold``) differs from its class. Ranks
    0..lo-1 get confident class-1 targets and ranks hi..N-1 confident class-0 ones, so every
    batch with ``lo <= k <= hi`` class-1 images gets no alignment gradient at all. A threshold
    above 0.5 widens this band around ``N * d1``: the paper's N = 24, C = 0.8 tolerates 10-14
    of 24, i.e. a per-prompt bias up to 0.17 toward a 50/50 target. Returns ``(lo, hi)``.
    """
    if n < 1:
        raise ValueError(f"a batch needs at least one image, got {n}")
    q = binary_q(np.linspace(1.0, 0.0, n), d1)  # ranks 0..N-1 in order
    confident, target = q.max(1) >= threshold, q.argmax(1)
    return int((confident & (target == 1)).sum()), n - int((confident & (target == 0)).sum())


def reachable_confidence(share: float, n: int) -> float:
    """The highest confidence a target of a class with target share ``share`` can reach in a
    batch of ``n`` images: an image is matched to the class only in draws holding at least one
    target of it, so ``q[i, k] <= P(count_k >= 1) = 1 - (1 - share)^n`` for any cost (the binary
    closed form attains it at rank 0). Where that falls below the threshold C, no image ever gets
    a confident target of the class, and the alignment loss can push images *away* from it but
    never toward it: its share ends below its target.
    """
    return 1.0 - (1.0 - share) ** n


class UnreachableTargetWarning(UserWarning):
    """A target class can never get a confident target at the batch size and threshold."""


@dataclass(frozen=True)
class UnreachableTarget:
    attribute: str
    cls: str
    share: float
    images: int
    threshold: float

    @property
    def bound(self) -> float:
        return reachable_confidence(self.share, self.images)

    def message(self) -> str:
        need = math.ceil(math.log1p(-self.threshold) / math.log1p(-self.share)) if self.threshold < 1 else None
        more = f" or raise train.images_per_prompt to {need}" if need else ""
        return (f"{self.attribute}={self.cls!r} (target share {self.share:.3g}) can never get a confident target at "
                f"train.images_per_prompt={self.images}: the highest confidence OT can give it is "
                f"1 - (1 - {self.share:.3g})^{self.images} = {self.bound:.3f}, below its confidence threshold "
                f"{self.threshold:.3g}. The alignment loss would push images away from {self.cls!r} but never toward "
                f"it, so its share would end below the target. Lower loss.confidence_threshold for "
                f"{self.attribute} to at most {math.floor(self.bound * 100) / 100:.2f}{more}")


def unreachable_targets(groups: list[TargetGroup], images: int,
                        threshold: Callable[[str], float]) -> list[UnreachableTarget]:
    """Every (attribute, class) with a positive target share that no image of an ``images``-image
    batch can confidently target under ``threshold(attribute)`` (:func:`reachable_confidence`)."""
    out = []
    for g in groups:
        for attr, classes in zip(g.attributes, g.classes):
            c = threshold(attr)
            for cls, share in zip(classes, g.marginal(attr)):
                if share > 0 and reachable_confidence(float(share), images) < c:
                    out.append(UnreachableTarget(attr, cls, float(share), images, c))
    return out


def check_enumerable(n: int, k: int, method: str, limit: int = ENUMERATION_LIMIT) -> None:
    """Refuse an enumeration of more than ``limit`` count vectors, naming the way out."""
    count = num_count_vectors(n, k)
    if count > limit:
        raise ValueError(
            f"ot_method {method!r} would enumerate {count:.3g} class-count vectors for N={n} images over K={k} "
            f"classes (limit {limit:,}); use ot_method 'monte_carlo' (or 'auto') for a problem this size")


def enumerated_q(cost: np.ndarray, d: np.ndarray, mass: float = 1.0) -> np.ndarray:
    """Expectation over count vectors under ``cost`` (N, K): all of them for ``mass`` 1 (``exact``),
    else the most probable ones covering ``mass`` of the multinomial probability (``truncated``)."""
    n, k = cost.shape
    check_enumerable(n, k, "exact" if mass >= 1 else "truncated")
    counts = _count_vectors(n, k)
    logw = _multinomial_logpmf(counts, d)
    order = np.argsort(-logw, kind="stable")
    w = np.exp(logw[order])
    # Count vectors of probability 0 (a class the target excludes) change nothing: skip their solves.
    keep = int(np.searchsorted(np.cumsum(w), mass * w.sum()) + 1) if mass < 1 else int((w > 0).sum())
    return expected_plan(cost, counts[order[:keep]], w[:keep] / w[:keep].sum())


def monte_carlo_q(cost: np.ndarray, d: np.ndarray, samples: int, rng: np.random.Generator) -> np.ndarray:
    """Average OT plans over ``samples`` iid target sets (each solved once per distinct draw)."""
    draws = rng.multinomial(len(cost), d, size=samples)
    unique, mult = np.unique(draws, axis=0, return_counts=True)
    return expected_plan(cost, unique, mult / samples)


def expected_assignment(
    p: np.ndarray,
    d: np.ndarray,
    *,
    method: Method = "auto",
    seed: int = 0,
    samples: int = 200,
    mass: float = 0.95,
    max_enumeration: int = 5000,
    key: str = "",
    cost: np.ndarray | None = None,
) -> np.ndarray:
    """:math:`q` for images with class probabilities ``p`` (N, K) and target ``d`` (K,).

    ``cost`` (N, K) is the transport cost of image i to class k (default :func:`class_cost`);
    ``binary`` sorts by ``p`` and needs none. ``mass`` applies to ``truncated`` (and ``auto``,
    which enumerates truncated when at most ``max_enumeration`` count vectors exist).
    """
    p = np.asarray(p, dtype=np.float64)
    d = np.asarray(d, dtype=np.float64)
    if p.ndim != 2 or p.shape[1] != d.shape[0]:
        raise ValueError(f"probabilities {p.shape} do not match a target over {d.shape[0]} classes")
    if len(p) == 0:
        return np.zeros((0, len(d)))
    if not np.isfinite(p).all():
        raise ValueError("class probabilities contain NaN or inf")
    if method == "auto":
        if len(d) == 2:
            method = "binary"
        elif num_count_vectors(len(p), len(d)) <= max_enumeration:
            method = "truncated"
        else:
            method = "monte_carlo"
    if method == "binary":
        if len(d) != 2:
            raise ValueError("the binary closed form needs exactly 2 classes")
        return binary_q(p[:, 1], float(d[1]))
    cost = class_cost(p) if cost is None else np.asarray(cost, dtype=np.float64)
    if cost.shape != p.shape:
        raise ValueError(f"cost {cost.shape} does not match probabilities {p.shape}")
    if method == "exact":
        return enumerated_q(cost, d, 1.0)
    if method == "truncated":
        return enumerated_q(cost, d, mass)
    if method == "monte_carlo":
        return monte_carlo_q(cost, d, samples, numpy_rng(seed, "ot-targets", key))
    raise ValueError(f"unknown assignment method {method!r}")


def joint_probabilities(group: TargetGroup, probs: Mapping[str, np.ndarray]) -> np.ndarray:
    """Per-image probabilities over the joint classes (outer product of the attributes')."""
    out = np.asarray(probs[group.attributes[0]], dtype=np.float64)
    for attr in group.attributes[1:]:
        nxt = np.asarray(probs[attr], dtype=np.float64)
        out = (out[:, :, None] * nxt[:, None, :]).reshape(len(out), out.shape[1] * nxt.shape[1])
    return out


def concatenated_cost(group: TargetGroup, probs: Mapping[str, np.ndarray]) -> np.ndarray:
    """(N, K_joint) official-code cost: distance of the concatenated per-attribute probabilities to
    the concatenated per-attribute one-hots of each joint class (joint classes in row-major order,
    as :func:`joint_probabilities` and ``group.flat()`` order them)."""
    p = np.concatenate([np.asarray(probs[a], dtype=np.float64) for a in group.attributes], axis=1)
    classes = np.unravel_index(np.arange(group.num_joint_classes), group.probs.shape)
    onehots = np.concatenate([np.eye(k)[c] for k, c in zip(group.probs.shape, classes)], axis=1)
    return ot.dist(p, onehots, metric="euclidean")


def assign_targets(
    groups: list[TargetGroup],
    probs: Mapping[str, np.ndarray],
    valid: np.ndarray | None = None,
    *,
    seed: int = 0,
    method: Method = "auto",
    samples: int = 200,
    mass: float = 0.95,
    joint_cost: JointCost = "joint",
) -> dict[str, AttributeTargets]:
    """Targets for every attribute of every group; invalid images (no face) get target -1.

    For a joint group, OT runs over the joint classes (under ``joint_cost``, see the module
    docstring) and each attribute's target comes from the marginal of ``q`` (SPEC section 1).
    """
    n = len(next(iter(probs.values())))
    valid = np.ones(n, dtype=bool) if valid is None else np.asarray(valid, dtype=bool)
    out: dict[str, AttributeTargets] = {}
    for g in groups:
        missing = [a for a in g.attributes if a not in probs]
        if missing:
            raise KeyError(f"no classifier probabilities for attribute(s) {missing}")
        sub = {a: np.asarray(probs[a])[valid] for a in g.attributes}
        cost = concatenated_cost(g, sub) if joint_cost == "concatenated" else None
        q_joint = expected_assignment(
            joint_probabilities(g, sub), g.flat(), method=method, seed=seed, samples=samples, mass=mass, key=g.name,
            cost=cost,
        ).reshape((-1,) + g.probs.shape)
        for axis, attr in enumerate(g.attributes):
            other = tuple(i + 1 for i in range(len(g.attributes)) if i != axis)
            q = q_joint.sum(axis=other) if other else q_joint
            full_q = np.zeros((n, q.shape[1]))
            full_q[valid] = q
            targets = np.full(n, -1, dtype=np.int64)
            conf = np.zeros(n)
            if len(q):
                targets[valid] = q.argmax(1)
                conf[valid] = q.max(1)
            out[attr] = AttributeTargets(targets=targets, confidence=conf, q=full_q)
    return out
