"""The toy world's Stable-Diffusion model: SD's own classes, small, trained from scratch here.

The model is a stock ``StableDiffusionPipeline`` (``CLIPTokenizer``, ``CLIPTextModel``,
``AutoencoderKL``, ``UNet2DConditionModel``, ``DPMSolverMultistepScheduler``), so every library
code path that serves real SD serves it unchanged. Training follows SD's recipe in two stages:

1. the VAE maps 32x32x3 images to 16x16x4 latents (reconstruction loss plus a tiny KL term), and
   its ``scaling_factor`` is set to 1 / std of the latents, exactly the role 0.18215 plays in SD;
2. the text encoder and the U-Net are trained jointly with the epsilon-prediction DDPM loss on
   scaled latents under SD's ``scaled_linear`` betas, with ~10% of captions dropped to ``""``
   so classifier-free guidance works.

The data are the world's own training pairs (every concept, template and context), so the
model learns each concept's biased attribute law: that bias is what debiasing later removes.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from diffusers.training_utils import EMAModel
from tqdm.auto import tqdm
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from fairness.models.tiny import dpm_solver
from fairness.models.tokenizer import build_clip_tokenizer
from fairness.seeding import derive_seed, numpy_rng
from fairness.toyworld import world
from fairness.toyworld.render import object_alpha

DEFAULTS_FILE = "fairness_defaults.json"  # read by fairness.generation.sampling_defaults


@dataclass(frozen=True)
class DiffusionRecipe:
    """Model sizes and training budget. The defaults are the shipped model's: 16x16x4 latents
    and a three-level U-Net, the smallest recipe measured to draw the concepts' shapes (97% on
    train concepts; the first recipe, 8x8 latents and two levels, drew 24%). Its U-Net trains
    ~100 minutes on one CPU thread, minutes on a GPU; :meth:`quick` is a smoke test of seconds."""

    # Text encoder (CLIPTextModel) and tokenizer.
    text_hidden: int = 64
    text_layers: int = 3
    text_heads: int = 4
    max_length: int = 20  # the longest training caption is 18 tokens with BOS and EOS
    # VAE: two blocks = one downsampling, 32x32 -> 16x16 (three blocks, 8x8, keep 68-71% of
    # rendered shapes through the round trip; two keep 86%).
    vae_channels: tuple[int, ...] = (16, 32)
    latent_channels: int = 4  # SD's; 8 keeps a few more shapes through the VAE (README)
    vae_steps: int = 1500
    vae_batch: int = 32
    vae_lr: float = 2e-3
    kl_weight: float = 1e-5
    object_weight: float = 4.0
    # U-Net on 16x16x4 latents, down to 4x4; no attention at 16x16, where it costs most.
    unet_channels: tuple[int, ...] = (32, 64, 64)
    unet_layers: int = 1
    unet_heads: int = 4
    unet_attention: tuple[bool, ...] = (False, True, True)  # per level: cross-attention blocks or plain
    unet_steps: int = 5000
    unet_batch: int = 64
    unet_lr: float = 1e-3
    # A second run of the denoiser's training from the first's (EMA) weights, with a fresh
    # optimizer, schedule and EMA at a lower rate: it took shapes from 75% to 97%, where the
    # first run's cosine schedule had already decayed (0 = none).
    unet_refine_steps: int = 5000
    unet_refine_lr: float = 5e-4
    train_images: int = 30000  # distinct rendered images, encoded once to latents
    caption_dropout: float = 0.1
    # Each of tone / colour / pattern is named in a training caption with this probability
    # (world.mentioned_attributes): the model learns to draw them on request, as SD does.
    attribute_caption_rate: float = 0.25
    # Extra weight of the epsilon loss on latent cells the object covers (``object_weights``
    # pooled to the latent grid): shapes are a few latent cells, the background most of them.
    latent_object_weight: float = 0.0
    # Min-SNR-gamma weighting of the epsilon loss (Hang et al. 2023); None = plain SD loss.
    snr_gamma: float | None = 5.0
    ema_decay: float = 0.999
    # Sampling defaults shipped with the model (fairness_defaults.json).
    num_inference_steps: int = 15
    guidance_scale: float = 5.0

    @classmethod
    def quick(cls) -> "DiffusionRecipe":
        """A handful of steps on a few hundred images: exercises the whole build in seconds."""
        return cls(vae_steps=3, vae_batch=8, unet_steps=3, unet_refine_steps=2, unet_batch=8,
                   train_images=64, num_inference_steps=4)

    def with_overrides(self, overrides: dict[str, Any]) -> "DiffusionRecipe":
        """This recipe with some fields changed (e.g. parsed from a ``--recipe`` JSON object);
        lists become tuples, and a field the recipe does not have is refused by name."""
        known = {f.name for f in fields(self)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise ValueError(f"unknown DiffusionRecipe fields {unknown}; known: {sorted(known)}")
        return replace(self, **{k: tuple(v) if isinstance(v, list) else v for k, v in overrides.items()})


def parse_overrides(text: str) -> dict[str, Any]:
    """A ``--recipe`` argument: a JSON object of :class:`DiffusionRecipe` fields."""
    try:
        overrides = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"--recipe is not JSON: {exc}") from None
    if not isinstance(overrides, dict):
        raise ValueError(f"--recipe must be a JSON object of DiffusionRecipe fields, got {text!r}")
    return overrides


# ---------------------------------------------------------------------------------------------
# Components
# ---------------------------------------------------------------------------------------------


def build_tokenizer(save_dir: str | Path, max_length: int) -> CLIPTokenizer:
    """A ``CLIPTokenizer`` over the world's vocabulary in which every word is ONE token (as
    in SD, where a concept word is one embedding that textual inversion or debiasing can move)."""
    words = world.caption_vocabulary()
    tok = build_clip_tokenizer(words, save_dir, model_max_length=max_length)
    split = [w for w in words if len(tok.tokenize(w)) != 1]
    if split:
        raise RuntimeError(f"tokenizer splits world words: {split[:5]}")
    return tok


def make_text_encoder(tokenizer: CLIPTokenizer, recipe: DiffusionRecipe) -> CLIPTextModel:
    return CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=recipe.text_hidden, intermediate_size=2 * recipe.text_hidden,
        num_hidden_layers=recipe.text_layers, num_attention_heads=recipe.text_heads,
        max_position_embeddings=recipe.max_length, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    ))


def make_vae(recipe: DiffusionRecipe) -> AutoencoderKL:
    """No attention in the mid block: on these small latents it buys nothing and costs time."""
    n = len(recipe.vae_channels)
    return AutoencoderKL(
        in_channels=3, out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=recipe.vae_channels, latent_channels=recipe.latent_channels,
        layers_per_block=1, norm_num_groups=8,
        sample_size=world.IMAGE_SIZE, mid_block_add_attention=False,
    )


def latent_size(recipe: DiffusionRecipe) -> int:
    """Side of the latent grid: each VAE block after the first halves the image."""
    return world.IMAGE_SIZE // 2 ** (len(recipe.vae_channels) - 1)


def make_unet(recipe: DiffusionRecipe) -> UNet2DConditionModel:
    attn = recipe.unet_attention
    return UNet2DConditionModel(
        sample_size=latent_size(recipe), in_channels=recipe.latent_channels, out_channels=recipe.latent_channels,
        layers_per_block=recipe.unet_layers, block_out_channels=recipe.unet_channels,
        down_block_types=tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attn),
        up_block_types=tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)),
        cross_attention_dim=recipe.text_hidden, attention_head_dim=recipe.unet_heads, norm_num_groups=8,
    )


def ddpm_scheduler() -> DDPMScheduler:
    """The training noise schedule: SD v1's 1000 ``scaled_linear`` betas (as ``dpm_solver``)."""
    s = dpm_solver().config
    return DDPMScheduler(num_train_timesteps=s.num_train_timesteps, beta_start=s.beta_start,
                         beta_end=s.beta_end, beta_schedule=s.beta_schedule, prediction_type="epsilon")


