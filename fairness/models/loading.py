"""Loading the generator and the perception bundle by hub id, local folder, or 'toyworld'.

Every path that samples (training, originals bank, audits, generate, serve) loads through
:func:`load_pipeline`, so they all sample with the same solver: DPM-Solver++ (the paper's and
the official code's sampler), whatever scheduler the checkpoint ships with. SD v1.5 ships PNDM,
whose 20-step schedule makes 21 U-Net calls with t=901 twice; the adjusted-DFT coefficients and
the paper's figures assume DPM-Solver++.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from diffusers import DPMSolverMultistepScheduler, SchedulerMixin, StableDiffusionPipeline
from diffusers.models.attention_processor import AttnProcessor2_0

from fairness.perception.bundle import PerceptionBundle, load_bundle

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}

# The fields of a scheduler config that describe the *model* (its training noise schedule and
# what the U-Net predicts); everything else is a property of the sampler and is ours to choose.
MODEL_SCHEDULE_FIELDS = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas",
                         "prediction_type", "rescale_betas_zero_snr")


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_model_path(path: str) -> str:
    """'toyworld' -> the shipped toy model; anything else is passed to diffusers as is."""
    if path == "toyworld":
        from fairness.toyworld import default_model_dir

        return str(default_model_dir())
    return path


def dpm_solver_pp(scheduler: SchedulerMixin) -> DPMSolverMultistepScheduler:
    """DPM-Solver++ (2M) for the model ``scheduler`` belongs to.

    A scheduler that already is DPM-Solver++ is returned untouched (the toy world's results stay
    as they are). Otherwise the model's noise schedule (betas, prediction type, zero-SNR
    rescaling) is kept and the sampler settings are diffusers' DPM-Solver++ defaults, which
    is what the official code gets from ``DPMSolverMultistepScheduler.from_pretrained`` on SD
    v1.5: ``linspace`` timesteps, 2nd order, first order on the last step. ``steps_offset=1``
    is what ``StableDiffusionPipeline`` would force anyway (it only matters for "leading"
    spacing) and avoids its deprecation warning.
    """
    if isinstance(scheduler, DPMSolverMultistepScheduler) and scheduler.config.algorithm_type == "dpmsolver++":
        return scheduler
    config: dict[str, Any] = {k: scheduler.config[k] for k in MODEL_SCHEDULE_FIELDS if k in scheduler.config}
    return DPMSolverMultistepScheduler(**config, algorithm_type="dpmsolver++", solver_order=2, steps_offset=1)


def use_sdpa(pipe: StableDiffusionPipeline) -> None:
    """PyTorch's fused scaled-dot-product attention in the U-Net and the VAE.

    It is diffusers' default on torch 2, but a checkpoint or a caller may have set another
    processor (e.g. the classic ``AttnProcessor``, which materialises the attention matrix).
    LoRA from peft wraps the projection layers, not the processor, so this is safe with it.
    """
    for model in (pipe.unet, pipe.vae):
        if any(not isinstance(p, AttnProcessor2_0) for p in model.attn_processors.values()):
            model.set_attn_processor(AttnProcessor2_0())


def check_model_folder(path: str) -> str:
    """The resolved model path; a local folder without ``model_index.json`` fails here, in
    milliseconds, so callers can check it before any expensive load (hub ids pass through)."""
    resolved = resolve_model_path(path)
    local = Path(resolved)
    if (local.is_absolute() or resolved.startswith(".")) and not (local / "model_index.json").exists():
        raise FileNotFoundError(f"no diffusers pipeline at {local} (model_index.json missing)")
    return resolved


def load_pipeline(path: str, dtype: str = "float32", device: str = "auto") -> StableDiffusionPipeline:
    """A ``StableDiffusionPipeline`` sampling with DPM-Solver++, frozen weights in ``dtype``.

    Clear error when the weights are missing. Trainable adapter weights attached later stay in
    float32 (see :mod:`fairness.adapters.trainable`); training samples under autocast
    (:class:`~fairness.training.debiaser.Debiaser`).
    """
    resolved = check_model_folder(path)
    try:
        pipe = StableDiffusionPipeline.from_pretrained(
            resolved, dtype=DTYPES[dtype], safety_checker=None, requires_safety_checker=False,
        )
    except OSError as exc:
        raise FileNotFoundError(
            f"could not load model {path!r}: {exc}. Give a local diffusers folder or a hub id you can reach."
        ) from exc
    pipe.scheduler = dpm_solver_pp(pipe.scheduler)
    use_sdpa(pipe)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(resolve_device(device))


def model_resolution(path: str) -> int:
    """Image side in pixels the model generates at (U-Net sample size x VAE factor), read from
    the config files only, so callers that never load the weights (the bank's driver) know it."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    resolved = resolve_model_path(path)
    unet = UNet2DConditionModel.load_config(resolved, subfolder="unet")
    vae = AutoencoderKL.load_config(resolved, subfolder="vae")
    return int(unet["sample_size"]) * 2 ** (len(vae["block_out_channels"]) - 1)


def load_perception(path: str, face_bank: bool = True) -> PerceptionBundle:
    """'toyworld' -> the shipped toy perception bundle; otherwise a bundle folder."""
    if path == "toyworld":
        from fairness.toyworld import default_perception_dir

        path = str(default_perception_dir())
    return load_bundle(path, face_bank=face_bank)
