"""The methods a comparison runs, by name, behind one interface: ``generate(prompts, noise)``.

* ``original``: the model as it is;
* ``ours``: the model with an adapter exported by ``fairness debias`` / ``export``;
* ``fair-diffusion``: :mod:`fairness.baselines.fair_diffusion`;
* ``distribution-guidance``: :mod:`fairness.baselines.distribution_guidance` (needs an ADP);
* ``ethical-intervention`` (Bansal et al. 2022): the prompt plus a suffix that names the
  attribute's classes ("... if all individuals can be a doctor irrespective of their gender").

A method spec is a mapping with ``method`` and that method's parameters (YAML in ``fairness
compare`` configs, JSON for ``fairness serve --baseline``); :func:`parse_method` validates it
before anything loads, :func:`build_method` checks it against the pipeline and the target law.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from fairness.baselines.distribution_guidance import (
    GuidanceParams,
    distribution_guidance_generate,
    load_adp,
)
from fairness.baselines.fair_diffusion import SegaParams, fair_diffusion_generate
from fairness.baselines.texts import BaselineError, check_class_texts, check_words
from fairness.dft.engine import SamplingConfig, generate
from fairness.generation import LoadedModel, load_model
from fairness.targets.distributions import TargetSpec
from fairness.training.rundir import RunDir


class _Spec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    label: str | None = Field(None, description="name in tables (default: the method), e.g. to compare two settings")

    @property
    def name(self) -> str:
        return self.label or self.method  # type: ignore[attr-defined]


class OriginalSpec(_Spec):
    method: Literal["original"] = "original"


class OursSpec(_Spec):
    method: Literal["ours"] = "ours"
    adapters: dict[str, str] = Field(description="target law name -> exported adapter folder (ours is trained "
                                                 "for one law; a law without an adapter is not run)")
    training_seconds: dict[str, float] = Field(default_factory=dict, description="law -> one-time training cost "
                                               "(default: the iteration seconds its run directory logged)")


class FairDiffusionSpec(_Spec):
    method: Literal["fair-diffusion"] = "fair-diffusion"
    edit_texts: dict[str, list[str]] = Field(description="attribute -> one edit text per class, in the classifier's "
                                                         "order (people: ['male person', 'female person'])")
    edit_guidance_scale: float = Field(4.0, ge=0)
    edit_warmup: float = Field(0.2, ge=0, le=1, description="share of the steps before the edit applies "
                                                            "(Fair Diffusion: 10 of 50)")
    edit_threshold: float = Field(0.95, ge=0, lt=1)
    edit_momentum_scale: float = Field(0.3, ge=0)
    edit_mom_beta: float = Field(0.6, ge=0, lt=1)
    allow_subwords: bool = False

    def params(self) -> SegaParams:
        return SegaParams(self.edit_guidance_scale, self.edit_warmup, self.edit_threshold,
                          self.edit_momentum_scale, self.edit_mom_beta)


class DistributionGuidanceSpec(_Spec):
    method: Literal["distribution-guidance"] = "distribution-guidance"
    adp: str = Field(description="folder written by `fairness baseline train-adp`")
    strength: float = Field(500.0, ge=0)
    step_size: float = Field(600.0, ge=0)
    temperature: float = Field(8.0, gt=0)
    loss: Literal["kl", "l2"] = "kl"

    def params(self) -> GuidanceParams:
        return GuidanceParams(self.strength, self.step_size, self.temperature, self.loss)


class EthicalInterventionSpec(_Spec):
    method: Literal["ethical-intervention"] = "ethical-intervention"
    attribute: str
    class_words: list[str] | None = Field(None, description="words naming the classes (default: the class names)")
    suffix: str = "if all individuals can be any of {classes} irrespective of their {attribute}"
    joiner: str = " or "
    allow_subwords: bool = False

    def text(self, classes: list[str]) -> str:
        return self.suffix.format(classes=self.joiner.join(self.class_words or classes), attribute=self.attribute)


MethodSpec = Annotated[OriginalSpec | OursSpec | FairDiffusionSpec | DistributionGuidanceSpec | EthicalInterventionSpec,
                       Field(discriminator="method")]
METHODS = ("original", "ours", "fair-diffusion", "distribution-guidance", "ethical-intervention")
# Methods whose images depend on the target law (the rest are run once and listed under each law).
LAW_DEPENDENT = ("ours", "fair-diffusion", "distribution-guidance")
_ADAPTER: TypeAdapter[Any] = TypeAdapter(MethodSpec)


def parse_method(data: Mapping[str, Any], where: str = "method") -> Any:
    """A validated method spec; an unknown ``method`` names the known ones."""
    name = data.get("method") if isinstance(data, Mapping) else None
    if name not in METHODS:
        raise BaselineError(f"{where}: unknown method {name!r}; known: {', '.join(METHODS)}")
    try:
        return _ADAPTER.validate_python(dict(data))
    except ValidationError as exc:
        lines = [f"{'.'.join(str(x) for x in e['loc'][1:])}: {e['msg']}" for e in exc.errors()]
        raise BaselineError(f"{where} ({name}): " + "; ".join(lines)) from None


SERVED_METHODS = ("fair-diffusion", "distribution-guidance", "ethical-intervention")


def parse_served_baseline(data: Mapping[str, Any], where: str = "baseline") -> tuple[Any, dict[str, Any] | None]:
    """A baseline to serve: its method spec and its target ``law`` (a debias-config target,
    required by the methods that steer toward one). ``original`` is served as ``base`` and ours
    as an adapter, so they are refused here."""
    if not isinstance(data, Mapping):
        raise BaselineError(f"{where}: expected a mapping with 'method' (and 'law'), got {data!r}")
    body = dict(data)
    law = body.pop("law", None)
    if body.get("method") in ("original", "ours"):
        raise BaselineError(f"{where}: serve the original model as 'base' and ours with --adapter NAME=DIR")
    spec = parse_method(body, where)
    if spec.method in LAW_DEPENDENT and not isinstance(law, Mapping):
        raise BaselineError(f"{where}: {spec.method} needs a target 'law', e.g. "
                            "{\"marginals\": {\"gender\": \"uniform\"}}")
    return spec, law


def training_seconds_of(adapter: str) -> float | None:
    """An exported adapter's training cost: the sum of the iteration seconds its run directory
    logged, when the adapter sits in one (``fairness debias`` exports to ``RUN_DIR/adapter``);
    validation checks are not included. None when there is no log."""
    log = Path(adapter).parent / "log.jsonl"
    rows = RunDir(log.parent).read_rows(log) if log.is_file() else []  # (RunDir creates a missing folder)
    seconds = [float(r["seconds"]) for r in rows if "seconds" in r]
    return float(sum(seconds)) if seconds else None


def target_marginals(law: Mapping[str, Any], attributes: Mapping[str, list[str]]) -> dict[str, np.ndarray]:
    """Per attribute, the marginal law of a target written as in debias configs (``marginals``,
    ``joint``, ``conditional``; checked against the classifier's classes)."""
    groups = TargetSpec.from_dict(law).compile(attributes)
    return {a: g.marginal(a) for g in groups for a in g.attributes}


@dataclass
class Method:
    """A ready method: ``generate(prompts, noise)`` images in [0, 1], timed per image."""

    name: str
    run: Callable[[list[str], torch.Tensor], torch.Tensor]
    training_seconds: float | None = 0.0
    info: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0
    images: int = 0

    def generate(self, prompts: list[str], noise: torch.Tensor) -> torch.Tensor:
        start = time.perf_counter()
        out = self.run(prompts, noise)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.seconds += time.perf_counter() - start
        self.images += len(prompts)
        return out

    @property
    def seconds_per_image(self) -> float:
        return self.seconds / self.images if self.images else float("nan")


def build_method(spec: Any, model: LoadedModel, attributes: Mapping[str, list[str]], sampling: SamplingConfig,
                 law: Mapping[str, Any] | None = None, law_name: str | None = None, seed: int = 0,
                 model_path: str | None = None) -> Method | None:
    """``spec`` made runnable on ``model.pipe`` toward ``law``; None for ``ours`` without an
    adapter for ``law_name``. ``model`` must be the plain pipeline (no adapter loaded)."""
    pipe, steps, scale = model.pipe, sampling.num_steps, sampling.guidance_scale
    if spec.method == "original":
        return Method(spec.name, lambda p, z: generate(pipe, p, z.to(pipe.device), sampling))
    if spec.method == "ethical-intervention":
        if spec.attribute not in attributes:
            raise BaselineError(f"ethical-intervention: unknown attribute {spec.attribute!r}; "
                                f"the classifier knows {sorted(attributes)}")
        classes = list(attributes[spec.attribute])
        if spec.class_words is not None and len(spec.class_words) != len(classes):
            raise BaselineError(f"ethical-intervention: {len(spec.class_words)} class words for the "
                                f"{len(classes)} classes {classes}")
        suffix = spec.text(classes)
        check_words(pipe.tokenizer, suffix, "ethical-intervention.suffix", spec.allow_subwords)
        return Method(spec.name, lambda p, z: generate(pipe, [f"{x} {suffix}" for x in p],
                                                                    z.to(pipe.device), sampling),
                      info={"suffix": suffix})
    if law is None:
        raise BaselineError(f"{spec.method} needs a target law")
    if spec.method == "ours":
        adapter = spec.adapters.get(law_name or "")
        if adapter is None:
            return None
        ours = load_model(model_path or pipe.name_or_path, adapter, str(pipe.unet.dtype).removeprefix("torch."),
                          str(pipe.device))
        cost = spec.training_seconds.get(law_name or "", training_seconds_of(adapter))
        return Method(spec.name, lambda p, z: ours.generate(p, z.to(pipe.device), sampling), training_seconds=cost,
                      info={"adapter": adapter})
    targets = target_marginals(law, attributes)
    if spec.method == "fair-diffusion":
        check_class_texts(pipe.tokenizer, spec.edit_texts, attributes, "fair-diffusion.edit_texts", spec.allow_subwords)
        missing = [a for a in spec.edit_texts if a not in targets]
        if missing:
            raise BaselineError(f"fair-diffusion: edit texts for {missing}, which the target law does not set")
        texts, params = dict(spec.edit_texts), spec.params()
        return Method(spec.name, lambda p, z: fair_diffusion_generate(
            pipe, p, z, steps, scale, texts, {a: targets[a] for a in texts}, params, seed), info={"edit_texts": texts})
    adp, manifest = load_adp(spec.adp, pipe)
    guided = {a: targets[a] for a in targets if a in adp.attributes}
    if not guided:
        raise BaselineError(f"distribution-guidance: the ADP predicts {sorted(adp.attributes)}, the target law sets "
                            f"{sorted(targets)}; train it for the targeted attributes")
    params = spec.params()
    return Method(spec.name, lambda p, z: distribution_guidance_generate(
        pipe, adp, p, z, steps, scale, guided, params), training_seconds=manifest.get("train_seconds"),
        info={"adp": spec.adp, "val_accuracy_last": manifest.get("metrics", {}).get("val_accuracy_last")})
