"""One base pipeline with several exported adapters: request checks and grouped batch generation.

The HTTP server (:mod:`pipelines.serve`) is a thin layer over this class; nothing here imports
Ray, so the same object can be driven from a test or a script.

* Adapters are loaded the stock-diffusers way (:func:`fairness.adapters.load_adapter_into`):
  LoRA adapters under their own names, switched with ``set_adapters([name])`` and switched off
  with ``disable_lora()`` for ``base`` and for soft-token adapters; soft-token adapters contribute
  a prompt prefix, expanded to all of its vectors as diffusers' ``maybe_convert_prompt`` does.
* Images are made with the library's sampler (:func:`fairness.dft.engine.generate`, plain
  sampling), and image ``i`` of a request starts from ``image_noise(seed, prompt, i)``: the same
  seed and prompt give the same images whatever else shares the batch, for every model (so
  ``base`` and an adapter can be compared image by image), and the same images as
  ``fairness generate --seed``.
* Inference-time peers (``baselines``: Fair Diffusion, distribution guidance, ethical
  intervention; :mod:`fairness.baselines`) are served as model names too, on the base weights
  (LoRA off), each toward the target law its spec names, so a client compares them with
  ``base`` and the adapters from the same seed.
"""

from __future__ import annotations

import copy
import re
import secrets
import time
from collections import defaultdict
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from fairness.adapters.io import load_adapter_into, read_adapter_manifest
from fairness.baselines.methods import SERVED_METHODS, Method, build_method, parse_served_baseline
from fairness.dft.engine import SamplingConfig, generate
from fairness.generation import LoadedModel, sampling_defaults
from fairness.models.loading import load_perception, load_pipeline
from fairness.seeding import image_noise
from pipelines.openai_images import MAX_SEED, ApiError, ImageGenerationRequest, parse_size, png_base64

BASE = "base"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


