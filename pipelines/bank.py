"""Ray Data: build the originals bank for a run's planned iterations in parallel.

The (prompt, noise seed, sampler steps) of every planned iteration comes from the run's own
:func:`fairness.training.plan.iteration_plan`, so the bank holds exactly the originals training would generate.
A pool of actors (one per GPU, or per CPU slot) each loads the frozen model and the perception
bundle once and maps batches of planned images to bank rows; the rows land as parquet, with the
job's fingerprint beside them (:func:`fairness.training.bank.bank_fingerprint`) so that a job
with another model, guidance, resolution or perception refuses the bank.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import numpy as np

from fairness.config import DebiasConfig, load_config


class OriginalsWorker:
    """Ray Data actor: frozen model + perception, loaded once per actor."""

    def __init__(self, config: dict[str, Any], device: str):
        from fairness.training.debiaser import Debiaser

        cfg = DebiasConfig.model_validate(config)
        self.model = Debiaser(cfg, device=device)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list]:
        from fairness.seeding import image_noise
        from fairness.training.bank import info_to_rows

        rows: list[dict[str, Any]] = []
        for prompt, seed, steps, start, count in zip(batch["prompt"], batch["noise_seed"], batch["num_steps"],
                                                     batch["start"], batch["count"]):
            idx = list(range(int(start), int(start) + int(count)))
            noise = image_noise(int(seed), str(prompt), idx, self.model.latent_shape)
            images = self.model.sample_original([str(prompt)] * len(idx), noise, int(steps))
            info = self.model.objective.describe_originals(images)
            rows += info_to_rows(info, str(prompt), int(seed), idx, int(steps))
        return {k: [r[k] for r in rows] for k in rows[0]} if rows else {}


def plan_items(cfg: DebiasConfig, steps: range, chunk: int) -> list[dict[str, Any]]:
    """One item per (iteration, prompt of it, chunk of its images)."""
    from fairness.training.plan import iteration_plan
    from fairness.training.prompts import PromptSampler

    sampler = PromptSampler(cfg.prompts.train, cfg.seed)
    n = cfg.train.images_per_prompt
    return [{"step": step, "prompt": d.prompt, "noise_seed": d.noise_seed, "num_steps": d.num_steps,
             "start": start, "count": min(chunk, n - start)}
            for step in steps for d in iteration_plan(cfg, sampler, step) for start in range(0, n, chunk)]


def build_bank(cfg: DebiasConfig, out: str | Path, first_step: int = 1, last_step: int | None = None,
               actors: int | None = None, gpus_per_actor: float = 0, chunk: int = 8) -> Path:
    """Write the bank for iterations ``first_step..last_step`` (default: the whole run).

    Adding iterations to an existing bank folder is allowed only for the job it was built for
    (rows of two jobs under one fingerprint would be stale without anyone knowing)."""
    import ray

    from fairness.training.bank import bank_fingerprint, check_fingerprint, read_fingerprint, write_fingerprint

    out = Path(out).resolve()
    fingerprint = bank_fingerprint(cfg)
    if out.exists() and any(out.iterdir()):
        check_fingerprint(read_fingerprint(out), fingerprint, out)
    if not ray.is_initialized():
        ray.init(include_dashboard=False)
    last = last_step or cfg.train.iterations
    items = plan_items(cfg, range(first_step, last + 1), chunk)
    use_gpu = gpus_per_actor > 0
    pool = actors or max(1, int(ray.available_resources().get("GPU" if use_gpu else "CPU", 1)))
    ds = ray.data.from_items(items).map_batches(
        OriginalsWorker, fn_constructor_kwargs={"config": cfg.model_dump(mode="json"), "device": "cuda" if use_gpu else "cpu"},
        batch_size=1, concurrency=pool, num_gpus=gpus_per_actor if use_gpu else None,
        num_cpus=None if use_gpu else 1,
    )
    ds.write_parquet(str(out))
    write_fingerprint(out, fingerprint)
    return out


def main(argv: list[str], prog: str = "fairness bank") -> int:
    parser = argparse.ArgumentParser(prog=prog, description="Precompute the frozen model's originals for a run (Ray Data).")
    parser.add_argument("--config", required=True)
    parser.add_argument("--out", required=True, help="parquet folder; then set train.originals_bank to it")
    parser.add_argument("--first-step", type=int, default=1)
    parser.add_argument("--last-step", type=int, default=None)
    parser.add_argument("--actors", type=int, default=None, help="actor pool size (default: GPUs or CPUs)")
    parser.add_argument("--gpus-per-actor", type=float, default=0)
    args = parser.parse_args(argv)
    path = build_bank(load_config(args.config), args.out, args.first_step, args.last_step, args.actors, args.gpus_per_actor)
    print(f"originals bank written to {path}")
    return 0
