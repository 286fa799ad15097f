"""The toy world's perception networks and the build that trains them into a bundle.

The toy world plays the paper's whole perception stack with tiny networks, registered as
bundle backends (:mod:`.backends`) so the losses and metrics reach them through the same
interfaces as real models (MTCNN, CLIP, DINO, FairFace classifiers):

- ``toyworld.detector`` (:mod:`.detector`): a fully convolutional object-mask network; the box
  is the extent of the largest connected blob (the face-detector analog; not differentiated
  through).
- ``toyworld.classifier`` (:mod:`.classifier`): heads for the protected attributes
  (``attributes`` = the world's ``ATTRIBUTES``) plus the semantic ``shape`` head, exposed
  separately as ``semantic_attributes`` so debiasing targets can never name it. Two architecture
  variants (:mod:`.trunk`), so the evaluation classifier is independent of the training one
  (different architecture, seed and data, as in the paper).
- ``toyworld.encoder`` (:mod:`.encoder`): a self-supervised, augmentation-invariant image
  encoder (DINO analog).
- ``toyworld.clip`` (:mod:`.clip`): a small CLIP trained contrastively on the world's prompts
  (conv image tower + ``transformers.CLIPTextModel`` text tower; the tokenizer's BPE tables
  live in the bundle config, so raw prompt strings go straight into ``encode_text``).
- ``toyworld.embedder`` (:mod:`.encoder`): an augmentation-invariant crop embedder (the
  face-embedding analog) whose bank of real object crops (:mod:`.bank`) anchors the realism loss.

:func:`build_perception` (:mod:`.build`) renders data (:mod:`.data`), trains everything
(:mod:`.train`, on the shared loop in :mod:`.fit`), measures it (:mod:`.measure`) and writes
the bundle folder; ``python -m fairness.toyworld.perception OUT_DIR`` runs it.
"""

from __future__ import annotations

from fairness.toyworld.perception import backends as _backends  # noqa: F401  (registers toyworld.*)
from fairness.toyworld.perception.bank import face_bank
from fairness.toyworld.perception.build import (
    EMBEDDER,
    ENCODERS,
    EVAL_CLASSIFIER,
    TRAIN_CLASSIFIER,
    build_perception,
    main,
)
from fairness.toyworld.perception.classifier import ToyClassifier
from fairness.toyworld.perception.clip import TEXT_MAX_LENGTH, ToyCLIP, tokenizer_config
from fairness.toyworld.perception.data import RenderedSet, natural_data
from fairness.toyworld.perception.detector import EDGE_THRESHOLD, MIN_BLOB_PIXELS, ToyDetector
from fairness.toyworld.perception.encoder import ToyEmbedder, ToyEncoder
from fairness.toyworld.perception.measure import (
    measure_classifier,
    measure_clip,
    measure_detector,
    measure_embedder,
    measure_encoder,
)

__all__ = [
    "EDGE_THRESHOLD",
    "EMBEDDER",
    "ENCODERS",
    "EVAL_CLASSIFIER",
    "MIN_BLOB_PIXELS",
    "TEXT_MAX_LENGTH",
    "TRAIN_CLASSIFIER",
    "RenderedSet",
    "ToyCLIP",
    "ToyClassifier",
    "ToyDetector",
    "ToyEmbedder",
    "ToyEncoder",
    "build_perception",
    "face_bank",
    "main",
    "measure_classifier",
    "measure_clip",
    "measure_detector",
    "measure_embedder",
    "measure_encoder",
    "natural_data",
    "tokenizer_config",
]