class ServiceConfig(BaseModel):
    """What is served and the limits a request must respect."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(description="hub id, local diffusers folder, or 'toyworld'")
    adapters: dict[str, str] = Field(default_factory=dict, description="model name -> exported adapter folder")
    baselines: dict[str, dict[str, Any]] = Field(
        default_factory=dict, description=f"model name -> a peer's method spec ({', '.join(SERVED_METHODS)}) with "
        "its target 'law' (docs/baselines.md)")
    perception: str | None = Field(None, description="perception bundle whose classifier names the attributes' "
                                                     "classes (needed with baselines)")
    default_model: str | None = Field(None, description="model used when a request names none (default: the "
                                                        "first adapter, else base)")
    max_n: int = Field(4, ge=1, description="most images per request")
    allowed_sizes: list[str] = Field(default_factory=list, description="sizes besides the model's native one")
    steps: int | None = Field(None, ge=1, description="default sampler steps (default: the model's, else 20)")
    max_steps: int = Field(50, ge=1)
    guidance_scale: float | None = Field(None, ge=0, description="CFG scale (default: the model's, else 7.5)")
    max_prompt_chars: int = Field(2000, ge=1, description="cheap bound checked before tokenising")
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    device: str = "auto"

    @field_validator("adapters")
    @classmethod
    def _names(cls, adapters: dict[str, str]) -> dict[str, str]:
        for name in adapters:
            if name == BASE or not _NAME.match(name):
                raise ValueError(f"adapter name {name!r} must match {_NAME.pattern} and not be {BASE!r}")
        return adapters

    @field_validator("baselines")
    @classmethod
    def _baselines(cls, baselines: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        for name, spec in baselines.items():
            if name == BASE or not _NAME.match(name):
                raise ValueError(f"baseline name {name!r} must match {_NAME.pattern} and not be {BASE!r}")
            parse_served_baseline(spec, f"baseline {name!r}")
        return baselines

    @field_validator("allowed_sizes")
    @classmethod
    def _sizes(cls, sizes: list[str]) -> list[str]:
        for size in sizes:
            try:
                parse_size(size)
            except ApiError as exc:
                raise ValueError(exc.message) from exc
        return sizes

    @model_validator(mode="after")
    def _default(self) -> "ServiceConfig":
        if self.default_model is not None and self.default_model not in (BASE, *self.adapters, *self.baselines):
            raise ValueError(f"default_model {self.default_model!r} is neither {BASE!r}, an adapter nor a baseline")
        clash = sorted(set(self.adapters) & set(self.baselines))
        if clash:
            raise ValueError(f"model name(s) {clash} name both an adapter and a baseline")
        if self.baselines and self.perception is None:
            raise ValueError("serving baselines needs a perception bundle (perception / --perception): its "
                             "classifier names the classes their edit texts and laws refer to")
        if self.steps is not None and self.steps > self.max_steps:
            raise ValueError(f"steps={self.steps} exceeds max_steps={self.max_steps}")
        return self


@dataclass(frozen=True)
class GenerationJob:
    """A checked request: ``prompt`` keys the noise, ``text`` is what the text encoder reads."""

    model: str
    prompt: str
    text: str
    n: int
    width: int
    height: int
    steps: int
    seed: int

    @property
    def size(self) -> str:
        return f"{self.width}x{self.height}"

    @property
    def group(self) -> tuple[str, int, int, int]:
        """Jobs with the same group run in one sampler call."""
        return (self.model, self.width, self.height, self.steps)


class ImageService:
    """The loaded base pipeline and adapters; :meth:`prepare` checks, :meth:`run` generates."""

    def __init__(self, config: ServiceConfig):
        self.config = config
        self.pipe = load_pipeline(config.model, config.dtype, config.device)
        self.created = int(time.time())
        self.kinds: dict[str, str] = {BASE: BASE}
        self.prefixes: dict[str, str] = {BASE: ""}
        for name, folder in config.adapters.items():
            self.kinds[name] = read_adapter_manifest(folder)["kind"]
            self.prefixes[name] = load_adapter_into(self.pipe, folder, adapter_name=name)
        self.lora = [n for n, k in self.kinds.items() if k not in (BASE, "soft_tokens")]
        self.baselines = {name: parse_served_baseline(spec, f"baseline {name!r}")
                          for name, spec in config.baselines.items()}
        self.attributes = (dict(load_perception(config.perception).train_classifier.attributes)
                           if self.baselines else {})
        for name, (spec, _) in self.baselines.items():
            self.kinds[name] = spec.method
            self.prefixes[name] = ""
        self._methods: dict[tuple[str, int], Method] = {}
        self.default_model = config.default_model or next(iter(config.adapters), BASE)
        # Request checks tokenise on the event loop while a batch tokenises in a worker thread;
        # a private copy keeps the two from sharing one (not thread-safe) fast tokenizer.
        self._tokenizer = copy.deepcopy(self.pipe.tokenizer)
        defaults = sampling_defaults(config.model)
        self.steps = config.steps or int(defaults["num_inference_steps"])
        guidance = config.guidance_scale
        self.guidance = float(defaults["guidance_scale"]) if guidance is None else guidance
        for name in self.baselines:  # a bad edit text or a missing ADP stops the replica here, not a request
            self._method(name, self.steps)
        self.native = self.pipe.unet.config.sample_size * self.pipe.vae_scale_factor
        self.sizes = [f"{self.native}x{self.native}", *config.allowed_sizes]
        multiple = self.pipe.vae_scale_factor * 2 ** (len(self.pipe.unet.config.block_out_channels) - 1)
        for size in config.allowed_sizes:
            if any(side % multiple for side in parse_size(size)):
                raise ValueError(f"allowed size {size} is not a multiple of {multiple} (VAE x U-Net downsampling)")
        self._active: str | None = None

    def models(self) -> dict[str, dict[str, Any]]:
        """Served model names with what a client may want to know about each."""
        return {name: {"kind": kind, "sizes": self.sizes, "default": name == self.default_model}
                for name, kind in self.kinds.items()}

    # -- checks ---------------------------------------------------------------------------------
    def prepare(self, req: ImageGenerationRequest) -> GenerationJob:
        """Check ``req`` against the served models and limits; raise :class:`ApiError` (4xx) otherwise."""
        model = req.model or self.default_model
        if model not in self.kinds:
            raise ApiError(404, f"The model '{model}' does not exist. Available: {', '.join(self.kinds)}.", "model",
                           "model_not_found")
        if req.response_format == "url":
            raise ApiError(400, "response_format 'url' is not supported: this server does not host files. "
                                "Use 'b64_json'.", "response_format", "unsupported_response_format")
        if req.response_format not in (None, "b64_json"):
            raise ApiError(400, f"Invalid response_format {req.response_format!r}: use 'b64_json'.",
                           "response_format", "invalid_value")
        if req.output_format not in (None, "png"):
            raise ApiError(400, f"Invalid output_format {req.output_format!r}: only 'png' is served.",
                           "output_format", "invalid_value")
        n = 1 if req.n is None else req.n
        if not 1 <= n <= self.config.max_n:
            raise ApiError(400, f"Invalid n={n}: must be between 1 and {self.config.max_n}.", "n", "invalid_value")
        size = f"{self.native}x{self.native}" if req.size in (None, "auto") else req.size
        width, height = parse_size(size)
        if f"{width}x{height}" not in self.sizes:
            raise ApiError(400, f"Invalid size {size!r} for model '{model}': use one of {self.sizes}.", "size",
                           "invalid_size")
        if self.kinds[model] == "distribution-guidance" and (width, height) != (self.native, self.native):
            raise ApiError(400, f"Invalid size {size!r} for model '{model}': its predictor reads the U-Net at the "
                                f"native {self.native}x{self.native} only.", "size", "invalid_size")
        steps = self.steps if req.steps is None else req.steps
        if not 1 <= steps <= self.config.max_steps:
            raise ApiError(400, f"Invalid steps={steps}: must be between 1 and {self.config.max_steps}.", "steps",
                           "invalid_value")
        text = self._check_prompt(req.prompt, model)
        seed = secrets.randbelow(MAX_SEED + 1) if req.seed is None else req.seed
        return GenerationJob(model, req.prompt, text, n, width, height, steps, seed)

    def _check_prompt(self, prompt: str, model: str) -> str:
        if not prompt.strip():
            raise ApiError(400, "The prompt is empty.", "prompt", "empty_prompt")
        limit = self.config.max_prompt_chars
        if len(prompt) > limit:
            raise ApiError(400, f"The prompt is {len(prompt)} characters; the limit is {limit}.", "prompt",
                           "prompt_too_long")
        text = self.pipe.maybe_convert_prompt(self.prefixes[model] + prompt, self._tokenizer)
        tokens = len(self._tokenizer(text, truncation=False, verbose=False).input_ids)
        most = self._tokenizer.model_max_length
        if tokens > most:
            raise ApiError(400, f"The prompt is {tokens} tokens; model '{model}' reads at most {most} "
                                "(start and end tokens included) and would ignore the rest.", "prompt",
                           "prompt_too_long")
        return text

    # -- generation -----------------------------------------------------------------------------
    def run(self, jobs: list[GenerationJob]) -> list[list[str]]:
        """Base64 PNGs for each job; one sampler call per (model, size, steps) group."""
        groups: dict[tuple[str, int, int, int], list[int]] = defaultdict(list)
        for i, job in enumerate(jobs):
            groups[job.group].append(i)
        out: list[list[str]] = [[] for _ in jobs]
        for (model, width, height, steps), members in groups.items():
            images = self._sample(model, width, height, steps, [jobs[i] for i in members])
            start = 0
            for i in members:
                out[i] = [png_base64(img) for img in images[start:start + jobs[i].n]]
                start += jobs[i].n
        return out

    def _sample(self, model: str, width: int, height: int, steps: int, jobs: list[GenerationJob]) -> np.ndarray:
        self._activate(model)
        f = self.pipe.vae_scale_factor
        shape = (self.pipe.unet.config.in_channels, height // f, width // f)
        noise = torch.cat([image_noise(job.seed, job.prompt, range(job.n), shape) for job in jobs])
        texts = [job.text for job in jobs for _ in range(job.n)]
        if model in self.baselines:
            images = self._method(model, steps).generate(texts, noise)
        else:
            sampling = SamplingConfig(num_steps=steps, guidance_scale=self.guidance, mode="none")
            with torch.no_grad():
                images = generate(self.pipe, texts, noise, sampling)
        return (images.permute(0, 2, 3, 1).cpu().numpy() * 255).round().astype(np.uint8)

    def _method(self, name: str, steps: int) -> Method:
        """Baseline ``name`` at ``steps`` sampler steps (built once per step count)."""
        if (name, steps) not in self._methods:
            spec, law = self.baselines[name]
            sampling = SamplingConfig(num_steps=steps, guidance_scale=self.guidance, mode="none")
            method = build_method(spec, LoadedModel(self.pipe, "", False), self.attributes, sampling, law, name)
            assert method is not None  # only `ours` can be absent, and it is not served as a baseline
            self._methods[(name, steps)] = method
        return self._methods[(name, steps)]

    def _activate(self, model: str) -> None:
        """LoRA ``model`` on alone, or every LoRA off (base, soft tokens, baselines)."""
        if model == self._active or not self.lora:
            return
        if model in self.lora:
            self.pipe.enable_lora()
            self.pipe.set_adapters([model])
        else:
            self.pipe.disable_lora()
        self._active = model
