"""Ray Train: the library's training loop on N workers (NCCL on GPUs, gloo on CPUs).

The per-worker function is the library's :class:`~fairness.training.loop.Trainer`, unchanged.
Ray contributes three things through the loop's hooks:

* a :class:`TorchCollective`: each iteration's N images are split across workers, class
  probabilities are all-gathered so the OT targets are computed over the whole batch (and are
  identical on every worker), and trainable gradients are averaged;
* checkpoints: every ``checkpoint_every`` steps each worker calls ``ray.train.report`` and the
  main worker attaches the checkpoint folder (adapter, optimizer, EMA, counters, step);
* fault tolerance: ``FailureConfig(max_failures=...)`` restarts a lost worker group, which
  resumes from ``ray.train.get_checkpoint()`` and ends at exactly the configured step count.
"""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from fairness.config import DebiasConfig
from fairness.training.loop import TrainResult, Trainer


class TorchCollective:
    """The batch split over the ``torch.distributed`` process group Ray Train set up."""

    def __init__(self) -> None:
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        self.world_size = dist.get_world_size() if dist.is_initialized() else 1

    def all_gather(self, local: np.ndarray) -> np.ndarray:
        if self.world_size == 1:
            return local
        t = torch.from_numpy(np.ascontiguousarray(local, dtype=np.float64))
        if dist.get_backend() == "nccl":
            t = t.cuda()
        parts = [torch.empty_like(t) for _ in range(self.world_size)]
        dist.all_gather(parts, t)
        return torch.cat(parts).cpu().numpy()

    def local_slice(self, total: int) -> slice:
        per = total // self.world_size
        return slice(self.rank * per, (self.rank + 1) * per)

    def average_gradients(self, params: list[torch.nn.Parameter]) -> None:
        if self.world_size == 1:
            return
        for p in params:
            dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)
            p.grad /= self.world_size


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    """What every Ray Train worker runs: build the Trainer, resume, fit, report."""
    import ray.train

    cfg = DebiasConfig.model_validate(loop_config["config"])
    ctx = ray.train.get_context()
    device = "cuda" if torch.cuda.is_available() and loop_config.get("use_gpu") else "cpu"
    if device == "cuda":
        torch.cuda.set_device(ctx.get_local_rank())
        cfg = cfg.model_copy(update={"model": cfg.model.model_copy(update={"device": f"cuda:{ctx.get_local_rank()}"})})
    else:
        cfg = cfg.model_copy(update={"model": cfg.model.model_copy(update={"device": "cpu"})})
    torch.set_num_threads(max(1, int(loop_config.get("threads_per_worker", 1))))

    def report(step: int, path: Path | None, metrics: dict[str, Any]) -> None:
        checkpoint = ray.train.Checkpoint.from_directory(str(path)) if path is not None else None
        ray.train.report({k: v for k, v in metrics.items() if isinstance(v, (int, float))}, checkpoint=checkpoint)

    run = Path(loop_config["run_dir"])
    trainer = Trainer(cfg, run, collective=TorchCollective(), on_checkpoint=report,
                      progress=loop_config.get("progress", True))
    # Which process on which node is which rank (operators and the fault-tolerance test read this).
    workers = run / "workers"
    workers.mkdir(exist_ok=True)
    (workers / f"rank_{ctx.get_world_rank()}.json").write_text(json.dumps(
        {"pid": os.getpid(), "node_id": ray.get_runtime_context().get_node_id()}))
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            trainer.resume(Path(d))
    elif loop_config.get("resume", True):
        trainer.resume()
    if trainer.is_main:
        trainer.run.append(run / "attempts.jsonl", {"step": trainer.step, "pid": os.getpid(), "world_size": trainer.collective.world_size})
    trainer.fit(resume=False)


def fit_distributed(
    cfg: DebiasConfig,
    run_dir: str | Path,
    workers: int = 2,
    gpus_per_worker: float = 0,
    cpus_per_worker: float | None = None,
    max_failures: int = 2,
    resume: bool = True,
    progress: bool = True,
    placement_strategy: str = "PACK",
) -> TrainResult:
    """Run the debiasing loop on ``workers`` Ray Train workers; returns the main worker's result."""
    import ray
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    run = Path(run_dir).resolve()
    run.mkdir(parents=True, exist_ok=True)
    if not ray.is_initialized():
        ray.init(include_dashboard=False)
    use_gpu = gpus_per_worker > 0
    resources = {"CPU": cpus_per_worker if cpus_per_worker is not None else (1 if use_gpu else 0.5)}
    if use_gpu:
        resources["GPU"] = gpus_per_worker
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"config": cfg.model_dump(mode="json"), "run_dir": str(run), "use_gpu": use_gpu,
                           "resume": resume, "progress": progress},
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=use_gpu, resources_per_worker=resources,
                                     placement_strategy=placement_strategy),
        run_config=RunConfig(name=f"{cfg.name}-{uuid.uuid4().hex[:8]}", storage_path=str(run / "ray"),
                             failure_config=FailureConfig(max_failures=max_failures)),
    )
    result = trainer.fit()
    if result.error:
        raise result.error
    from fairness.training.rundir import RunDir

    state = RunDir.load_checkpoint(Path(result.checkpoint.path)) if result.checkpoint else {}
    return TrainResult(run, int(state.get("step", 0)), int(state.get("skipped", 0)), state.get("best_step"),
                       state.get("best_score"), run / "adapter")
