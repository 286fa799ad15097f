"""``real.open_clip``: an open_clip CLIP as image encoder and text encoder (CLIP-I, CLIP-T, L_img).

The architecture comes from open_clip's own model registry (``model: ViT-H-14``) or, for tests
and custom networks, from ``model_config`` (the dict open_clip keeps in its model-config JSON
files: ``embed_dim``, ``vision_cfg``, ``text_cfg``). The weights come from ``pretrained``: an
open_clip tag (``laion2b_s32b_b79k``), a Hub id (``hf-hub:laion/CLIP-ViT-H-14-laion2B-s32B-b79K``),
a local checkpoint file or folder, or ``null`` for random weights (seeded, so every worker of a
distributed run builds the same network). All lookups go through :mod:`.weights`.

Several bundle components usually look through one CLIP (the training classifier, the L_img
encoder and the face embedder all use ViT-H/14). Loaded models are shared per
(architecture, weights, precision) while a component holds them and nobody has moved them
off the CPU / to another dtype, so a freshly loaded bundle keeps one copy of each network
(on the GPU, one ViT-bigG instead of three).
"""

from __future__ import annotations

import copy
import functools
import json
import os
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from fairness.perception.base import TextImageEncoder
from fairness.perception.bundle import register_backend
from fairness.perception.real.config import check_keys, precision_dtype, seeded
from fairness.perception.real.preprocess import Preprocess, module_device, module_dtype
from fairness.perception.real.weights import WeightsRequest, hub_id_of, local_path, resolve_weights

# The paper's encoders: ViT-H/14 (LAION-2B) for training, ViT-bigG/14 for evaluation.
TRAIN_CLIP_MODEL = "ViT-H-14"
TRAIN_CLIP_PRETRAINED = "laion2b_s32b_b79k"
EVAL_CLIP_MODEL = "ViT-bigG-14"
EVAL_CLIP_PRETRAINED = "laion2b_s39b_b160k"

_CHECKPOINT_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
_SHARED: "weakref.WeakValueDictionary[tuple[str, str, str], nn.Module]" = weakref.WeakValueDictionary()


@dataclass(frozen=True)
class OpenClipConfig:
    """The ``config`` keys that pick a CLIP (shared by every open_clip-based backend).

    ``preprocess`` overrides the input transform open_clip would use (``mean``, ``std``,
    ``interpolation``, ``resize_mode``); ``grad_checkpointing`` trades compute for memory in the
    gradient pass (the paper's trick for fitting ViT-H in the loss).
    """

    model: str | None = TRAIN_CLIP_MODEL
    pretrained: str | None = TRAIN_CLIP_PRETRAINED
    model_config: dict[str, Any] | None = None
    cache_dir: str | None = None
    local_files_only: bool = False
    precision: str = "fp32"
    seed: int = 0
    grad_checkpointing: bool = False
    preprocess: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, config: dict[str, Any], backend: str) -> "OpenClipConfig":
        check_keys(config, cls.__dataclass_fields__, backend)
        cfg = cls(**config)
        precision_dtype(cfg.precision, backend)
        if cfg.model_config is None and not cfg.model:
            raise ValueError(f"{backend}: set 'model' (an open_clip architecture such as {TRAIN_CLIP_MODEL!r}) "
                             "or 'model_config'")
        return cfg


@dataclass
class LoadedClip:
    """A frozen open_clip model with the tokenizer and differentiable preprocessing it expects."""

    model: nn.Module
    tokenizer: Callable[[list[str]], torch.Tensor]
    preprocess: Preprocess


