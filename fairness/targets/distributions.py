"""Target distributions: what the user wants the generated attributes to follow.

Users state targets per attribute (independent), jointly over several attributes, or
conditionally ("old 25% within every gender x race group"). Every form compiles to a list of
:class:`TargetGroup` — a set of attributes with one joint distribution over the product of
their classes — which is what the OT target assignment consumes. Attributes in different
groups are aligned independently.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np

Probabilities = Mapping[str, float]


class TargetError(ValueError):
    """A target distribution that cannot be used; the message says exactly why."""


@dataclass(frozen=True)
class TargetGroup:
    """Attributes aligned jointly, with ``probs`` over the product of their classes.

    ``probs`` has shape ``(K_1, ..., K_m)`` in the order of ``attributes``; it is the target
    the DAL matches, a batch at a time.
    """

    attributes: tuple[str, ...]
    classes: tuple[tuple[str, ...], ...]
    probs: np.ndarray

    @property
    def name(self) -> str:
        return "*".join(self.attributes)

    @property
    def num_joint_classes(self) -> int:
        return int(self.probs.size)

    def flat(self) -> np.ndarray:
        return self.probs.reshape(-1)

    def marginal(self, attribute: str) -> np.ndarray:
        axis = self.attributes.index(attribute)
        other = tuple(i for i in range(len(self.attributes)) if i != axis)
        return self.probs.sum(axis=other) if other else self.probs.copy()

    def laws(self) -> dict[str, np.ndarray]:
        """The target law of each attribute and, for two or more, of their joint (flat, row-major),
        keyed as the audit names its bias entries (``"tone"``, ``"tone*color"``)."""
        out = {a: self.marginal(a) for a in self.attributes}
        if len(self.attributes) > 1:
            out[self.name] = self.flat()
        return out


def _check_probs(where: str, probs: Probabilities, classes: list[str]) -> np.ndarray:
    """Validate a ``{class: p}`` mapping against ``classes``; returns p in class order."""
    if not probs:
        raise TargetError(f"{where}: the distribution is empty")
    unknown = [c for c in probs if c not in classes]
    if unknown:
        raise TargetError(f"{where}: unknown class(es) {unknown}; known classes are {classes}")
    _check_numbers(where, probs)
    return np.asarray([float(probs.get(c, 0.0)) for c in classes], dtype=np.float64)


def _check_numbers(where: str, probs: Probabilities) -> None:
    """The numbers of a ``{class: p}`` mapping: each finite and >= 0, summing to 1 (1e-6)."""
    if not probs:
        raise TargetError(f"{where}: the distribution is empty")
    for c, p in probs.items():
        if isinstance(p, bool) or not isinstance(p, (int, float)):
            raise TargetError(f"{where}: probability of {c!r} must be a number, got {p!r}")
        if not math.isfinite(p):
            raise TargetError(f"{where}: probability of {c!r} is not finite ({p})")
        if p < 0:
            raise TargetError(f"{where}: probability of {c!r} is negative ({p})")
    total = sum(float(p) for p in probs.values())
    if abs(total - 1.0) > 1e-6:
        raise TargetError(f"{where}: probabilities sum to {total:.6g}, not 1")


def _check_dist(where: str, spec: Any) -> None:
    if spec == "uniform":
        return
    if not isinstance(spec, Mapping):
        raise TargetError(f"{where}: expected 'uniform' or a mapping class -> probability, got {spec!r}")
    _check_numbers(where, spec)


def check_target_numbers(spec: "TargetSpec") -> None:
    """Validate what a target states without knowing the classifier: its shape and every
    probability (finite, non-negative, summing to 1). Runs at config load, before any model or
    bundle is read; class and attribute names are checked by :meth:`TargetSpec.compile`."""
    if not spec.marginals and not spec.joint and not spec.conditional:
        raise TargetError("target is empty: give marginals, joint and/or conditional distributions")
    if spec.marginals is not None and not isinstance(spec.marginals, Mapping):
        raise TargetError(f"target.marginals: expected a mapping attribute -> distribution, got {spec.marginals!r}")
    for attr, dist in (spec.marginals or {}).items():
        _check_dist(f"target.marginals.{attr}", dist)
    if spec.joint:
        if not isinstance(spec.joint, Mapping) or "attributes" not in spec.joint:
            raise TargetError("target.joint needs 'attributes' (a list) and 'probs'")
        _check_dist("target.joint.probs", spec.joint.get("probs", "uniform"))
    for i, cond in enumerate(spec.conditional):
        where = f"target.conditional[{i}]"
        if not isinstance(cond, Mapping):
            raise TargetError(f"{where}: expected a mapping with 'attribute', 'given' and 'probs', got {cond!r}")
        probs = cond.get("probs")
        if isinstance(probs, Mapping) and probs and all(isinstance(v, Mapping) for v in probs.values()):
            for key, dist in probs.items():
                _check_dist(f"{where}.probs[{str(key).replace(' ', '')}]", dist)
        else:
            _check_dist(f"{where}.probs", probs)


def _uniform_or(where: str, spec: Any, classes: list[str]) -> np.ndarray:
    if spec == "uniform":
        return np.full(len(classes), 1.0 / len(classes))
    if not isinstance(spec, Mapping):
        raise TargetError(f"{where}: expected 'uniform' or a mapping class -> probability, got {spec!r}")
    return _check_probs(where, spec, classes)


def _check_attribute(name: str, known: Mapping[str, list[str]]) -> list[str]:
    if name not in known:
        raise TargetError(f"unknown attribute {name!r}; the classifier knows {sorted(known)}")
    return list(known[name])


@dataclass(frozen=True)
class TargetSpec:
    """A user's target, as written in a config.

    * ``marginals``: ``{attribute: "uniform" | {class: p}}``, each aligned on its own;
    * ``joint``: ``{"attributes": [a, b], "probs": "uniform" | {"cls_a,cls_b": p}}``;
    * ``conditional``: list of ``{"attribute": a, "given": [b, c], "probs": {...} or
      {"cls_b,cls_c": {...}}}`` — a's distribution within every group of the ``given``
      attributes (one distribution for all groups, or one per group). The ``given``
      attributes must be in ``joint`` (or in ``marginals``, which are then joined).
    """

    marginals: Mapping[str, Any] | None = None
    joint: Mapping[str, Any] | None = None
    conditional: tuple[Mapping[str, Any], ...] = ()

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "TargetSpec":
        unknown = set(data) - {"marginals", "joint", "conditional"}
        if unknown:
            raise TargetError(f"target: unknown key(s) {sorted(unknown)}; use marginals / joint / conditional")
        return cls(
            marginals=data.get("marginals"),
            joint=data.get("joint"),
            conditional=tuple(data.get("conditional") or ()),
        )

    def compile(self, known: Mapping[str, list[str]]) -> list[TargetGroup]:
        """Validate against the classifier's ``known`` attributes and build the groups."""
        return compile_targets(self, known)


