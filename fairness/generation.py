"""Generation with an exported adapter loaded the stock-diffusers way (audit, generate, serve).

The finetuned model and "the frozen model from the same noise" both come from one pipeline:
LoRA adapters are switched off with ``disable_lora``; soft tokens by leaving out the prefix.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
from diffusers import StableDiffusionPipeline

from fairness.adapters.io import load_adapter_into, read_adapter_manifest
from fairness.dft.engine import SamplingConfig, generate
from fairness.models.loading import load_pipeline, resolve_model_path

DEFAULTS_FILE = "fairness_defaults.json"


def sampling_defaults(model: str) -> dict[str, float]:
    """Steps / guidance a model ships in ``fairness_defaults.json`` (SD defaults otherwise)."""
    out = {"num_inference_steps": 20, "guidance_scale": 7.5}
    path = Path(resolve_model_path(model)) / DEFAULTS_FILE
    if path.exists():
        out.update(json.loads(path.read_text()))
    return out


@dataclass
class LoadedModel:
    pipe: StableDiffusionPipeline
    prefix: str
    is_lora: bool

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        c = self.pipe.unet.config
        return (c.in_channels, c.sample_size, c.sample_size)

    @contextlib.contextmanager
    def original(self) -> Iterator[None]:
        if self.is_lora:
            self.pipe.disable_lora()
        try:
            yield
        finally:
            if self.is_lora:
                self.pipe.enable_lora()

    def generate(self, prompts: list[str], noise: torch.Tensor, sampling: SamplingConfig, original: bool = False) -> torch.Tensor:
        """Images of the debiased model, or of the frozen one (``original=True``), from ``noise``."""
        with torch.no_grad():
            if original:
                with self.original():
                    return generate(self.pipe, list(prompts), noise, sampling)
            # diffusers expands a multi-vector textual-inversion token ("<fair>" -> "<fair> <fair>_1 ...").
            expanded = [self.pipe.maybe_convert_prompt(self.prefix + p, self.pipe.tokenizer) for p in prompts]
            return generate(self.pipe, expanded, noise, sampling)


def load_model(model: str, adapter: str | None = None, dtype: str = "float32", device: str = "auto") -> LoadedModel:
    """The pipeline with ``adapter`` loaded. A bad adapter folder fails before the pipeline
    loads; one trained on another base model fails before its weights touch the pipeline."""
    kind = read_adapter_manifest(adapter)["kind"] if adapter is not None else None
    pipe = load_pipeline(model, dtype, device)
    if adapter is None:
        return LoadedModel(pipe, "", False)
    prefix = load_adapter_into(pipe, adapter)
    return LoadedModel(pipe, prefix, kind != "soft_tokens")