def load_open_clip(cfg: OpenClipConfig, root: Path | None = None, backend: str = "real.open_clip",
                   field_prefix: str = "config.") -> LoadedClip:
    """Build ``cfg``'s architecture and load its weights (shared with other components)."""
    import open_clip

    arch, pp = _architecture(cfg, root, backend, field_prefix)
    checkpoint, tag_pp = _checkpoint(cfg, root, backend, field_prefix)
    pp = {**pp, **tag_pp, **cfg.preprocess}
    key = (json.dumps(arch, sort_keys=True), str(checkpoint) if checkpoint else f"random:{cfg.seed}", cfg.precision)
    model = _SHARED.get(key)
    dtype = precision_dtype(cfg.precision, backend)
    if model is not None and (module_dtype(model) != dtype or module_device(model).type != "cpu"):
        model = None  # a bundle already moved it (bundle.to(device, dtype)): do not hand it out moved
    if model is None:
        model = build_open_clip(arch, cfg.seed)
        if checkpoint is not None:
            try:
                open_clip.load_checkpoint(model, str(checkpoint), strict=True)
            except RuntimeError as err:  # strict load: the checkpoint is another architecture
                raise RuntimeError(f"{backend}: {checkpoint} does not fit the configured architecture "
                                   f"({cfg.model or 'model_config'}): {err}") from err
        model = model.to(dtype).eval().requires_grad_(False)
        _SHARED[key] = model
    if cfg.grad_checkpointing:
        model.set_grad_checkpointing(True)
    size = arch["vision_cfg"].get("image_size", 224)
    if isinstance(size, (list, tuple)):
        if len(set(size)) != 1:
            raise ValueError(f"{backend}: only square CLIP inputs are supported, got image_size {size}")
        size = size[0]
    preprocess = Preprocess(size=int(size), mean=tuple(pp.get("mean", open_clip.OPENAI_DATASET_MEAN)),
                            std=tuple(pp.get("std", open_clip.OPENAI_DATASET_STD)),
                            interpolation=pp.get("interpolation", "bicubic"),
                            resize_mode=pp.get("resize_mode", "shortest"))
    return LoadedClip(model=model, tokenizer=_tokenizer(cfg, arch), preprocess=preprocess)


