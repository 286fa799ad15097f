"""The typed, validated schema of a debiasing job's YAML config.

Everything the paper's code varied per experiment by copying ``main()`` is a field here.
Unknown keys are rejected (a typo must not silently fall back to a default), and the resolved
config is written into the run directory so runs can be read and diffed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, Mapping

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from fairness.adapters.trainable import TEXT_LORA_TARGETS, UNET_LORA_TARGETS, AdapterSpec
from fairness.dft.engine import SamplingConfig
from fairness.losses.semantics import ImgWeights


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelConfig(Strict):
    path: str = Field("toyworld", description="hub id, local diffusers folder, or 'toyworld'")
    dtype: Literal["float32", "float16", "bfloat16", "float64"] = "float32"
    device: str = "auto"


class PromptSet(Strict):
    """One prompt family: an inline list, a file (txt / jsonl / csv / parquet), or a toy-world split."""

    name: str = "prompts"
    prompts: list[str] | None = None
    file: str | None = None
    toyworld: dict[str, str] | None = None
    weight: float = Field(1.0, gt=0)
    limit: int | None = Field(None, ge=1, description="keep a seeded random subset of this many prompts")
    limit_seed: int = 0

    @model_validator(mode="after")
    def _one_source(self) -> "PromptSet":
        given = [x for x in (self.prompts, self.file, self.toyworld) if x is not None]
        if len(given) != 1:
            raise ValueError(f"prompt set {self.name!r}: give exactly one of prompts / file / toyworld")
        if self.prompts is not None and not self.prompts:
            raise ValueError(f"prompt set {self.name!r}: the prompt list is empty")
        return self


class PromptsConfig(Strict):
    train: list[PromptSet]
    val: list[PromptSet] = Field(default_factory=list)
    test: list[PromptSet] = Field(default_factory=list)


class AdapterConfig(Strict):
    kind: Literal["text_lora", "unet_lora", "both_lora", "soft_tokens"] = "text_lora"
    rank: int = Field(50, ge=1)
    alpha: float | None = None
    dropout: float = Field(0.0, ge=0, lt=1)
    text_targets: list[str] = Field(default_factory=lambda: list(TEXT_LORA_TARGETS))
    unet_targets: list[str] = Field(default_factory=lambda: list(UNET_LORA_TARGETS))
    num_tokens: int = Field(5, ge=1)
    token: str = "<fair>"

    def spec(self) -> AdapterSpec:
        return AdapterSpec(**self.model_dump())


class ImgWeightConfig(Strict):
    lambda1: float = Field(8.0, ge=0)
    nonface_factor: float = Field(0.2, ge=0)
    face_factor: float = Field(0.2, ge=0)

    def weights(self) -> ImgWeights:
        return ImgWeights(**self.model_dump())


class LossConfig(Strict):
    confidence_threshold: float | dict[str, float] = 0.8
    img: ImgWeightConfig = Field(default_factory=ImgWeightConfig)
    img_per_attribute: dict[str, ImgWeightConfig] = Field(default_factory=dict)
    face_weight: float = Field(1.0, ge=0)
    lost_face_weight: float | None = Field(
        None, ge=0, description="image-semantics weight of an image whose original shows a face/object "
        "and which shows none; None: lambda1, the paper's rule for images without a target")
    semantic_encoders: list[str] | None = None
    structure_weight: float = Field(
        0.0, ge=0, description="weight of the term that holds the outline of coloured regions while attributes "
        "recolour them (fairness.losses.structure); 0: the paper's objective")
    ot_method: Literal["auto", "binary", "exact", "truncated", "monte_carlo"] = Field(
        "auto", description="how OT targets are averaged over target draws (fairness.targets.assignment): "
        "auto picks binary (K=2), truncated (few count vectors) or monte_carlo")
    ot_samples: int = Field(200, ge=1, description="target draws of monte_carlo")
    ot_mass: float = Field(0.95, gt=0, le=1, description="multinomial mass the truncated enumeration keeps")
    ot_joint_cost: Literal["joint", "concatenated"] = Field(
        "joint", description="OT cost of a joint group: distance of the joint (outer-product) probabilities to "
        "the joint one-hot (joint), or the official code's distance of the concatenated per-attribute "
        "probabilities to the concatenated per-attribute one-hots (concatenated)")

    @field_validator("confidence_threshold")
    @classmethod
    def _in_unit(cls, v: float | dict[str, float]) -> float | dict[str, float]:
        for x in (v.values() if isinstance(v, dict) else [v]):
            if not 0 <= x <= 1:
                raise ValueError(f"confidence threshold must lie in [0, 1], got {x}")
        return v

    def threshold(self, attribute: str) -> float:
        c = self.confidence_threshold
        return c.get(attribute, 0.8) if isinstance(c, dict) else c

    def img_weights(self, attribute: str) -> ImgWeights:
        return self.img_per_attribute.get(attribute, self.img).weights()


class DFTConfig(Strict):
    # Default: the fastest mode whose gradient keeps cosine >= 0.99 with the exact adjusted one
    # on the bench's fixed batch (bench/results/dft-cpu.json, docs/performance.md).
    mode: Literal["adjusted", "adjusted_batched", "naive"] = Field(
        "adjusted_batched", description="adjusted: step-by-step graph with checkpointing; adjusted_batched: the "
        "same gradient from a no-grad pass plus batched U-Net VJPs (docs/performance.md); naive: exact, explodes")
    grad_steps: int | None = Field(
        4, ge=1, description="adjusted_batched: backpropagate through this many sampler steps, one drawn per "
        "stratum (an unbiased estimate of the adjusted gradient); None: all steps (exact)")
    vjp_batch: int = Field(16, ge=1, description="adjusted_batched: (step, image) pairs per batched U-Net VJP call "
                           "(x2 rows with guidance); bounds the activation memory of the backward pass")
    steps: int | tuple[int, int] = Field((19, 23), description="steps per iteration, or [min, max] drawn per iteration")
    eval_steps: int = 20
    guidance_scale: float = 7.5
    checkpoint_unet: bool = True
    checkpoint_vae: bool = True
    vae_slice: int | None = Field(
        None, ge=1, description="decode (and recompute in backward) this many images at a time; bounds the "
        "VAE's activation memory for large batches. None: the whole batch in one call")

    @field_validator("steps")
    @classmethod
    def _steps(cls, v: int | tuple[int, int]) -> int | tuple[int, int]:
        lo, hi = (v, v) if isinstance(v, int) else v
        if lo < 1 or hi < lo:
            raise ValueError(f"steps must be >= 1 and min <= max, got {v}")
        return v

    def sampling(self, num_steps: int, mode: str | None = None) -> SamplingConfig:
        return SamplingConfig(num_steps=num_steps, guidance_scale=self.guidance_scale, mode=mode or self.mode,  # type: ignore[arg-type]
                              checkpoint_unet=self.checkpoint_unet, checkpoint_vae=self.checkpoint_vae,
                              vae_slice=self.vae_slice, grad_steps=self.grad_steps, vjp_batch=self.vjp_batch)


class SelectionConfig(Strict):
    """How a validation check is scored (lower is better). The same score picks the exported
    checkpoint and ranks Ray Tune trials::

        score = val_target_gap + penalty * (max(0, semantic_floor - val_semantic_sim)
                                            + max(0, object_floor - val_objects_kept))

    The floors make the lowest bias win only among checkpoints that keep the images and the
    faces/objects bias is measured on: without the object term, an adapter that erases most
    objects scores as debiased because the few left happen to be balanced."""

    # 0.8 is the CLIP-I target. A floor of 0.9 charged checkpoints that already met it:
    # s1 exported its barely moved step 50 (test tone 0.72, CLIP-I 0.93) over step 150 (tone
    # 0.39, CLIP-I 0.86; docs/results-toyworld.md, "Results", Scenarios).
    semantic_floor: float = Field(
        0.8, description="semantic similarity to the originals below which a check is charged")
    object_floor: float = Field(0.9, description="share of faces/objects kept below which a check is charged")
    penalty: float = Field(2.0, ge=0)

    def score(self, metrics: Mapping[str, float]) -> float:
        """A missing similarity or object rate (nothing to compare) costs nothing; a missing gap
        (no validation image has a face/object) gives NaN, which never wins."""
        nan = float("nan")
        sim, kept = metrics.get("val_semantic_sim", nan), metrics.get("val_objects_kept", nan)
        charge = sum(max(0.0, floor - value) for floor, value in
                     ((self.semantic_floor, sim), (self.object_floor, kept)) if value == value)
        return metrics.get("val_target_gap", nan) + self.penalty * charge


class TrainConfig(Strict):
    iterations: int = Field(10000, ge=1)
    images_per_prompt: int = Field(24, ge=1)
    prompts_per_step: int = Field(
        1, ge=1, description="prompts per iteration, each with images_per_prompt images; their losses are averaged. "
        "More prompts per step see more of the prompt set in the same number of steps")
    lr: float = Field(5e-5, gt=0)
    lr_scheduler: Literal["constant", "constant_with_warmup", "linear", "cosine"] = Field(
        "constant", description="diffusers' learning-rate schedule over train.iterations")
    lr_warmup_steps: int = Field(0, ge=0)
    weight_decay: float = Field(0.0, ge=0)
    grad_clip: float | None = Field(None, gt=0)
    ema_decay: float | None = Field(0.996, ge=0, lt=1)
    checkpoint_every: int = Field(200, ge=1)
    max_nonfinite_steps: int | None = Field(
        20, ge=1, description="stop with an error after this many consecutive iterations skipped for a "
        "non-finite loss or gradient (fp16 overflow skips count once the loss scale is below 1); None: never")
    reference_images: int = Field(
        0, ge=0, description="no-grad images of each prompt, drawn from the current model beside the ones "
        "backpropagated; their classifier probabilities join the prompt's OT, so its targets follow the prompt's "
        "current law rather than a few images' (fairness.training.objective.Reference). 0: the paper's estimator")
    val_images_per_prompt: int = Field(16, ge=1)
    val_prompts: int | None = Field(None, ge=1, description="cap on validation prompts per check")
    select_best: Literal["val_score", "last"] = Field(
        "val_score", description="export the checkpoint with the best validation score, or the last one")
    selection: SelectionConfig = Field(default_factory=SelectionConfig)
    originals_bank: str | None = Field(None, description="parquet folder from `fairness bank` (skips regenerating originals)")


class DebiasConfig(Strict):
    """A full debiasing job."""

    name: str = "debias"
    seed: int = 0
    model: ModelConfig = Field(default_factory=ModelConfig)
    perception: str = Field("toyworld", description="perception bundle folder, or 'toyworld'")
    prompts: PromptsConfig
    target: dict[str, Any]
    adapter: AdapterConfig = Field(default_factory=AdapterConfig)
    loss: LossConfig = Field(default_factory=LossConfig)
    dft: DFTConfig = Field(default_factory=DFTConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    audit_images_per_prompt: int = Field(32, ge=1)

    @field_validator("target")
    @classmethod
    def _target_numbers(cls, v: dict[str, Any]) -> dict[str, Any]:
        """The target's shape and numbers, checked here so a bad target fails before any model
        loads; its attribute and class names need the perception bundle (:class:`Debiaser`)."""
        from fairness.targets.distributions import TargetSpec, check_target_numbers

        check_target_numbers(TargetSpec.from_dict(v))
        return v

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


class ConfigError(ValueError):
    """A config file that cannot be used; the message names the file and the field."""


# A target is one statement of intent: a child config's target replaces its parent's whole.
REPLACED_WHOLE = {"target"}


def set_dotted(data: dict[str, Any], dotted: str, value: Any, sep: str = ".") -> None:
    """``set_dotted(d, "train.lr", 1e-4)`` sets ``d["train"]["lr"]`` (creating mappings); a
    number indexes a list: ``"methods.2.adp"`` is the third method's ``adp``."""
    node: Any = data
    *parents, leaf = dotted.split(sep)
    for key in parents:
        node = node[_list_index(node, key, dotted)] if isinstance(node, list) else node.setdefault(key, {})
    if isinstance(node, list):
        node[_list_index(node, leaf, dotted)] = value
    else:
        node[leaf] = value


