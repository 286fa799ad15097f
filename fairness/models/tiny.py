"""Tiny Stable-Diffusion-shaped pipelines built from configs (random weights, no hub).

Same classes as SD v1.5 (UNet2DConditionModel, AutoencoderKL, CLIPTextModel, CLIPTokenizer,
DPMSolverMultistepScheduler), only small: they exercise every code path in seconds on a CPU.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DPMSolverMultistepScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

from fairness.models.tokenizer import build_clip_tokenizer

TINY_WORDS = (
    "a photo of the face person doctor nurse engineer teacher chef pilot playing tennis soccer "
    "picture image an in style on background"
).split()


def dpm_solver(num_train_timesteps: int = 1000) -> DPMSolverMultistepScheduler:
    """DPM-Solver++ (2M) configured as SD v1.5 ships it."""
    return DPMSolverMultistepScheduler(
        num_train_timesteps=num_train_timesteps, beta_start=0.00085, beta_end=0.012,
        beta_schedule="scaled_linear", algorithm_type="dpmsolver++", solver_order=2,
        prediction_type="epsilon", steps_offset=1,
    )


def build_tiny_pipeline(
    seed: int = 0,
    words: list[str] | None = None,
    image_size: int = 32,
    hidden: int = 32,
    tokenizer_dir: str | Path | None = None,
) -> StableDiffusionPipeline:
    """A random-weight SD pipeline; ``image_size`` pixels, VAE factor 4, text width ``hidden``."""
    torch.manual_seed(seed)
    tok_dir = Path(tokenizer_dir) if tokenizer_dir else Path(tempfile.mkdtemp(prefix="tiny-tok-"))
    tokenizer = build_clip_tokenizer(list(words or TINY_WORDS), tok_dir)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
        num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=tokenizer.model_max_length,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    ))
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4,
        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(16, 32, 32), layers_per_block=1, norm_num_groups=8, sample_size=image_size,
    )
    unet = UNet2DConditionModel(
        sample_size=image_size // 4, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=hidden,
        attention_head_dim=8, norm_num_groups=8,
    )
    return StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=dpm_solver(),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
