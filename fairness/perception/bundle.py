"""A perception bundle: every network the losses and metrics look through, loaded from a folder.

A bundle folder holds ``bundle.json``::

    {
      "components": {
        "detector":         {"backend": "toyworld.detector", "weights": "detector.safetensors", "config": {...}},
        "train_classifier": {...}, "eval_classifier": {...},
        "encoders": {"clip": {...}, "dino": {...}},
        "text_image_encoder": {...},
        "face_embedder": {...}
      },
      "semantic_encoders": ["clip", "dino"],      # encoders used by the training loss L_img
      "eval_encoders": {"clip_i": "clip", "dino": "dino"},   # metric name -> encoder
      "face_bank": "face_bank.safetensors"
    }

``backend`` names a factory registered with :func:`register_backend`; the module that defines
it is imported on first use (see ``_BACKEND_MODULES``), so a bundle of real models never imports
the toy world and vice versa.
"""

from __future__ import annotations

import importlib
import inspect
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors.torch import load_file
from torch import nn

from fairness.perception.base import (
    AttributeClassifier,
    FaceEmbedder,
    ImageEncoder,
    RegionDetector,
    TextImageEncoder,
)

BackendFactory = Callable[[dict[str, Any]], Any]
_BACKENDS: dict[str, BackendFactory] = {}
# backend-name prefix -> module that registers it (imported lazily).
_BACKEND_MODULES = {
    "toyworld.semantic_labeler": "fairness.toyworld.labels",
    "toyworld.": "fairness.toyworld.perception",
    "tiny.": "fairness.perception.tiny",
    "real.trained_head": "fairness.perception.heads",
    "real.": "fairness.perception.real",
}


def register_backend(name: str) -> Callable[[BackendFactory], BackendFactory]:
    """Decorator: ``@register_backend("toyworld.detector") def make(config): ...``."""

    def deco(fn: BackendFactory) -> BackendFactory:
        _BACKENDS[name] = fn
        return fn

    return deco


def build_component(spec: dict[str, Any], root: Path | None = None) -> Any:
    """Instantiate one component from ``{"backend", "config", "weights"}``.

    A factory that takes a second parameter also gets ``root`` (the bundle folder), so that
    the local weight paths in its config can be written relative to the bundle.
    """
    name = spec.get("backend")
    if not isinstance(name, str):
        raise ValueError(f"perception component needs a 'backend' name, got {spec!r}")
    for prefix, module in _BACKEND_MODULES.items():
        if name not in _BACKENDS and name.startswith(prefix):
            importlib.import_module(module)
    if name not in _BACKENDS:
        known = ", ".join(sorted(_BACKENDS)) or "none"
        raise KeyError(f"unknown perception backend {name!r} (registered: {known})")
    factory = _BACKENDS[name]
    config = dict(spec.get("config", {}))
    takes_root = len(inspect.signature(factory).parameters) > 1
    component = factory(config, root) if takes_root else factory(config)
    weights = spec.get("weights")
    if weights:
        path = Path(weights) if root is None else root / weights
        if not path.exists():
            raise FileNotFoundError(f"weights for backend {name!r} not found: {path}")
        component.load_state_dict(load_file(str(path)))
    if isinstance(component, nn.Module):
        component.eval().requires_grad_(False)
    return component


@dataclass
class PerceptionBundle:
    """Everything the losses and the evaluation see images through (all frozen)."""

    detector: RegionDetector
    train_classifier: AttributeClassifier
    eval_classifier: AttributeClassifier
    encoders: dict[str, ImageEncoder]
    semantic_encoders: list[str]
    eval_encoders: dict[str, str] = field(default_factory=dict)
    text_image_encoder: TextImageEncoder | None = None
    face_embedder: FaceEmbedder | None = None
    face_bank: torch.Tensor | None = None
    # Optional: prompt -> {semantic attribute: expected class (None = no object)}, for the
    # semantic-accuracy metric in worlds where the prompt fixes a class (the toy world).
    semantic_labeler: Callable[[str], dict[str, str | None] | None] | None = None
    # The specs the components were built from (bundle.json's "components", weights paths made
    # absolute); empty for bundles built in code. The audit compares the two classifiers' specs.
    component_specs: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        missing = [n for n in self.semantic_encoders + list(self.eval_encoders.values()) if n not in self.encoders]
        if missing:
            raise KeyError(f"bundle names encoders it does not define: {sorted(set(missing))}")
        if self.face_bank is not None and self.face_bank.ndim != 2:
            raise ValueError(f"face bank must be (M, D), got shape {tuple(self.face_bank.shape)}")

    @property
    def attributes(self) -> dict[str, list[str]]:
        return dict(self.train_classifier.attributes)

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> "PerceptionBundle":
        for module in self.modules():
            module.to(device=device, dtype=dtype) if dtype is not None else module.to(device)
        if self.face_bank is not None:
            self.face_bank = self.face_bank.to(device=device, dtype=dtype or self.face_bank.dtype)
        return self

    def modules(self) -> list[nn.Module]:
        parts: list[Any] = [self.detector, self.train_classifier, self.eval_classifier,
                            *self.encoders.values(), self.text_image_encoder, self.face_embedder]
        return [m for m in parts if isinstance(m, nn.Module)]


def _load_face_bank(root: Path, name: str) -> torch.Tensor:
    path = root / name
    if not path.exists():
        raise FileNotFoundError(
            f"face bank {path} (bundle.json 'face_bank') not found: build it from real face photos with "
            f"`fairness bank faces --images FACES_DIR --out {path} --perception {root}`")
    return load_file(str(path))["bank"]


def load_bundle(path: str | Path, face_bank: bool = True) -> PerceptionBundle:
    """Load a bundle folder (see module docstring). ``face_bank=False`` skips the bank, for the
    command that builds it from the bundle's own detector and embedder."""
    root = Path(path)
    manifest = root / "bundle.json"
    if not manifest.exists():
        raise FileNotFoundError(f"no perception bundle at {root} (missing bundle.json)")
    spec = json.loads(manifest.read_text())
    comps = spec["components"]
    for required in ("detector", "train_classifier", "eval_classifier"):
        if required not in comps:
            raise KeyError(f"{manifest}: components.{required} is required")
    bank = spec.get("face_bank")

    def resolved(c: Any) -> Any:  # bundle.json's components, every weights path made absolute
        if isinstance(c, dict) and "backend" in c:
            return {**c, "weights": str((root / c["weights"]).resolve())} if c.get("weights") else dict(c)
        return {k: resolved(v) for k, v in c.items()} if isinstance(c, dict) else c

    return PerceptionBundle(
        detector=build_component(comps["detector"], root),
        train_classifier=build_component(comps["train_classifier"], root),
        eval_classifier=build_component(comps["eval_classifier"], root),
        encoders={k: build_component(v, root) for k, v in comps.get("encoders", {}).items()},
        semantic_encoders=list(spec.get("semantic_encoders", [])),
        eval_encoders=dict(spec.get("eval_encoders", {})),
        text_image_encoder=build_component(comps["text_image_encoder"], root) if "text_image_encoder" in comps else None,
        face_embedder=build_component(comps["face_embedder"], root) if "face_embedder" in comps else None,
        face_bank=_load_face_bank(root, bank) if bank and face_bank else None,
        semantic_labeler=build_component(comps["semantic_labeler"], root) if "semantic_labeler" in comps else None,
        component_specs=resolved(comps),
    )
