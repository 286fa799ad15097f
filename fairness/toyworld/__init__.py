"""The embedded toy world: a grammar of prompts with known biased laws, its renderer, its
perception bundle and its Stable-Diffusion model (both shipped under ``assets/``)."""

from __future__ import annotations

from pathlib import Path

DEFAULT_ASSETS = Path(__file__).parent / "assets"


def default_model_dir() -> Path:
    """The shipped diffusers pipeline folder (``fairness toyworld build`` writes it)."""
    return DEFAULT_ASSETS / "sd"


def default_perception_dir() -> Path:
    """The shipped perception bundle folder."""
    return DEFAULT_ASSETS / "perception"
