"""The iteration suite (``python -m fairness.bench --out DIR`` / ``make bench``), written as JSON.

Speed and memory live here, not in timed tests. Measured on the model given (default: the
shipped toy model), on whatever device is present:

* one debiasing iteration (originals + adjusted DFT forward/backward + losses) for each DFT
  mode, with and without gradient checkpointing: seconds and peak memory;
* plain sampling of the same batch;
* OT target assignment for K = 2, 4, 8, 16 classes.

Each configuration runs in a fresh subprocess so peak-memory figures do not contaminate each
other (CUDA: ``max_memory_allocated``; CPU: the process's peak RSS).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fairness.bench.common import device_name, peak_memory_mb, run_case


def _iteration_case(model: str, perception: str, mode: str, checkpoint: bool, batch: int, steps: int, repeats: int) -> dict[str, Any]:
    from fairness.config import DebiasConfig
    from fairness.training.loop import Trainer

    cfg = DebiasConfig.model_validate({
        "model": {"path": model}, "perception": perception,
        "prompts": {"train": [{"prompts": ["a photo of a doctor"]}]},
        "target": {"joint": {"attributes": _two_attributes(perception), "probs": "uniform"}},
        "dft": {"mode": mode, "steps": steps, "checkpoint_unet": checkpoint, "checkpoint_vae": checkpoint},
        "train": {"iterations": repeats + 1, "images_per_prompt": batch, "checkpoint_every": 10**6, "ema_decay": None},
    })
    import tempfile

    trainer = Trainer(cfg, tempfile.mkdtemp(prefix="bench-"), progress=False)
    trainer.train_step()  # warm-up
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(repeats):
        trainer.train_step()
    sec = (time.perf_counter() - t0) / repeats
    return {"seconds_per_iteration": sec, "seconds_per_image": sec / batch, "peak_memory_mb": peak_memory_mb()}


def _sampling_case(model: str, batch: int, steps: int, repeats: int) -> dict[str, Any]:
    from fairness.dft.engine import SamplingConfig
    from fairness.generation import load_model
    from fairness.seeding import image_noise

    m = load_model(model)
    noise = image_noise(0, "bench", range(batch), m.latent_shape).to(m.pipe.device)
    cfg = SamplingConfig(num_steps=steps, mode="none")
    m.generate(["a photo of a doctor"] * batch, noise, cfg)
    t0 = time.perf_counter()
    for _ in range(repeats):
        m.generate(["a photo of a doctor"] * batch, noise, cfg)
    return {"seconds": (time.perf_counter() - t0) / repeats, "peak_memory_mb": peak_memory_mb()}


def _two_attributes(perception: str) -> list[str]:
    from fairness.models.loading import load_perception

    return list(load_perception(perception).attributes)[:2]


def _ot_cases() -> dict[str, Any]:
    from fairness.targets.assignment import expected_assignment

    rng = np.random.default_rng(0)
    out = {}
    for k, n in ((2, 24), (4, 24), (8, 32), (16, 40)):
        p = rng.dirichlet(np.ones(k), size=n)
        d = np.full(k, 1 / k)
        expected_assignment(p, d)
        t0 = time.perf_counter()
        for _ in range(5):
            expected_assignment(p, d, seed=1)
        out[f"K{k}_N{n}"] = {"seconds": (time.perf_counter() - t0) / 5}
    return out


def run(model: str, perception: str, batch: int, steps: int, repeats: int) -> dict[str, Any]:
    results: dict[str, Any] = {
        "device": device_name(),
        "threads": torch.get_num_threads(), "model": model, "batch": batch, "steps": steps, "repeats": repeats,
        "iteration": {}, "ot": _ot_cases(),
    }
    for mode, ckpt in (("adjusted", True), ("adjusted", False), ("naive", True)):
        name = f"{mode}{'' if ckpt else '_no_checkpointing'}"
        results["iteration"][name] = run_case([], {"kind": "iteration", "model": model, "perception": perception, "mode": mode,
                                                "checkpoint": ckpt, "batch": batch, "steps": steps, "repeats": repeats})
    results["sampling"] = run_case([], {"kind": "sampling", "model": model, "batch": batch, "steps": steps, "repeats": repeats})
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fairness.bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="toyworld")
    parser.add_argument("--perception", default="toyworld")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default="bench/results")
    parser.add_argument("--case", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.case:
        case = json.loads(args.case)
        kind = case.pop("kind")
        res = _iteration_case(**case) if kind == "iteration" else _sampling_case(**case)
        print(json.dumps(res))
        return 0
    results = run(args.model, args.perception, args.batch, args.steps, args.repeats)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"bench-{'gpu' if torch.cuda.is_available() else 'cpu'}.json"
    path.write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