# ---------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------


def render_pairs(rng: np.random.Generator, n: int, attribute_rate: float = 0.0,
                 caption_rng: np.random.Generator | None = None) -> tuple[list[str], np.ndarray, list[world.Scene]]:
    """``n`` world training pairs: captions, float32 images ``(n, 3, 32, 32)`` in [0, 1], scenes."""
    prompts, scenes = [], []
    images = np.empty((n, 3, world.IMAGE_SIZE, world.IMAGE_SIZE), np.float32)
    for i in range(n):
        prompt, images[i], scene = world.sample_training_pair(rng, caption_rng, attribute_rate)
        prompts.append(prompt)
        scenes.append(scene)
    return prompts, images, scenes


def object_weights(scenes: list[world.Scene], weight: float) -> np.ndarray:
    """Per-pixel loss weights ``(n, 1, 32, 32)``: 1 on the background, ``1 + weight`` on the
    object. Backgrounds (noise above all) would otherwise take most of a small VAE's capacity,
    while the protected attributes live on the object."""
    out = np.ones((len(scenes), 1, world.IMAGE_SIZE, world.IMAGE_SIZE), np.float32)
    for i, scene in enumerate(scenes):
        if scene.has_object:
            out[i, 0] += weight * object_alpha(scene)[0]
    return out


