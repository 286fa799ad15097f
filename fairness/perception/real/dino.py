"""``real.dinov2``: DINOv2 (transformers ``Dinov2Model``) as an image encoder for L_img and DINO.

DINOv2 sees structure and identity that CLIP's language-aligned space ignores, which is why
the paper keeps the image close under both. The embedding is the CLS token after the final
layer norm (``pooler_output``), L2-normalised; preprocessing is a differentiable resize and
center crop to ``image_size`` with ImageNet statistics.

``source`` is a Hub id or a local folder saved with ``save_pretrained`` (``config.json`` plus
``model.safetensors``); ``model_config`` (a ``Dinov2Config`` dict) builds seeded random weights.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from fairness.perception.base import ImageEncoder
from fairness.perception.bundle import register_backend
from fairness.perception.real.config import check_keys, precision_dtype, seeded
from fairness.perception.real.preprocess import IMAGENET_MEAN, IMAGENET_STD, Preprocess, module_dtype
from fairness.perception.real.weights import WeightsRequest, hub_id_of, resolve_weights

# The paper's DINOv2: ViT-B/14 for training, ViT-g/14 for evaluation.
TRAIN_DINO = "facebook/dinov2-base"
EVAL_DINO = "facebook/dinov2-giant"

_FILES = (("config.json",), ("model.safetensors", "pytorch_model.bin"))
_KEYS = {"name", "source", "model_config", "local_files_only", "cache_dir", "precision", "image_size",
         "resize_size", "interpolation", "seed"}


class DinoEncoder(ImageEncoder):
    """Unit-norm float32 CLS embeddings of ``[0, 1]`` images of any size."""

    def __init__(self, model: torch.nn.Module, preprocess: Preprocess, name: str = "dino"):
        super().__init__()
        self.name = name
        self.model = model
        self.preprocess = preprocess

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        out = self.model(pixel_values=self.preprocess(images, module_dtype(self.model)))
        return F.normalize(out.pooler_output.float(), dim=-1)


def load_dinov2(source: str | None = TRAIN_DINO, model_config: dict[str, Any] | None = None, *,
                root: Path | None = None, cache_dir: str | None = None, local_files_only: bool = False,
                seed: int = 0) -> torch.nn.Module:
    """A frozen ``Dinov2Model`` from a Hub id / local folder, or random from ``model_config``."""
    from transformers import Dinov2Config, Dinov2Model

    if model_config is not None:
        with seeded(seed):
            model = Dinov2Model(Dinov2Config(**model_config))
    else:
        if not source:
            raise ValueError("real.dinov2: set 'source' (a Hub id or local folder) or 'model_config'")
        request = WeightsRequest(backend="real.dinov2", field="config.source", files=_FILES, hub_id=hub_id_of(source),
                                 what=f"DINOv2 {source!r} (the paper uses {TRAIN_DINO} to train, {EVAL_DINO} to evaluate)")
        config_path, weights_path = resolve_weights(source, request, root=root, cache_dir=cache_dir,
                                                    local_files_only=local_files_only)
        config = Dinov2Config.from_json_file(str(config_path))
        model = Dinov2Model.from_pretrained(str(weights_path.parent), config=config, local_files_only=True)
    return model.eval().requires_grad_(False)


@register_backend("real.dinov2")
def _make(config: dict[str, Any], root: Path | None = None) -> DinoEncoder:
    check_keys(config, _KEYS, "real.dinov2")
    dtype = precision_dtype(config.get("precision", "fp32"), "real.dinov2")
    model = load_dinov2(config.get("source", TRAIN_DINO), config.get("model_config"), root=root,
                        cache_dir=config.get("cache_dir"), local_files_only=bool(config.get("local_files_only", False)),
                        seed=int(config.get("seed", 0)))
    size = int(config.get("image_size", 224))
    preprocess = Preprocess(size=size, mean=IMAGENET_MEAN, std=IMAGENET_STD,
                            interpolation=config.get("interpolation", "bicubic"), resize_mode="shortest",
                            resize_size=config.get("resize_size"))
    return DinoEncoder(model.to(dtype), preprocess, name=config.get("name", "dino"))
