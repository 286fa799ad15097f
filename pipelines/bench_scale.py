"""Scaling benchmark: Ray Train throughput with 1 vs N workers, and bank vs no bank.

``python -m pipelines.bench_scale --out bench/results/scale.json [--config C] [--iterations K]``

* ``train_1_worker`` / ``train_N_workers``: wall seconds of ``fit_distributed`` for the same
  global batch, and images per second (start-up included and reported separately as the
  time to the first logged iteration).
* ``iteration_no_bank`` / ``iteration_with_bank``: mean seconds of a single-process training
  iteration generating the originals vs looking them up in an originals bank.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

from fairness.config import DebiasConfig, load_config


def _train_case(cfg: DebiasConfig, workers: int) -> dict[str, Any]:
    from pipelines.train import fit_distributed

    run = Path(tempfile.mkdtemp(prefix=f"scale-{workers}w-"))
    t0 = time.perf_counter()
    fit_distributed(cfg, run, workers=workers, progress=False)
    wall = time.perf_counter() - t0
    rows = [json.loads(x) for x in (run / "log.jsonl").read_text().splitlines()]
    train_s = sum(r["seconds"] for r in rows)
    images = cfg.train.iterations * cfg.train.images_per_prompt
    return {"workers": workers, "wall_seconds": wall, "iteration_seconds_total": train_s,
            "images_per_second_training": images / train_s, "images_per_second_wall": images / wall}


def _bank_case(cfg: DebiasConfig) -> dict[str, Any]:
    from fairness.training.bank import OriginalsBank
    from fairness.training.loop import Trainer
    from pipelines.bank import build_bank

    root = Path(tempfile.mkdtemp(prefix="scale-bank-"))
    bank = OriginalsBank(build_bank(cfg, root / "bank", actors=1))
    out = {}
    for name, b in (("iteration_no_bank", None), ("iteration_with_bank", bank)):
        trainer = Trainer(cfg, root / name, progress=False, bank=b)
        rows = [trainer.train_step() for _ in range(cfg.train.iterations)]
        out[name] = {"seconds": sum(r["seconds"] for r in rows[1:]) / max(1, len(rows) - 1)}
    return out


def main(argv: list[str] | None = None) -> int:
    import ray

    parser = argparse.ArgumentParser(prog="python -m pipelines.bench_scale", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="pipelines/configs/toyworld/main.yaml")
    parser.add_argument("--iterations", type=int, default=6)
    parser.add_argument("--images-per-prompt", type=int, default=16)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--out", default="bench/results/scale.json")
    args = parser.parse_args(argv)
    cfg = load_config(args.config, {"train.iterations": args.iterations, "train.checkpoint_every": args.iterations,
                                    "train.images_per_prompt": args.images_per_prompt, "prompts.val": []})
    ray.init(include_dashboard=False)
    result = {"config": args.config, "iterations": args.iterations, "images_per_prompt": args.images_per_prompt,
              "train_1_worker": _train_case(cfg, 1), f"train_{args.workers}_workers": _train_case(cfg, args.workers),
              **_bank_case(cfg)}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