def _chunks(n: int, size: int) -> Iterator[slice]:
    for start in range(0, n, size):
        yield slice(start, min(n, start + size))


def _cosine_lr(opt: torch.optim.Optimizer, steps: int, warmup: int) -> torch.optim.lr_scheduler.LambdaLR:
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))

    return torch.optim.lr_scheduler.LambdaLR(opt, factor)


# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------


def train_vae(vae: AutoencoderKL, recipe: DiffusionRecipe, seed: int, device: torch.device,
              progress: bool = True) -> dict[str, float]:
    """Reconstruction (object-weighted MSE in SD's [-1, 1] range) plus ``kl_weight`` x KL, on freshly rendered
    pairs every step (rendering costs ~2% of a step). Returns the last losses."""
    rng = numpy_rng(seed, "toyworld-sd", "vae-data")
    torch.manual_seed(derive_seed(seed, "toyworld-sd", "vae"))
    vae.to(device).train()
    opt = torch.optim.AdamW(vae.parameters(), lr=recipe.vae_lr, weight_decay=0.0)
    sched = _cosine_lr(opt, recipe.vae_steps, warmup=min(100, recipe.vae_steps // 10 + 1))
    stats = {"recon_mse": math.nan, "kl": math.nan}
    bar = tqdm(range(recipe.vae_steps), desc="toyworld VAE", disable=not progress)
    for _ in bar:
        _, images, scenes = render_pairs(rng, recipe.vae_batch)
        x = torch.from_numpy(images).to(device) * 2 - 1
        w = torch.from_numpy(object_weights(scenes, recipe.object_weight)).to(device)
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample()).sample
        mse = (w * (recon - x) ** 2).mean() / w.mean()
        kl = posterior.kl().mean() / posterior.mean[0].numel()
        loss = mse + recipe.kl_weight * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        sched.step()
        stats = {"recon_mse": mse.item(), "kl": kl.item()}
        bar.set_postfix(mse=f"{stats['recon_mse']:.4f}")
    vae.eval().requires_grad_(False)
    return stats


@torch.no_grad()
def encode_latents(vae: AutoencoderKL, images: np.ndarray, device: torch.device, batch: int = 512) -> torch.Tensor:
    """Unscaled posterior means ``(n, 4, h, w)``: with a tiny KL the posterior is nearly a
    point, so its mean is the latent SD would sample."""
    out = [vae.encode(torch.from_numpy(images[s]).to(device) * 2 - 1).latent_dist.mean.cpu()
           for s in _chunks(len(images), batch)]
    return torch.cat(out)


@dataclass
class LatentData:
    """The denoiser's training set: captions, unscaled latents ``(n, c, h, w)`` and per-cell
    loss weights ``(n, 1, h, w)`` (mean 1 per image)."""

    prompts: list[str]
    latents: torch.Tensor
    weights: torch.Tensor


def latent_dataset(vae: AutoencoderKL, recipe: DiffusionRecipe, seed: int, device: torch.device,
                   progress: bool = True) -> LatentData:
    """Render ``train_images`` pairs and encode them once (rendered chunk by chunk so the
    pixels never all sit in memory), with the object-weighted loss map of each."""
    rng = numpy_rng(seed, "toyworld-sd", "unet-data")
    caption_rng = numpy_rng(seed, "toyworld-sd", "captions")
    prompts: list[str] = []
    latents, weights = [], []
    side = latent_size(recipe)
    chunks = list(_chunks(recipe.train_images, 4096))
    for s in tqdm(chunks, desc="toyworld latents", disable=not progress):
        p, images, scenes = render_pairs(rng, s.stop - s.start, recipe.attribute_caption_rate, caption_rng)
        prompts += p
        latents.append(encode_latents(vae, images, device))
        w = F.adaptive_avg_pool2d(torch.from_numpy(object_weights(scenes, recipe.latent_object_weight)), side)
        weights.append(w / w.mean(dim=(1, 2, 3), keepdim=True))
    return LatentData(prompts, torch.cat(latents), torch.cat(weights))


def _token_ids(tokenizer: CLIPTokenizer, prompts: list[str]) -> torch.Tensor:
    """Token ids exactly as ``StableDiffusionPipeline.encode_prompt`` builds them."""
    return tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length,
                     truncation=True, return_tensors="pt").input_ids


