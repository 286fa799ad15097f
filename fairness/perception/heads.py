"""Attribute classifiers made of a backbone and one linear head per attribute (``real.trained_head``).

Two backbones, as in the paper's official code and its common alternative:

- ``"mobilenet_v3_large"``: torchvision's MobileNetV3-Large, fine-tuned with the heads (the
  official classifiers; ImageNet initialisation with ``imagenet_init``). Its weights travel
  with the component.
- ``"open_clip"``: a *frozen* image encoder (any bundle component, built through
  :func:`fairness.perception.bundle.build_component` from ``backbone_spec``, e.g. a
  ``real.open_clip`` ViT) with linear heads on its embedding (a linear probe). The encoder is
  held outside the module tree, so ``state_dict`` / ``load_state_dict`` hold the heads only
  and the component's weights file stays small; the encoder loads from its own spec.

Preprocessing is differentiable torch (the alignment loss backpropagates through it): a
bilinear resize to ``input_size`` and, for MobileNet, ImageNet normalisation. Encoders take
``[0, 1]`` images and normalise for themselves (the :class:`ImageEncoder` contract).

Component spec::

    {"backend": "real.trained_head", "weights": "classifier.safetensors",
     "config": {"attributes": {"gender": ["male", "female"]}, "backbone": "mobilenet_v3_large",
                "input_size": 224}}
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from fairness.perception.base import AttributeClassifier
from fairness.perception.bundle import register_backend
from fairness.perception.real.preprocess import IMAGENET_MEAN, IMAGENET_STD

BACKBONES = ("mobilenet_v3_large", "open_clip")


def resize(images: torch.Tensor, size: int) -> torch.Tensor:
    """Differentiable bilinear resize to ``size`` x ``size`` (antialiased when shrinking)."""
    if images.shape[-2:] == (size, size):
        return images
    shrink = images.shape[-1] > size or images.shape[-2] > size
    return F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False, antialias=shrink)


def imagenet_weights_path(imagenet_init: bool | str) -> Path:
    """Where the ImageNet MobileNetV3-Large weights are read from (torch hub's cache by default)."""
    from torchvision.models import MobileNet_V3_Large_Weights

    if isinstance(imagenet_init, str):
        return Path(imagenet_init).expanduser()
    url = MobileNet_V3_Large_Weights.IMAGENET1K_V1.url
    return Path(torch.hub.get_dir()) / "checkpoints" / url.rsplit("/", 1)[-1]


def _load_imagenet(model: nn.Module, imagenet_init: bool | str) -> None:
    from torchvision.models import MobileNet_V3_Large_Weights

    path = imagenet_weights_path(imagenet_init)
    url = MobileNet_V3_Large_Weights.IMAGENET1K_V1.url
    if path.exists():
        state = torch.load(path, map_location="cpu", weights_only=True)
    elif imagenet_init is True:
        try:
            state = torch.hub.load_state_dict_from_url(url, map_location="cpu", progress=True)
        except Exception as exc:  # no network, proxy, hub refused ...
            raise FileNotFoundError(
                f"ImageNet weights for mobilenet_v3_large are not in the torch hub cache ({path}) and could not "
                f"be downloaded ({type(exc).__name__}: {exc}). Download {url} on a machine with internet and put "
                f"it there (or give imagenet_init=<path to the .pth>), or train from random initialisation "
                f"(imagenet_init false)."
            ) from exc
    else:
        raise FileNotFoundError(f"ImageNet weights for mobilenet_v3_large not found: {path} (download {url})")
    model.load_state_dict(state)


def mobilenet_trunk(imagenet_init: bool | str = False) -> tuple[nn.Module, int]:
    """MobileNetV3-Large up to its penultimate layer (1280 features), and that width.

    Its classifier's first block (960 -> 1280, hardswish, dropout) stays: it is pretrained too,
    and the official heads replace only the last linear layer.
    """
    from torchvision.models import mobilenet_v3_large

    net = mobilenet_v3_large(weights=None)
    if imagenet_init:
        _load_imagenet(net, imagenet_init)
    width = net.classifier[-1].in_features
    trunk = nn.Sequential(net.features, net.avgpool, nn.Flatten(1), *list(net.classifier.children())[:-1])
    return trunk, width


class TrainedHeadClassifier(AttributeClassifier):
    """Backbone + one ``Linear`` head per attribute; see the module docstring.

    ``backbone_spec`` (for ``"open_clip"``) is a bundle component spec of an
    :class:`~fairness.perception.base.ImageEncoder`, built with ``root`` (the bundle folder)
    for its relative paths. ``input_size`` defaults to the encoder's ``image_size`` (else 224).
    """

    def __init__(self, attributes: dict[str, list[str]], backbone: str = "mobilenet_v3_large",
                 input_size: int | None = None, backbone_spec: dict[str, Any] | None = None,
                 imagenet_init: bool | str = False, dropout: float = 0.0, root: str | Path | None = None):
        super().__init__()
        if not attributes:
            raise ValueError("a trained-head classifier needs at least one attribute")
        for name, classes in attributes.items():
            if len(classes) < 2 or len(set(classes)) != len(classes):
                raise ValueError(f"attribute {name!r} needs two or more distinct classes, got {classes}")
        if backbone not in BACKBONES:
            raise ValueError(f"unknown backbone {backbone!r}; choose one of {', '.join(BACKBONES)}")
        self.attributes = {k: list(v) for k, v in attributes.items()}
        self.backbone_name = backbone
        self.frozen_backbone = backbone == "open_clip"
        if self.frozen_backbone:
            if not backbone_spec:
                raise ValueError("backbone 'open_clip' needs backbone_spec: a bundle component spec of an image "
                                 "encoder, e.g. {\"backend\": \"real.open_clip\", \"config\": {...}}")
            from fairness.perception.bundle import build_component

            encoder = build_component(dict(backbone_spec), Path(root) if root is not None else None)
            if not isinstance(encoder, nn.Module):
                raise TypeError(f"backbone_spec built a {type(encoder).__name__}, not a torch module")
            encoder.eval().requires_grad_(False)
            # Not a submodule: its weights stay out of state_dict() and parameters() (see _apply).
            self.__dict__["_encoder"] = encoder
            size = getattr(encoder, "image_size", None)
            self.input_size = int(input_size or (size if isinstance(size, int) else 224))
            width = self._embedding_width(encoder)
            self.trunk = None
            # Encoders return unit vectors; scaling by sqrt(D) gives the heads unit-scale inputs.
            self.feature_scale = math.sqrt(width)
        else:
            self.input_size = int(input_size or 224)
            self.trunk, width = mobilenet_trunk(imagenet_init)
            self.feature_scale = 1.0
            self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
            self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        self.dropout = nn.Dropout(dropout)
        self.heads = nn.ModuleDict({a: nn.Linear(width, len(c)) for a, c in self.attributes.items()})

    def _embedding_width(self, encoder: nn.Module) -> int:
        visual = getattr(getattr(encoder, "model", None), "visual", None)  # an open_clip model's image tower
        for owner, attr in ((encoder, "embed_dim"), (encoder, "dim"), (encoder, "output_dim"), (visual, "output_dim")):
            value = getattr(owner, attr, None)
            if isinstance(value, int) and value > 0:
                return value
        param = next(iter(encoder.parameters()), None)
        probe = torch.zeros(1, 3, self.input_size, self.input_size,
                            device=param.device if param is not None else None,
                            dtype=param.dtype if param is not None else None)
        with torch.no_grad():
            return int(encoder(probe).shape[-1])

    @property
    def encoder(self) -> nn.Module | None:
        """The frozen image encoder (``"open_clip"`` backbone), else None."""
        return self.__dict__.get("_encoder")

    def _apply(self, fn, *args, **kwargs):  # .to(), .cuda(), .half() also move the frozen encoder
        if self.encoder is not None:
            self.encoder._apply(fn, *args, **kwargs)
        return super()._apply(fn, *args, **kwargs)

    def train(self, mode: bool = True) -> "TrainedHeadClassifier":
        super().train(mode)
        if self.encoder is not None:
            self.encoder.eval()  # frozen: never in training mode
        return self

    def trainable_parameters(self) -> Iterator[nn.Parameter]:
        return (p for p in self.parameters() if p.requires_grad)

    def features(self, crops: torch.Tensor) -> torch.Tensor:
        x = resize(crops, self.input_size)
        if self.encoder is not None:
            z = self.encoder(x)
            return z.to(self.heads[next(iter(self.heads))].weight.dtype) * self.feature_scale
        x = (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)
        return self.trunk(x)

    def forward(self, crops: torch.Tensor) -> dict[str, torch.Tensor]:
        z = self.dropout(self.features(crops))
        return {a: head(z) for a, head in self.heads.items()}


@register_backend("real.trained_head")
def _trained_head(config: dict[str, Any], root: Path | None = None) -> TrainedHeadClassifier:
    return TrainedHeadClassifier(**config, root=root)
