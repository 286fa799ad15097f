"""Loading the generator and the perception bundle by hub id, local folder, or 'toyworld'."""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import StableDiffusionPipeline

from fairness.perception.bundle import PerceptionBundle, load_bundle

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_model_path(path: str) -> str:
    """'toyworld' -> the shipped toy model; anything else is passed to diffusers as is."""
    if path == "toyworld":
        from fairness.toyworld import default_model_dir

        return str(default_model_dir())
    return path


def load_pipeline(path: str, dtype: str = "float32", device: str = "auto") -> StableDiffusionPipeline:
    """A ``StableDiffusionPipeline`` with a clear error when the weights are missing."""
    resolved = resolve_model_path(path)
    local = Path(resolved)
    if (local.is_absolute() or resolved.startswith(".")) and not (local / "model_index.json").exists():
        raise FileNotFoundError(f"no diffusers pipeline at {local} (model_index.json missing)")
    try:
        pipe = StableDiffusionPipeline.from_pretrained(
            resolved, dtype=DTYPES[dtype], safety_checker=None, requires_safety_checker=False,
        )
    except OSError as exc:
        raise FileNotFoundError(
            f"could not load model {path!r}: {exc}. Give a local diffusers folder or a hub id you can reach."
        ) from exc
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(resolve_device(device))


def load_perception(path: str) -> PerceptionBundle:
    """'toyworld' -> the shipped toy perception bundle; otherwise a bundle folder."""
    if path == "toyworld":
        from fairness.toyworld import default_perception_dir

        path = str(default_perception_dir())
    return load_bundle(path)
