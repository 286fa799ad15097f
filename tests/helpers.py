"""Shared builders for the test suite: tiny pipelines, tiny bundles, tiny configs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fairness.config import DebiasConfig, set_dotted
from fairness.models.tiny import build_tiny_pipeline
from fairness.perception.tiny import build_tiny_bundle

ATTRS = {"gender": ["male", "female"], "race": ["a", "b", "c", "d"]}
PROMPTS = ["a photo of the doctor", "a photo of the nurse", "a photo of the engineer"]


def tiny_world(root: Path, detector_threshold: float = -1e9) -> tuple[Path, Path]:
    """Save a tiny SD pipeline and a tiny perception bundle under ``root``."""
    model, perception = root / "sd", root / "perception"
    if not (model / "model_index.json").exists():
        build_tiny_pipeline(seed=0).save_pretrained(model)
    build_tiny_bundle(perception, ATTRS, detector_threshold=detector_threshold)
    return model, perception


def tiny_config(root: Path, **over: Any) -> DebiasConfig:
    model, perception = tiny_world(root, over.pop("detector_threshold", -1e9))
    data: dict[str, Any] = {
        "name": "tiny",
        "model": {"path": str(model)},
        "perception": str(perception),
        "prompts": {"train": [{"prompts": PROMPTS[:2]}], "val": [{"prompts": PROMPTS[2:]}],
                    "test": [{"name": "test", "prompts": PROMPTS[2:]}]},
        "target": {"marginals": {"gender": "uniform"}},
        "adapter": {"rank": 4},
        "dft": {"steps": [3, 4], "eval_steps": 3},
        "train": {"iterations": 4, "images_per_prompt": 4, "checkpoint_every": 2, "val_images_per_prompt": 4, "lr": 1e-3},
        "audit_images_per_prompt": 4,
    }
    for dotted, value in over.items():
        set_dotted(data, dotted, value, sep="__")
    return DebiasConfig.model_validate(data)
