"""The main job: audit the original model, debias it, audit again, write metrics and a report.

Every test prompt set of the config (e.g. held-out concepts, unseen templates, unseen contexts)
is audited before and after, with the evaluation classifier, from the same noise.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fairness.checksums import tensor_sha256
from fairness.config import DebiasConfig
from fairness.metrics.audit import AuditResult, GenerateFn, audit, rows_to_csv_records
from fairness.training.loop import TrainResult, Trainer
from fairness.training.prompts import resolve_prompts


def drawn_once(generate: GenerateFn, budget_bytes: int = 2 * 2**30) -> GenerateFn:
    """``generate``, remembering each (prompts, noise) call's images, on the CPU, up to
    ``budget_bytes`` of them (later calls just sample).

    The audit after debiasing compares every image with the original model's image from the
    same noise, which the audit before debiasing has already drawn: sampling is deterministic
    given the noise, so the second audit reads them back instead of sampling them again (a
    third of the job's audit time). The budget keeps a large SD audit (512 px images) from
    holding them all in memory."""
    cache: dict[tuple[tuple[str, ...], str], torch.Tensor] = {}
    held = 0

    def wrapped(prompts: list[str], noise: torch.Tensor) -> torch.Tensor:
        nonlocal held
        key = (tuple(prompts), tensor_sha256(noise))
        if key in cache:
            return cache[key]
        images = generate(prompts, noise)
        size = images.numel() * images.element_size()
        if held + size <= budget_bytes:
            cache[key] = images.cpu()
            held += size
        return images

    return wrapped


@dataclass
class JobResult:
    train: TrainResult
    before: dict[str, AuditResult]
    after: dict[str, AuditResult]
    metrics_path: Path
    report_path: Path | None


def write_metrics(out_dir: Path, before: dict[str, AuditResult], after: dict[str, AuditResult], extra: dict[str, Any]) -> Path:
    """``metrics.json`` (summaries + per-prompt rows, before and after) and one CSV per set."""
    out_dir.mkdir(parents=True, exist_ok=True)
    data = {
        **extra,
        "sets": {name: {"before": before[name].to_json(), "after": after[name].to_json()} for name in after},
    }
    first = next(iter(after))
    data["summary"] = after[first].summary
    data["summary_before"] = before[first].summary
    path = out_dir / "metrics.json"
    path.write_text(json.dumps(data, indent=2))
    for name in after:
        records = [{"model": "original", **r} for r in rows_to_csv_records(before[name])]
        records += [{"model": "debiased", **r} for r in rows_to_csv_records(after[name])]
        keys = sorted({k for r in records for k in r}, key=lambda k: (k not in ("model", "prompt"), k))
        with (out_dir / f"metrics_{name}.csv").open("w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=keys)
            w.writeheader()
            w.writerows(records)
    return path


def run_job(cfg: DebiasConfig, run_dir: str | Path, progress: bool = True, report: bool = True,
            grid_prompts: int = 4) -> JobResult:
    run = Path(run_dir)
    trainer = Trainer(cfg, run, progress=progress)
    model = trainer.model
    sets = {ps.name: resolve_prompts(ps) for ps in cfg.prompts.test} or {"val": trainer.val_prompts}
    steps = cfg.dft.eval_steps
    n = cfg.audit_images_per_prompt

    def debiased(prompts: list[str], noise):
        return model.sample(prompts, noise, steps, "none")

    @drawn_once
    def original(prompts: list[str], noise):
        return model.sample_original(prompts, noise, steps)

    def run_audit(gen, orig, name: str, prompts: list[str]) -> AuditResult:
        return audit(gen, model.bundle, prompts, n, cfg.seed, model.latent_shape, originals=orig,
                     keep_images=True, progress=progress)

    before = {name: run_audit(original, None, name, p) for name, p in sets.items()}
    result = trainer.fit()
    after = {name: run_audit(debiased, original, name, p) for name, p in sets.items()}
    for name in after:  # keep grids small: the first prompts only
        for res in (before[name], after[name]):
            res.images, res.originals = res.images[:grid_prompts], res.originals[:grid_prompts]
    metrics = write_metrics(run, before, after, {"config": cfg.name, "steps": result.steps,
                                                 "skipped_steps": result.skipped, "best_step": result.best_step})
    report_path = None
    if report:
        from fairness.report.job_report import write_job_report

        report_path = write_job_report(run, cfg, model.groups, before, after)
    return JobResult(result, before, after, metrics, report_path)
