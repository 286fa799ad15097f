"""The ``toyworld.*`` bundle backends: the names ``bundle.json`` gives each network's factory.

:mod:`fairness.perception.bundle` imports :mod:`fairness.toyworld.perception` (and so this
module) the first time a bundle names a ``toyworld.`` backend.
"""

from __future__ import annotations

from typing import Any

from fairness.perception.bundle import register_backend
from fairness.toyworld.perception.classifier import ToyClassifier
from fairness.toyworld.perception.clip import ToyCLIP
from fairness.toyworld.perception.detector import ToyDetector
from fairness.toyworld.perception.encoder import ToyEmbedder, ToyEncoder


@register_backend("toyworld.detector")
def _make_detector(config: dict[str, Any]) -> ToyDetector:
    return ToyDetector(**config)


@register_backend("toyworld.classifier")
def _make_classifier(config: dict[str, Any]) -> ToyClassifier:
    return ToyClassifier(**config)


@register_backend("toyworld.encoder")
def _make_encoder(config: dict[str, Any]) -> ToyEncoder:
    return ToyEncoder(**config)


@register_backend("toyworld.clip")
def _make_clip(config: dict[str, Any]) -> ToyCLIP:
    return ToyCLIP(**config)


@register_backend("toyworld.embedder")
def _make_embedder(config: dict[str, Any]) -> ToyEmbedder:
    return ToyEmbedder(**config)
