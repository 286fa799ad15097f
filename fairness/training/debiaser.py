"""The model being debiased: generator + adapter + objective, built from a config.

One object answers the three questions the loop asks each iteration: what does the finetuned
model make from this noise (with gradient), what did the frozen model make from it (the
originals), and what is the loss.
"""

from __future__ import annotations

import warnings
from contextlib import nullcontext

import torch

from fairness.adapters.trainable import attach_adapter
from fairness.config import DebiasConfig
from fairness.dft.engine import generate
from fairness.seeding import derive_seed
from fairness.models.loading import check_model_folder, load_perception, load_pipeline, resolve_device
from fairness.targets.assignment import UnreachableTargetWarning, unreachable_targets
from fairness.targets.distributions import TargetSpec
from fairness.training.objective import Objective


class Debiaser:
    """Built cheapest check first, so a bad input fails before the expensive loads: the config
    already validated the target's numbers; then the model folder's presence, the perception
    bundle and the target's attribute and class names, and only then the diffusion pipeline."""

    def __init__(self, cfg: DebiasConfig, device: str | None = None):
        self.cfg = cfg
        self.device = resolve_device(device or cfg.model.device)
        check_model_folder(cfg.model.path)
        self.bundle = load_perception(cfg.perception).to(self.device)
        self.groups = TargetSpec.from_dict(cfg.target).compile(self.bundle.attributes)
        for bad in unreachable_targets(self.groups, cfg.train.images_per_prompt, cfg.loss.threshold):
            warnings.warn(bad.message(), UnreachableTargetWarning, stacklevel=2)
        self.objective = Objective(self.bundle, self.groups, cfg.loss)
        self.pipe = load_pipeline(cfg.model.path, cfg.model.dtype, str(self.device))
        # The adapter's random init (LoRA A matrices) is keyed by the run seed, not by whatever
        # the global RNG holds, so every worker and every resumed process starts identical.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(derive_seed(cfg.seed, "adapter-init"))
            self.adapter = attach_adapter(self.pipe, cfg.adapter.spec())
        half = cfg.model.dtype in ("float16", "bfloat16")
        self.autocast_dtype = getattr(torch, cfg.model.dtype) if half else None

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        c = self.pipe.unet.config
        return (c.in_channels, c.sample_size, c.sample_size)

    def _autocast(self):
        if self.autocast_dtype is None:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def sample(self, prompts: list[str], noise: torch.Tensor, num_steps: int, mode: str) -> torch.Tensor:
        """The finetuned model's images (``mode``: adjusted / naive with gradient, none without)."""
        prefixed = [self.adapter.prompt_prefix + p for p in prompts]
        with self._autocast():
            return generate(self.pipe, prefixed, noise.to(self.device), self.cfg.dft.sampling(num_steps, mode))

    @torch.no_grad()
    def sample_original(self, prompts: list[str], noise: torch.Tensor, num_steps: int) -> torch.Tensor:
        """The frozen model's images from the same noise: adapter off, no soft-token prefix."""
        with self.adapter.disabled(), self._autocast():
            return generate(self.pipe, list(prompts), noise.to(self.device), self.cfg.dft.sampling(num_steps, "none"))