def _list_index(items: list[Any], key: str, dotted: str) -> int:
    if not key.lstrip("-").isdigit() or not -len(items) <= int(key) < len(items):
        raise ConfigError(f"{dotted}: {key!r} is not an index of a list of {len(items)}")
    return int(key)


def get_dotted(data: dict[str, Any], dotted: str, sep: str = ".") -> Any:
    """``get_dotted(d, "train.lr")`` is ``d["train"]["lr"]``; a missing key raises ``KeyError``."""
    node = data
    for key in dotted.split(sep):
        node = node[key]
    return node


def _deep_merge(base: dict[str, Any], over: dict[str, Any], top: bool = True) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        merge = isinstance(value, dict) and isinstance(out.get(key), dict) and not (top and key in REPLACED_WHOLE)
        out[key] = _deep_merge(out[key], value, top=False) if merge else value
    return out


def read_config_file(p: Path, seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """Read a config, resolving ``extends: other.yaml`` (relative to the file) recursively."""
    if not p.exists():
        raise ConfigError(f"config file not found: {p}")
    if p.resolve() in seen:
        raise ConfigError(f"{p}: 'extends' forms a cycle")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{p}: not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: the top level must be a mapping")
    parent = data.pop("extends", None)
    if parent is None:
        return data
    return _deep_merge(read_config_file(p.parent / parent, seen + (p.resolve(),)), data)


def _error_line(error: Mapping[str, Any]) -> str:
    """``field.path: message``; a validator's message that already names its field is kept whole."""
    loc = ".".join(str(x) for x in error["loc"])
    msg = str(error["msg"]).removeprefix("Value error, ")
    return msg if msg.startswith(loc + ".") or msg.startswith(loc + ":") else f"{loc}: {msg}"


def load_config(path: str | Path, overrides: dict[str, Any] | None = None) -> DebiasConfig:
    """Read (following ``extends``), merge ``overrides`` (dotted keys), and validate a YAML config.

    A scenario config states only how it differs from the config it extends; mappings merge
    key by key, anything else (lists, scalars) and the whole ``target`` replaces.
    """
    p = Path(path)
    data = read_config_file(p)
    for dotted, value in (overrides or {}).items():
        set_dotted(data, dotted, value)
    try:
        return DebiasConfig.model_validate(data)
    except ValidationError as exc:
        lines = [_error_line(e) for e in exc.errors()]
        raise ConfigError(f"{p}: invalid config\n  " + "\n  ".join(lines)) from None
