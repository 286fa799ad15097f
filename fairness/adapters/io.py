"""Adapter folders a stock diffusers pipeline loads, plus a small manifest.

LoRA: ``pytorch_lora_weights.safetensors`` written by ``StableDiffusionPipeline.save_lora_weights``
(loaded with ``pipe.load_lora_weights(dir)``). Soft tokens: ``learned_embeds.safetensors`` in
textual-inversion format (``pipe.load_textual_inversion(dir, token="<fair>")``, then start every
prompt with ``<fair>``). ``adapter.json`` records which one it is and the prompt prefix.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from diffusers import StableDiffusionPipeline
from peft.utils import get_peft_model_state_dict
from safetensors.torch import save_file

from fairness.adapters.trainable import ADAPTER_NAME, TrainableAdapter

MANIFEST = "adapter.json"
TI_WEIGHTS = "learned_embeds.safetensors"


def export_adapter(adapter: TrainableAdapter, out_dir: str | Path, extra: dict[str, Any] | None = None) -> Path:
    """Write ``adapter`` so that :func:`load_adapter_into` (or plain diffusers) loads it."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    spec, pipe = adapter.spec, adapter.pipe
    manifest: dict[str, Any] = {"kind": spec.kind, "format_version": 1, **(extra or {})}
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
    path = Path(adapter_dir) / MANIFEST
    if not path.exists():
        raise FileNotFoundError(f"{adapter_dir} is not a fairness adapter (missing {MANIFEST})")
    return json.loads(path.read_text())


def load_adapter_into(pipe: StableDiffusionPipeline, adapter_dir: str | Path, adapter_name: str | None = None) -> str:
    """Load an exported adapter into a stock pipeline; returns the prompt prefix to use.

    For LoRA several adapters may be loaded under different ``adapter_name``s and switched
    with ``pipe.set_adapters``.
    """
    manifest = read_adapter_manifest(adapter_dir)
    if manifest["kind"] == "soft_tokens":
        pipe.load_textual_inversion(str(Path(adapter_dir) / TI_WEIGHTS), token=manifest["token"])
        return manifest["prompt_prefix"]
    pipe.load_lora_weights(str(adapter_dir), adapter_name=adapter_name or ADAPTER_NAME)
    return ""
