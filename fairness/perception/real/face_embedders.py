"""Face embedders for the face-realism loss: CLIP's image tower or FaceNet.

``real.clip_face_embedder`` (the default) reuses the training CLIP on the face crop: no extra
download, and it is the network already on the GPU. ``real.facenet_embedder`` is
facenet-pytorch's InceptionResnetV1, an identity embedder closer to the paper's OpenSphere one;
its weights are *not* in the wheel (facenet downloads them at run time), so the user provides
the file through ``weights_file``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from fairness.perception.base import FaceEmbedder
from fairness.perception.bundle import register_backend
from fairness.perception.real.config import check_keys, seeded
from fairness.perception.real.openclip import OpenClipEncoder, clip_from_config
from fairness.perception.real.preprocess import Preprocess, module_dtype
from fairness.perception.real.weights import MissingWeightsError, WeightsRequest, resolve_weights

# facenet-pytorch's released InceptionResnetV1 weights (name -> URL); the wheel has none of them.
FACENET_WEIGHTS = {
    "vggface2": "https://github.com/timesler/facenet-pytorch/releases/download/v2.2.9/20180402-114759-vggface2.pt",
    "casia-webface": "https://github.com/timesler/facenet-pytorch/releases/download/v2.2.9/20180408-102900-casia-webface.pt",
}
FACENET_SIZE = 160


class ClipFaceEmbedder(FaceEmbedder):
    """The CLIP image tower on the face crop (unit-norm float32 embeddings)."""

    def __init__(self, encoder: OpenClipEncoder):
        super().__init__()
        self.encoder = encoder
        self.input_size = encoder.image_size

    def forward(self, crops: torch.Tensor) -> torch.Tensor:
        return self.encoder(crops)


class FacenetEmbedder(FaceEmbedder):
    """InceptionResnetV1 on 160 px crops, FaceNet's ``(255 x - 127.5) / 128`` standardisation."""

    def __init__(self, network: torch.nn.Module):
        super().__init__()
        self.network = network
        self.input_size = FACENET_SIZE
        # (255 x - 127.5) / 128 == (x - 127.5/255) / (128/255)
        self.preprocess = Preprocess(size=FACENET_SIZE, mean=(127.5 / 255,) * 3, std=(128 / 255,) * 3,
                                     interpolation="bilinear", resize_mode="squash")

    def forward(self, crops: torch.Tensor) -> torch.Tensor:
        out = self.network(self.preprocess(crops, module_dtype(self.network)))
        return F.normalize(out.float(), dim=-1)


def facenet_network(weights_file: str | None, pretrained: str | None = "vggface2", random_init: bool = False,
                    seed: int = 0, root: Path | None = None) -> torch.nn.Module:
    """InceptionResnetV1 with the user's weights file, or seeded random weights for tests."""
    from facenet_pytorch import InceptionResnetV1

    if pretrained is not None and pretrained not in FACENET_WEIGHTS:
        raise ValueError(f"real.facenet_embedder: pretrained must be one of {sorted(FACENET_WEIGHTS)} or null")
    with seeded(seed):
        net = InceptionResnetV1(pretrained=None, classify=False)
    if weights_file is None:
        if random_init:
            return net
        url = FACENET_WEIGHTS[pretrained or "vggface2"]
        raise MissingWeightsError(
            "real.facenet_embedder: no weights_file set (InceptionResnetV1's weights are not inside the "
            f"facenet-pytorch wheel). Download {url}, put it next to bundle.json (or anywhere) and set "
            f"config.weights_file to its path (e.g. {Path(url).name!r}); or set random_init: true for tests.")
    url = FACENET_WEIGHTS[pretrained or "vggface2"]
    request = WeightsRequest(backend="real.facenet_embedder", what=f"InceptionResnetV1 ({pretrained or 'custom'})",
                             field="config.weights_file", files=((Path(url).name,),), url=url)
    (path,) = resolve_weights(weights_file, request, root=root)
    state = torch.load(path, map_location="cpu", weights_only=True)
    state = state.get("state_dict", state)
    # The released files carry the identity-classification layer; an embedder does not use it.
    net.load_state_dict({k: v for k, v in state.items() if not k.startswith("logits.")}, strict=True)
    return net


@register_backend("real.clip_face_embedder")
def _clip_embedder(config: dict[str, Any], root: Path | None = None) -> ClipFaceEmbedder:
    clip = clip_from_config(dict(config), root, "real.clip_face_embedder")
    return ClipFaceEmbedder(OpenClipEncoder(clip, name="clip_face"))


@register_backend("real.facenet_embedder")
def _facenet_embedder(config: dict[str, Any], root: Path | None = None) -> FacenetEmbedder:
    check_keys(config, {"weights_file", "pretrained", "random_init", "seed"}, "real.facenet_embedder")
    return FacenetEmbedder(facenet_network(config.get("weights_file"), config.get("pretrained", "vggface2"),
                                           bool(config.get("random_init", False)), int(config.get("seed", 0)), root))
