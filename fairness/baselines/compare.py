"""``fairness compare``: every method audited on the same prompts, noise and evaluation classifier.

For each target law (e.g. uniform and 75/25) and each prompt set, every method of the config
generates ``images_per_prompt`` images per prompt from ``image_noise(seed, prompt, i)`` and is
audited by :func:`fairness.metrics.audit.audit` against the original model's images from the
same noise (CLIP-I, DINO). Methods that do not depend on the law (original, ethical
intervention) are run once and listed under every law. Each method's wall-clock seconds per
generated image and its one-time training cost are recorded beside its bias and semantics.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from fairness.baselines.methods import (
    LAW_DEPENDENT,
    Method,
    build_method,
    parse_method,
    target_marginals,
)
from fairness.baselines.texts import BaselineError
from fairness.config import ConfigError, ModelConfig, PromptSet, read_config_file, set_dotted
from fairness.dft.engine import SamplingConfig
from fairness.generation import load_model, sampling_defaults
from fairness.metrics.audit import AuditResult, audit
from fairness.metrics.bias import total_variation
from fairness.models.loading import load_perception
from fairness.training.prompts import resolve_prompts


class CompareConfig(BaseModel):
    """A comparison: model, perception, prompt sets, target laws and methods (YAML)."""

    model_config = ConfigDict(extra="forbid")

    name: str = "compare"
    seed: int = 0
    model: ModelConfig = Field(default_factory=ModelConfig)
    perception: str = "toyworld"
    prompts: list[PromptSet] = Field(min_length=1)
    laws: dict[str, dict[str, Any]] = Field(min_length=1, description="law name -> target, as in debias configs")
    methods: list[dict[str, Any]] = Field(min_length=1)
    images_per_prompt: int = Field(16, ge=1)
    batch_size: int = Field(32, ge=1)
    steps: int | None = Field(None, ge=1, description="sampler steps (default: the model's)")
    guidance_scale: float | None = Field(None, ge=0, description="CFG scale (default: the model's)")
    joints: list[str] | None = None
    grid_prompts: int = Field(2, ge=0, description="prompts per set shown as image grids")
    grid_images: int = Field(8, ge=1)

    @field_validator("methods")
    @classmethod
    def _methods(cls, methods: list[dict[str, Any]]) -> list[dict[str, Any]]:
        names = [parse_method(m, f"methods[{i}]").name for i, m in enumerate(methods)]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise ValueError(f"methods named more than once: {twice}; give each a distinct 'label'")
        return methods

    def specs(self) -> list[Any]:
        return [parse_method(m, f"methods[{i}]") for i, m in enumerate(self.methods)]


def load_compare_config(path: str | Path, overrides: dict[str, Any] | None = None) -> CompareConfig:
    """Read a compare config (following ``extends``, like debias configs) with ``overrides``
    (dotted keys; a number indexes a list, ``methods.2.adp``) merged in."""
    p = Path(path)
    data = read_config_file(p)
    for dotted, value in (overrides or {}).items():
        set_dotted(data, dotted, value)
    try:
        return CompareConfig.model_validate(data)
    except ValidationError as exc:
        lines = [f"{'.'.join(str(x) for x in e['loc'])}: {str(e['msg']).removeprefix('Value error, ')}"
                 for e in exc.errors()]
        raise ConfigError(f"{p}: invalid compare config\n  " + "\n  ".join(lines)) from None


@dataclass
class MethodRun:
    """One method under one law on one prompt set."""

    method: str
    law: str
    prompt_set: str
    audit: AuditResult
    seconds_per_image: float
    training_seconds: float | None
    target_gap: dict[str, float]
    info: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"method": self.method, "law": self.law, "prompt_set": self.prompt_set,
                "seconds_per_image": self.seconds_per_image, "training_seconds": self.training_seconds,
                "target_gap": self.target_gap, "info": self.info, "audit": self.audit.to_json()}


@dataclass
class CompareResult:
    config: CompareConfig
    runs: list[MethodRun]
    laws: dict[str, dict[str, np.ndarray]]
    attributes: dict[str, list[str]]
    skipped: list[dict[str, str]]


def target_gaps(result: AuditResult, law: dict[str, np.ndarray]) -> dict[str, float]:
    """Per targeted attribute, the mean over prompts with an object of TV(frequencies, target)."""
    out = {}
    for attr, target in law.items():
        gaps = [total_variation(r["freq"][attr], target) for r in result.rows if r["faces"]]
        out[attr] = float(np.mean(gaps)) if gaps else float("nan")
    return out


class _OriginalsCache:
    """The original model's images, made once per (prompts, noise) and kept on the CPU: the
    original method's own audit makes them (timed), every other method's CLIP-I / DINO reuses them."""

    def __init__(self, run: Callable[[list[str], torch.Tensor], torch.Tensor]):
        self.run, self.images = run, {}

    def __call__(self, prompts: list[str], noise: torch.Tensor) -> torch.Tensor:
        key = hashlib.sha256(("\x1f".join(prompts)).encode() + noise.cpu().numpy().tobytes()).hexdigest()
        if key not in self.images:
            self.images[key] = self.run(prompts, noise).cpu()
        return self.images[key]


def run_compare(cfg: CompareConfig, progress: bool = True) -> CompareResult:
    """Audit every method of ``cfg`` under every law on every prompt set."""
    specs = cfg.specs()
    if not any(s.method == s.name == "original" for s in specs):
        raise BaselineError("a comparison needs the 'original' method (unlabelled): CLIP-I and DINO compare with "
                            "its images")
    sets = {ps.name: resolve_prompts(ps) for ps in cfg.prompts}
    bundle = load_perception(cfg.perception)
    model = load_model(cfg.model.path, None, cfg.model.dtype, cfg.model.device)
    bundle = bundle.to(model.pipe.device)
    defaults = sampling_defaults(cfg.model.path)
    sampling = SamplingConfig(num_steps=cfg.steps or int(defaults["num_inference_steps"]),
                              guidance_scale=float(defaults["guidance_scale"]) if cfg.guidance_scale is None
                              else cfg.guidance_scale, mode="none")
    attributes = dict(bundle.train_classifier.attributes)
    laws = {name: target_marginals(law, attributes) for name, law in cfg.laws.items()}
    # Build every method first: a bad edit text or a missing ADP fails before any image is made.
    built: dict[tuple[str, str], Method] = {}
    skipped = []
    for spec in specs:
        for law_name in (cfg.laws if spec.method in LAW_DEPENDENT else [None]):
            method = build_method(spec, model, attributes, sampling, cfg.laws.get(law_name or ""), law_name,
                                  cfg.seed, cfg.model.path)
            if method is None:
                skipped.append({"method": spec.name, "law": str(law_name), "why": "no adapter for this law"})
            else:
                built[(spec.name, law_name or "*")] = method
    original = built[("original", "*")]
    originals = original.run = _OriginalsCache(original.run)
    runs: list[MethodRun] = []
    # The original first, so that its timed audit is what fills the cache.
    for (name, law_name), method in sorted(built.items(), key=lambda item: item[0][0] != "original"):
        for set_name, prompts in sets.items():
            method.seconds, method.images = 0.0, 0
            result = audit(method.generate, bundle, prompts, cfg.images_per_prompt, cfg.seed, model.latent_shape,
                           originals=originals, joints=cfg.joints, batch_size=cfg.batch_size, keep_images=True,
                           progress=progress)
            result.images = result.images[:cfg.grid_prompts]
            result.originals = []
            for law in (cfg.laws if law_name == "*" else [law_name]):
                runs.append(MethodRun(name, law, set_name, result, method.seconds_per_image, method.training_seconds,
                                      target_gaps(result, laws[law]), method.info))
    return CompareResult(cfg, runs, laws, attributes, skipped)


def write_compare(result: CompareResult, out_dir: str | Path) -> dict[str, Path]:
    """``compare.json``, per prompt set ``compare_<set>.csv`` / ``.md``, and ``compare.html``."""
    from fairness.report.compare import write_compare_report, write_tables

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    data = {"config": result.config.model_dump(mode="json"), "skipped": result.skipped,
            "laws": {k: {a: v.tolist() for a, v in law.items()} for k, law in result.laws.items()},
            "runs": [r.to_json() for r in result.runs]}
    paths = {"json": out / "compare.json"}
    paths["json"].write_text(json.dumps(data, indent=2, default=float))
    paths.update(write_tables(result, out))
    paths["html"] = write_compare_report(result, out)
    return paths

