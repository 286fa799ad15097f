"""Resolving prompt sets and drawing prompts deterministically per iteration."""

from __future__ import annotations

import numpy as np

from fairness.config import PromptSet
from fairness.seeding import numpy_rng


def resolve_prompts(ps: PromptSet) -> list[str]:
    """The prompts of one set, from an inline list, a corpus file, or a toy-world split."""
    if ps.prompts is not None:
        out = list(ps.prompts)
    elif ps.file is not None:
        from fairness.data.prompts import read_corpus

        out = read_corpus(ps.file).prompts
    else:
        from fairness.toyworld import world

        assert ps.toyworld is not None
        unknown = set(ps.toyworld) - {"split", "templates", "contexts", "family"}
        if unknown:
            raise ValueError(f"prompt set {ps.name!r}: unknown toyworld key(s) {sorted(unknown)}")
        out = world.prompts(ps.toyworld.get("split", "train"), ps.toyworld.get("templates", "seen"),
                            ps.toyworld.get("contexts", "seen"))
        family = ps.toyworld.get("family")
        if family is not None:
            out = [p for p in out if (c := world.parse_prompt(p)[0]) is not None and c.family == family]
    if not out:
        raise ValueError(f"prompt set {ps.name!r} has no prompts")
    if ps.limit is not None and ps.limit < len(out):
        keep = np.sort(numpy_rng(ps.limit_seed, "prompt-subset", ps.name).permutation(len(out))[: ps.limit])
        out = [out[i] for i in keep]
    empty = [i for i, p in enumerate(out) if not p.strip()]
    if empty:
        raise ValueError(f"prompt set {ps.name!r}: empty prompt(s) at row(s) {empty[:10]}")
    return out


class PromptSampler:
    """Weighted mixture of prompt sets; iteration ``step`` always draws the same prompt."""

    def __init__(self, sets: list[PromptSet], seed: int):
        if not sets:
            raise ValueError("no training prompt sets configured")
        self.sets = [(ps.name, resolve_prompts(ps)) for ps in sets]
        w = np.asarray([ps.weight for ps in sets], dtype=np.float64)
        self.weights = w / w.sum()
        self.seed = seed

    def draw(self, step: int, *more_keys: int) -> tuple[str, str]:
        """(set name, prompt) for iteration ``step`` (``more_keys``: which of its prompts)."""
        rng = numpy_rng(self.seed, "prompt", step, *more_keys)
        name, prompts = self.sets[int(rng.choice(len(self.sets), p=self.weights))]
        return name, prompts[int(rng.integers(len(prompts)))]

    def all_prompts(self) -> list[str]:
        return [p for _, ps in self.sets for p in ps]