def _joint_key_probs(where: str, spec: Any, attrs: list[str], classes: list[list[str]]) -> np.ndarray:
    shape = tuple(len(c) for c in classes)
    if spec == "uniform":
        return np.full(shape, 1.0 / int(np.prod(shape)))
    if not isinstance(spec, Mapping):
        raise TargetError(f"{where}: expected 'uniform' or a mapping 'c1,c2' -> probability, got {spec!r}")
    names = [",".join(combo) for combo in itertools.product(*classes)]
    flat = _check_probs(where, {str(k).replace(" ", ""): v for k, v in spec.items()}, names)
    return flat.reshape(shape)


def compile_targets(spec: TargetSpec, known: Mapping[str, list[str]]) -> list[TargetGroup]:
    if not spec.marginals and not spec.joint and not spec.conditional:
        raise TargetError("target is empty: give marginals, joint and/or conditional distributions")
    groups: list[TargetGroup] = []
    marg: dict[str, np.ndarray] = {}
    for attr, dist in (spec.marginals or {}).items():
        classes = _check_attribute(attr, known)
        marg[attr] = _uniform_or(f"target.marginals.{attr}", dist, classes)

    joint_attrs: list[str] = []
    joint_probs: np.ndarray | None = None
    if spec.joint:
        if not isinstance(spec.joint, Mapping) or "attributes" not in spec.joint:
            raise TargetError("target.joint needs 'attributes' (a list) and 'probs'")
        joint_attrs = list(spec.joint["attributes"])
        if len(joint_attrs) < 2 or len(set(joint_attrs)) != len(joint_attrs):
            raise TargetError(f"target.joint.attributes must name 2+ distinct attributes, got {joint_attrs}")
        overlap = [a for a in joint_attrs if a in marg]
        if overlap:
            raise TargetError(f"attribute(s) {overlap} appear in both target.marginals and target.joint")
        classes = [_check_attribute(a, known) for a in joint_attrs]
        joint_probs = _joint_key_probs("target.joint.probs", spec.joint.get("probs", "uniform"), joint_attrs, classes)

    for i, cond in enumerate(spec.conditional):
        where = f"target.conditional[{i}]"
        attr, given = cond.get("attribute"), list(cond.get("given") or [])
        if not isinstance(attr, str) or not given:
            raise TargetError(f"{where}: needs 'attribute' and a non-empty 'given' list")
        a_classes = _check_attribute(attr, known)
        for g in given:
            _check_attribute(g, known)
        if attr in given or attr in marg or attr in joint_attrs:
            raise TargetError(f"{where}: {attr!r} is already targeted elsewhere")
        # Pull marginal-only 'given' attributes into the joint (as independent factors).
        for g in given:
            if g not in joint_attrs:
                if g not in marg:
                    raise TargetError(f"{where}: conditioning attribute {g!r} has no target of its own")
                base = joint_probs if joint_probs is not None else np.ones(())
                joint_probs = np.multiply.outer(base, marg.pop(g))
                joint_attrs.append(g)
        assert joint_probs is not None
        cond_probs = cond.get("probs")
        group_shape = tuple(len(known[a]) for a in given)
        table = np.empty(group_shape + (len(a_classes),))
        if isinstance(cond_probs, Mapping) and all(isinstance(v, Mapping) for v in cond_probs.values()) and cond_probs:
            given_classes = [list(known[g]) for g in given]
            wanted = {",".join(c) for c in itertools.product(*given_classes)}
            keys = {str(k).replace(" ", ""): v for k, v in cond_probs.items()}
            missing, extra = sorted(wanted - set(keys)), sorted(set(keys) - wanted)
            if missing or extra:
                raise TargetError(f"{where}.probs: groups missing {missing}, unknown {extra}")
            for combo in itertools.product(*[range(n) for n in group_shape]):
                key = ",".join(given_classes[j][c] for j, c in enumerate(combo))
                table[combo] = _uniform_or(f"{where}.probs[{key}]", keys[key], a_classes)
        else:
            table[...] = _uniform_or(f"{where}.probs", cond_probs, a_classes)
        # Joint over (joint_attrs..., attr) = P(joint_attrs) * P(attr | given attributes).
        axes = [joint_attrs.index(g) for g in given]
        cond_full = np.empty(joint_probs.shape + (len(a_classes),))
        for idx in np.ndindex(*joint_probs.shape):
            cond_full[idx] = table[tuple(idx[a] for a in axes)]
        joint_probs = joint_probs[..., None] * cond_full
        joint_attrs.append(attr)

    for attr, p in marg.items():
        groups.append(TargetGroup((attr,), (tuple(known[attr]),), p))
    if joint_probs is not None:
        groups.append(TargetGroup(tuple(joint_attrs), tuple(tuple(known[a]) for a in joint_attrs), joint_probs))
    return groups