def _architecture(cfg: OpenClipConfig, root: Path | None, backend: str,
                  field_prefix: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """The model config dict and any preprocessing it carries (Hub / folder configs do)."""
    import open_clip

    if cfg.model_config is not None:
        missing = [k for k in ("embed_dim", "vision_cfg", "text_cfg") if k not in cfg.model_config]
        if missing:
            raise ValueError(f"{backend}: model_config lacks {missing}")
        return copy.deepcopy(cfg.model_config), {}
    assert cfg.model is not None
    builtin = _builtin_name(cfg.model)
    if builtin is not None:
        return open_clip.get_model_config(builtin), {}
    if hub_id_of(cfg.model) is None and not local_path(cfg.model, root).exists():
        raise ValueError(f"{backend}: unknown open_clip model {cfg.model!r}: not a built-in architecture "
                         f"(e.g. {TRAIN_CLIP_MODEL}, {EVAL_CLIP_MODEL}), a Hub id or a local folder")
    request = WeightsRequest(backend=backend, what=f"open_clip model config of {cfg.model}",
                             field=f"{field_prefix}model", files=(("open_clip_config.json",),),
                             hub_id=hub_id_of(cfg.model))
    (path,) = resolve_weights(cfg.model, request, root=root, cache_dir=cfg.cache_dir,
                              local_files_only=cfg.local_files_only)
    config = json.loads(Path(path).read_text())
    return config.get("model_cfg", config), config.get("preprocess_cfg", {})


def _checkpoint(cfg: OpenClipConfig, root: Path | None, backend: str,
                field_prefix: str) -> tuple[Path | None, dict[str, Any]]:
    """The local checkpoint file for ``cfg.pretrained`` (None: random weights), and the
    preprocessing an open_clip tag prescribes."""
    import open_clip

    if cfg.pretrained is None:
        return None, {}
    field_name = f"{field_prefix}pretrained"
    builtin = _builtin_name(cfg.model)
    tag_cfg = open_clip.get_pretrained_cfg(builtin, cfg.pretrained) if builtin else {}
    if tag_cfg:
        what = f"open_clip {cfg.model} weights (pretrained tag {cfg.pretrained!r})"
        pp = {k: tag_cfg[k] for k in ("mean", "std", "interpolation", "resize_mode") if k in tag_cfg}
        if tag_cfg.get("hf_hub"):
            # open_clip's convention: "org/name/" (default file names) or "org/name/file".
            repo, filename = os.path.split(tag_cfg["hf_hub"])
            files = ((filename,),) if filename else (_CHECKPOINT_FILES,)
            request = WeightsRequest(backend=backend, what=what, field=field_name, files=files, hub_id=repo)
            (path,) = resolve_weights(f"hf-hub:{repo}", request, cache_dir=cfg.cache_dir,
                                      local_files_only=cfg.local_files_only)
            return path, pp
        url = tag_cfg.get("url", "")
        cache = Path(cfg.cache_dir).expanduser() if cfg.cache_dir else Path("~/.cache/clip").expanduser()
        request = WeightsRequest(backend=backend, what=what, field=field_name,
                                 files=((os.path.basename(url),),), url=url)
        (path,) = resolve_weights(cache / os.path.basename(url), request)
        return path, pp
    request = WeightsRequest(backend=backend, what=f"open_clip {cfg.model or 'model_config'} weights from "
                             f"{cfg.pretrained!r}", field=field_name, files=(_CHECKPOINT_FILES,),
                             hub_id=hub_id_of(cfg.pretrained))
    (path,) = resolve_weights(cfg.pretrained, request, root=root, cache_dir=cfg.cache_dir,
                              local_files_only=cfg.local_files_only)
    return path, {}


def build_open_clip(arch: dict[str, Any], seed: int) -> nn.Module:
    """Instantiate the architecture with seeded random weights (the checkpoint, if any, follows)."""
    import open_clip

    cfg = copy.deepcopy(arch)
    text, vision = cfg.setdefault("text_cfg", {}), cfg.setdefault("vision_cfg", {})
    hf_text = "hf_model_name" in text
    if hf_text:
        text["hf_model_pretrained"] = False  # never download a text tower the checkpoint replaces
    if "timm_model_name" in vision:
        vision["timm_model_pretrained"] = False
    custom = cfg.pop("custom_text", False) or hf_text
    cls = open_clip.CoCa if "multimodal_cfg" in cfg else open_clip.CustomTextCLIP if custom else open_clip.CLIP
    with seeded(seed):
        return cls(**cfg)


def _builtin_name(model: str | None) -> str | None:
    """``model`` as one of open_clip's own architecture names, or None (Hub id, folder, unknown)."""
    import open_clip

    if not model or model.startswith("hf-hub:"):
        return None
    name = model.replace("/", "-")  # open_clip accepts the old "ViT-H/14" spelling
    return name if open_clip.get_model_config(name) is not None else None


def _tokenizer(cfg: OpenClipConfig, arch: dict[str, Any]) -> Callable[[list[str]], torch.Tensor]:
    text = arch.get("text_cfg", {})
    context = int(text.get("context_length", 77))
    if text.get("hf_tokenizer_name"):  # an HF text tower (e.g. XLM-R) brings its own tokenizer
        from open_clip.tokenizer import HFTokenizer

        return HFTokenizer(text["hf_tokenizer_name"], context_length=context, cache_dir=cfg.cache_dir,
                           tokenizer_mode=text.get("tokenizer_mode"), **text.get("tokenizer_kwargs", {}))
    # A built-in architecture name lets open_clip pick its tokenizer (SigLIP's differ); anything
    # else (model_config, a Hub or folder config) uses the config already read, without lookups.
    builtin = _builtin_name(cfg.model) if cfg.model_config is None else None
    return _cached_tokenizer(builtin or "", context, None, json.dumps(text.get("tokenizer_kwargs", {}), sort_keys=True))


@functools.lru_cache(maxsize=8)
def _cached_tokenizer(model: str, context: int, cache_dir: str | None,
                      kwargs_json: str) -> Callable[[list[str]], torch.Tensor]:
    """Tokenizers are stateless and slow to build (the BPE table is parsed each time): share them."""
    import open_clip

    if model:
        return open_clip.get_tokenizer(model, context_length=context, cache_dir=cache_dir)
    return open_clip.SimpleTokenizer(context_length=context, **json.loads(kwargs_json))


class OpenClipEncoder(TextImageEncoder):
    """CLIP image tower (L2-normalised, float32 out) plus ``encode_text`` in the same space.

    Input images are ``[0, 1]`` at any size; resizing, cropping and normalisation are
    differentiable, and the input is cast to the model's dtype (fp16 after ``bundle.to``).
    """

    def __init__(self, clip: LoadedClip, name: str = "clip"):
        super().__init__()
        self.name = name
        self.model = clip.model
        self.tokenizer = clip.tokenizer
        self.preprocess = clip.preprocess

    @property
    def image_size(self) -> int:
        return self.preprocess.size

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.preprocess(images, module_dtype(self.model))
        return F.normalize(self.model.encode_image(x).float(), dim=-1)

    def encode_text(self, prompts: list[str]) -> torch.Tensor:
        tokens = self.tokenizer(list(prompts)).to(module_device(self.model))
        return F.normalize(self.model.encode_text(tokens).float(), dim=-1)


def clip_from_config(config: dict[str, Any], root: Path | None, backend: str,
                     field_prefix: str = "config.") -> LoadedClip:
    """Parse and load a CLIP config dict (the helper the other CLIP-based backends use)."""
    return load_open_clip(OpenClipConfig.from_dict(config, backend), root, backend, field_prefix)


@register_backend("real.open_clip")
def _make(config: dict[str, Any], root: Path | None = None) -> OpenClipEncoder:
    config = dict(config)
    name = config.pop("name", "clip")
    return OpenClipEncoder(clip_from_config(config, root, "real.open_clip"), name=name)
