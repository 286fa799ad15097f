"""Adapter folders a stock diffusers pipeline loads, plus a small manifest.

LoRA: ``pytorch_lora_weights.safetensors`` written by ``StableDiffusionPipeline.save_lora_weights``
(loaded with ``pipe.load_lora_weights(dir)``). Soft tokens: ``learned_embeds.safetensors`` in
textual-inversion format (``pipe.load_textual_inversion(dir, token="<fair>")``, then start every
prompt with ``<fair>``). ``adapter.json`` records which one it is, the prompt prefix, and the
base model it was trained on (``base_model``: its path and a hash of its text encoder's and
U-Net's architecture configs). :func:`load_adapter_into` refuses an adapter whose base hashes
differ from the pipeline's: a LoRA loaded into another architecture fails with a shape error
deep in peft, or, worse, loads into same-named layers and silently does something else.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from diffusers import StableDiffusionPipeline
from peft.utils import get_peft_model_state_dict
from safetensors.torch import save_file

from fairness.adapters.trainable import ADAPTER_NAME, TrainableAdapter

MANIFEST = "adapter.json"
TI_WEIGHTS = "learned_embeds.safetensors"
LORA_WEIGHTS = "pytorch_lora_weights.safetensors"
KINDS = ("text_lora", "unet_lora", "both_lora", "soft_tokens")
# Text-encoder config fields that define the architecture (the rest is bookkeeping). Not the
# vocabulary size: soft tokens grow it, so a soft-token adapter's own base would not match.
TEXT_ENCODER_KEYS = ("model_type", "hidden_size", "intermediate_size", "projection_dim",
                     "num_hidden_layers", "num_attention_heads", "max_position_embeddings", "hidden_act")


class AdapterMismatchError(ValueError):
    """An adapter trained on another base model than the pipeline it is loaded into."""


def _config_hash(config: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:16]


def base_model_identity(pipe: StableDiffusionPipeline) -> dict[str, Any]:
    """What an adapter needs of its base: the text encoder's and the U-Net's architecture
    (config hashes; versions, dtypes and paths left out) and, for information, the model path."""
    te = pipe.text_encoder.config.to_dict()
    unet = {k: v for k, v in dict(pipe.unet.config).items() if not k.startswith("_")}
    return {"path": getattr(pipe, "name_or_path", None),
            "text_encoder_config": _config_hash({k: te.get(k) for k in TEXT_ENCODER_KEYS}),
            "unet_config": _config_hash(unet)}


def export_adapter(adapter: TrainableAdapter, out_dir: str | Path, extra: dict[str, Any] | None = None) -> Path:
    """Write ``adapter`` so that :func:`load_adapter_into` (or plain diffusers) loads it."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    spec, pipe = adapter.spec, adapter.pipe
    manifest: dict[str, Any] = {"kind": spec.kind, "format_version": 1, "base_model": base_model_identity(pipe),
                                **(extra or {})}
    if spec.kind == "soft_tokens":
        save_file({"emb_params": adapter.soft_token_embeddings().float().contiguous()}, str(out / TI_WEIGHTS))
        manifest.update(token=spec.token, num_tokens=spec.num_tokens, prompt_prefix=spec.token + " ")
    else:
        kwargs: dict[str, Any] = {}
        if spec.on_text:
            kwargs["text_encoder_lora_layers"] = get_peft_model_state_dict(pipe.text_encoder, adapter_name=ADAPTER_NAME)
            kwargs["text_encoder_lora_adapter_metadata"] = pipe.text_encoder.peft_config[ADAPTER_NAME].to_dict()
        if spec.on_unet:
            kwargs["unet_lora_layers"] = get_peft_model_state_dict(pipe.unet, adapter_name=ADAPTER_NAME)
            kwargs["unet_lora_adapter_metadata"] = pipe.unet.peft_config[ADAPTER_NAME].to_dict()
        StableDiffusionPipeline.save_lora_weights(str(out), safe_serialization=True, **kwargs)
        manifest.update(rank=spec.rank, prompt_prefix="")
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True))
    return out


def read_adapter_manifest(adapter_dir: str | Path) -> dict[str, Any]:
    """The manifest of an adapter folder, checked: the folder, ``adapter.json`` (valid JSON with
    a known ``kind``) and the weights file that kind needs must all be there."""
    folder = Path(adapter_dir)
    if not folder.is_dir():
        raise FileNotFoundError(f"adapter folder not found: {folder}")
    path = folder / MANIFEST
    if not path.exists():
        raise FileNotFoundError(f"{adapter_dir} is not a fairness adapter (missing {MANIFEST})")
    try:
        manifest = json.loads(path.read_text())
    except ValueError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc}); re-export the adapter with `fairness export`") from None
    kind = manifest.get("kind") if isinstance(manifest, dict) else None
    if kind not in KINDS:
        raise ValueError(f"{path}: unknown adapter kind {kind!r}; expected one of {list(KINDS)}")
    weights = TI_WEIGHTS if kind == "soft_tokens" else LORA_WEIGHTS
    if not (folder / weights).exists():
        raise FileNotFoundError(f"{adapter_dir}: {MANIFEST} says kind {kind!r} but {weights} is missing")
    return manifest


def check_base_model(pipe: StableDiffusionPipeline, manifest: dict[str, Any], adapter_dir: str | Path) -> None:
    """Raise :class:`AdapterMismatchError` when ``manifest`` names another base than ``pipe``.
    Adapters exported before ``base_model`` was recorded are not checked."""
    trained = manifest.get("base_model")
    if not trained:
        return
    here = base_model_identity(pipe)
    parts = {"text_encoder_config": "text encoder", "unet_config": "U-Net"}
    differ = [k for k in parts if trained.get(k) != here[k]]
    if differ:
        raise AdapterMismatchError(
            f"adapter {adapter_dir} was trained on base model {trained.get('path')!r}, which differs from this "
            f"pipeline ({here['path']!r}) in its {' and '.join(parts[d] for d in differ)} (config hash "
            f"{', '.join(f'{trained.get(d)} != {here[d]}' for d in differ)}); load it into the model it was trained on")


def load_adapter_into(pipe: StableDiffusionPipeline, adapter_dir: str | Path, adapter_name: str | None = None) -> str:
    """Load an exported adapter into a stock pipeline; returns the prompt prefix to use.

    For LoRA several adapters may be loaded under different ``adapter_name``s and switched
    with ``pipe.set_adapters``. Refuses an adapter trained on another base model
    (:func:`check_base_model`).
    """
    manifest = read_adapter_manifest(adapter_dir)
    check_base_model(pipe, manifest, adapter_dir)
    if manifest["kind"] == "soft_tokens":
        pipe.load_textual_inversion(str(Path(adapter_dir) / TI_WEIGHTS), token=manifest["token"])
        return manifest["prompt_prefix"]
    pipe.load_lora_weights(str(adapter_dir), adapter_name=adapter_name or ADAPTER_NAME)
    return ""
