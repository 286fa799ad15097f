"""The toy world's semantic labeler: which shape a prompt asks for (CLIP-T's exact analog)."""

from __future__ import annotations

from typing import Any

from fairness.perception.bundle import register_backend
from fairness.toyworld import world


def expected_semantics(prompt: str) -> dict[str, str | None] | None:
    """``{"shape": ...}`` for a world prompt (None: scenery, no object); None if unparseable."""
    concept, _, _ = world.parse_prompt(prompt)
    if concept is None:
        return None
    return {"shape": concept.shape}


@register_backend("toyworld.semantic_labeler")
def _labeler(config: dict[str, Any]):
    return expected_semantics
