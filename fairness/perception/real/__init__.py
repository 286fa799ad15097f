"""Real perception backends (MTCNN, open_clip CLIP, DINOv2, FaceNet) for bundles of real models.

Importing this package registers every ``real.*`` backend with
:func:`fairness.perception.bundle.register_backend`; ``build_component`` imports it on the first
``real.`` backend name. Weights are found through :mod:`.weights` (local files, folders or the
Hugging Face cache; offline mode honoured); nothing here imports Ray.
"""

from fairness.perception.real import dino, face_embedders, mtcnn, openclip, zero_shot
from fairness.perception.real.dino import EVAL_DINO, TRAIN_DINO, DinoEncoder
from fairness.perception.real.face_embedders import ClipFaceEmbedder, FacenetEmbedder
from fairness.perception.real.mtcnn import MTCNNConfig, MTCNNDetector
from fairness.perception.real.openclip import (
    EVAL_CLIP_MODEL,
    EVAL_CLIP_PRETRAINED,
    TRAIN_CLIP_MODEL,
    TRAIN_CLIP_PRETRAINED,
    OpenClipConfig,
    OpenClipEncoder,
    load_open_clip,
)
from fairness.perception.real.weights import MissingWeightsError, WeightsRequest, offline_mode, resolve_weights
from fairness.perception.real.zero_shot import ZeroShotClassifier

__all__ = [
    "ClipFaceEmbedder", "DinoEncoder", "EVAL_CLIP_MODEL", "EVAL_CLIP_PRETRAINED", "EVAL_DINO", "FacenetEmbedder",
    "MTCNNConfig", "MTCNNDetector", "MissingWeightsError", "OpenClipConfig", "OpenClipEncoder", "TRAIN_CLIP_MODEL",
    "TRAIN_CLIP_PRETRAINED", "TRAIN_DINO", "WeightsRequest", "ZeroShotClassifier", "dino", "face_embedders",
    "load_open_clip", "mtcnn", "offline_mode", "openclip", "resolve_weights", "zero_shot",
]