def train_denoiser(
    text_encoder: CLIPTextModel,
    unet: UNet2DConditionModel,
    tokenizer: CLIPTokenizer,
    data: LatentData,
    recipe: DiffusionRecipe,
    seed: int,
    device: torch.device,
    progress: bool = True,
) -> dict[str, float]:
    """Joint text-encoder + U-Net training with SD's epsilon loss on ``data`` (latents already
    scaled), each latent cell weighted by ``data.weights``: ``unet_steps`` at ``unet_lr``, then,
    if the recipe has one, the refine run from those weights (``unet_refine_steps`` at
    ``unet_refine_lr``, its own optimizer, schedule and EMA, the same seeds).

    Prompts repeat (the world has ~2k distinct ones), so they are tokenized once and looked
    up by index. The EMA of the weights is what gets shipped: it samples much better than the
    raw weights after a short run. Returns each run's mean loss over its last tenth of the
    steps (``loss``, ``refine_loss``).
    """
    unique = sorted(set(data.prompts))
    index = {p: i for i, p in enumerate(unique)}
    prompt_idx = torch.tensor([index[p] for p in data.prompts])
    ids = _token_ids(tokenizer, unique)
    empty = _token_ids(tokenizer, [""])[0]
    noise_sched = ddpm_scheduler()
    alphas = noise_sched.alphas_cumprod.to(device)
    snr = alphas / (1 - alphas)
    runs = [("", recipe.unet_steps, recipe.unet_lr)]
    if recipe.unet_refine_steps:
        runs.append(("refine_", recipe.unet_refine_steps, recipe.unet_refine_lr))
    stats: dict[str, float] = {}
    for prefix, steps, lr in runs:
        torch.manual_seed(derive_seed(seed, "toyworld-sd", "denoiser"))
        gen = torch.Generator().manual_seed(derive_seed(seed, "toyworld-sd", "batches"))
        text_encoder.to(device).train().requires_grad_(True)
        unet.to(device).train().requires_grad_(True)
        params = list(text_encoder.parameters()) + list(unet.parameters())
        ema = EMAModel(params, decay=recipe.ema_decay, use_ema_warmup=True, power=2 / 3)
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=1e-2)
        sched = _cosine_lr(opt, steps, warmup=min(200, steps // 10 + 1))
        losses: list[float] = []
        bar = tqdm(range(steps), desc=f"toyworld U-Net{' (refine)' if prefix else ''}", disable=not progress)
        for _ in bar:
            idx = torch.randint(0, len(data.latents), (recipe.unet_batch,), generator=gen)
            z0 = data.latents[idx].to(device)
            tok = ids[prompt_idx[idx]]
            drop = torch.rand(len(idx), generator=gen) < recipe.caption_dropout
            tok[drop] = empty
            noise = torch.randn(z0.shape, generator=gen).to(device)
            t = torch.randint(0, noise_sched.config.num_train_timesteps, (len(idx),), generator=gen).to(device)
            cond = text_encoder(tok.to(device))[0]
            pred = unet(noise_sched.add_noise(z0, noise, t), t, cond).sample
            cell_weights = data.weights[idx].to(device)
            loss = (cell_weights * F.mse_loss(pred, noise, reduction="none")).mean(dim=(1, 2, 3))
            if recipe.snr_gamma is not None:
                loss = loss * (snr[t].clamp(max=recipe.snr_gamma) / snr[t]).to(loss.dtype)
            loss = loss.mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            sched.step()
            ema.step(params)
            losses.append(loss.item())
            bar.set_postfix(loss=f"{np.mean(losses[-50:]):.4f}")
        ema.copy_to(params)
        stats[f"{prefix}loss"] = float(np.mean(losses[-max(1, len(losses) // 10):]))
    text_encoder.eval().requires_grad_(False)
    unet.eval().requires_grad_(False)
    return stats


# ---------------------------------------------------------------------------------------------
# The whole model
# ---------------------------------------------------------------------------------------------


@dataclass
class TrainedModel:
    """The assembled pipeline and what training measured on the way."""

    pipe: StableDiffusionPipeline
    stats: dict[str, Any] = field(default_factory=dict)


def assemble_pipeline(vae: AutoencoderKL, text_encoder: CLIPTextModel, tokenizer: CLIPTokenizer,
                      unet: UNet2DConditionModel) -> StableDiffusionPipeline:
    """The stock pipeline around trained parts, with the sampler the model ships with."""
    return StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=dpm_solver(),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )


def sampling_defaults(recipe: DiffusionRecipe) -> dict[str, float | int]:
    return {"num_inference_steps": recipe.num_inference_steps, "guidance_scale": recipe.guidance_scale,
            "image_size": world.IMAGE_SIZE}


def train_diffusion(
    out_dir: str | Path,
    seed: int = 0,
    recipe: DiffusionRecipe | None = None,
    device: str | torch.device = "cpu",
    progress: bool = True,
    init_from: str | Path | None = None,
) -> TrainedModel:
    """Train VAE, then text encoder + U-Net (:func:`train_denoiser`), and ``save_pretrained`` the pipeline to ``out_dir``
    (with ``fairness_defaults.json``: the sampling settings the build validated).

    ``init_from`` (a saved toy pipeline) starts from that model instead of fresh weights: its
    VAE and latent scale are kept as they are (they encode images, whatever law drew them)
    and its text encoder and U-Net train on the recipe's data. That is how a change of the
    world's laws is carried into a model that already draws the shapes, in a fraction of the
    from-scratch budget; the recipe's sizes must match the saved model's."""
    recipe = recipe or DiffusionRecipe()
    dev = torch.device(device)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(out / "tokenizer", recipe.max_length)
    stats: dict[str, Any] = {}
    if init_from is not None:
        src = Path(init_from)
        if not (src / "unet").is_dir():
            raise FileNotFoundError(f"--init-from needs a saved toy pipeline (unet/, vae/, text_encoder/), none at {src}")
        vae = AutoencoderKL.from_pretrained(src / "vae")
        text_encoder = CLIPTextModel.from_pretrained(src / "text_encoder")
        unet = UNet2DConditionModel.from_pretrained(src / "unet")
        vae.eval().requires_grad_(False)
        data = latent_dataset(vae.to(dev), recipe, seed, dev, progress)
        scale = float(vae.config.scaling_factor)
        stats["init_from"] = str(src)
    else:
        torch.manual_seed(derive_seed(seed, "toyworld-sd", "init"))
        vae, text_encoder, unet = make_vae(recipe), make_text_encoder(tokenizer, recipe), make_unet(recipe)
        stats.update({f"vae_{k}": v for k, v in train_vae(vae, recipe, seed, dev, progress).items()})
        data = latent_dataset(vae, recipe, seed, dev, progress)
        scale = 1.0 / float(data.latents.std())
        vae.register_to_config(scaling_factor=scale)
    stats["latent_scaling_factor"] = scale
    stats.update({f"denoiser_{k}": v for k, v in train_denoiser(
        text_encoder, unet, tokenizer, replace(data, latents=data.latents * scale), recipe, seed, dev,
        progress).items()})

    pipe = assemble_pipeline(vae.cpu(), text_encoder.cpu(), tokenizer, unet.cpu())
    pipe.save_pretrained(str(out))
    (out / DEFAULTS_FILE).write_text(json.dumps(sampling_defaults(recipe), indent=1) + "\n")
    (out / "training.json").write_text(json.dumps(
        {"seed": seed, "recipe": asdict(recipe), "stats": stats}, indent=1) + "\n")
    pipe.set_progress_bar_config(disable=True)
    return TrainedModel(pipe=pipe.to(dev), stats=stats)

