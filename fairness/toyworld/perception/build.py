"""The perception build: render data, train every network, measure it and write the bundle.

``python -m fairness.toyworld.perception OUT_DIR [--seed S] [--quick]`` runs :func:`main`.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from fairness.seeding import derive_seed
from fairness.toyworld import world as W
from fairness.toyworld.perception.bank import face_bank
from fairness.toyworld.perception.clip import tokenizer_config
from fairness.toyworld.perception.data import natural_data
from fairness.toyworld.perception.measure import (
    measure_classifier,
    measure_clip,
    measure_detector,
    measure_embedder,
    measure_encoder,
)
from fairness.toyworld.perception.train import (
    train_classifier,
    train_clip,
    train_detector,
    train_embedder,
    train_encoder,
)

TRAIN_CLASSIFIER = {"variant": "a", "input_size": 24, "width": 12}
EVAL_CLASSIFIER = {"variant": "b", "input_size": 20, "width": 12}
ENCODERS = {
    # "clip" / "dino" feed the training loss, "*_eval" the metrics: other seeds and data, and
    # (like the paper's ViT-H vs ViT-bigG CLIP) a wider evaluation CLIP, a different-design DINO.
    "clip": {"variant": "a", "width": 12, "dim": 32, "text_hidden": 32, "text_layers": 2},
    "clip_eval": {"variant": "a", "width": 16, "dim": 32, "text_hidden": 32, "text_layers": 2},
    "dino": {"variant": "a", "width": 12, "dim": 32},
    "dino_eval": {"variant": "b", "width": 10, "dim": 32},
}
EMBEDDER = {"variant": "a", "width": 12, "dim": 32, "input_size": 24}


def _save(module: nn.Module, path: Path) -> None:
    save_file({k: v.detach().contiguous().cpu() for k, v in module.state_dict().items()}, str(path))


def build_perception(out_dir: Path, seed: int = 0, quick: bool = False, device: str = "cpu") -> dict:
    """Train every toy-world perception network and write the bundle into ``out_dir``.

    ``quick`` trains for a handful of steps on a few images (a smoke test of the whole build
    in seconds); the full build takes a few minutes on one CPU thread. Returns the measured
    accuracies on freshly rendered data (also stored under ``metrics`` in ``bundle.json``).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    scale = (lambda full, small: small) if quick else (lambda full, small: full)
    start = time.perf_counter()
    tokenizer = tokenizer_config(W.vocabulary())

    detector = train_detector(seed, scale(4000, 64), scale(1000, 3), device)
    train_clf = train_classifier(detector, seed, "train-classifier", TRAIN_CLASSIFIER,
                                 scale(8000, 64), scale(1200, 3), device)
    eval_clf = train_classifier(detector, derive_seed(seed, "independent"), "eval-classifier",
                                EVAL_CLASSIFIER, scale(8000, 64), scale(1500, 3), device)
    encoders: dict[str, nn.Module] = {}
    for name, cfg in ENCODERS.items():
        kseed = seed if name in ("clip", "dino") else derive_seed(seed, "independent")
        if name.startswith("clip"):
            encoders[name] = train_clip(kseed, name, {**tokenizer, "name": name, **cfg},
                                        scale(6000, 64), scale(900, 3), device)
        else:
            encoders[name] = train_encoder(kseed, name, {"name": name, **cfg},
                                           scale(6000, 64), scale(400, 3), device)
    embedder = train_embedder(seed, EMBEDDER, scale(6000, 64), scale(400, 3), device)
    bank = face_bank(embedder, detector, seed, per_combination=scale(14, 1))

    test = natural_data(derive_seed(seed, "measure"), "test", scale(1500, 64))
    metrics: dict[str, Any] = {
        "detector": measure_detector(detector, test),
        "train_classifier": measure_classifier(train_clf, detector, test),
        "eval_classifier": measure_classifier(eval_clf, detector, test),
        "clip": measure_clip(encoders["clip"], natural_data(derive_seed(seed, "measure"), "clip", scale(300, 16))),
        "clip_eval": measure_clip(encoders["clip_eval"], natural_data(derive_seed(seed, "measure"), "clip", scale(300, 16))),
        "dino": measure_encoder(encoders["dino"], derive_seed(seed, "measure"), "dino", scale(256, 16)),
        "dino_eval": measure_encoder(encoders["dino_eval"], derive_seed(seed, "measure"), "dino", scale(256, 16)),
        "embedder": measure_embedder(embedder, detector, bank, test),
        "face_bank_size": int(bank.shape[0]),
    }

    _save(detector, out / "detector.safetensors")
    _save(train_clf, out / "train_classifier.safetensors")
    _save(eval_clf, out / "eval_classifier.safetensors")
    for name, enc in encoders.items():
        _save(enc, out / f"{name}.safetensors")
    _save(embedder, out / "face_embedder.safetensors")
    save_file({"bank": bank.contiguous()}, str(out / "face_bank.safetensors"))

    def spec(backend: str, weights: str, config: dict[str, Any]) -> dict[str, Any]:
        return {"backend": backend, "weights": weights, "config": config}

    enc_specs = {
        name: spec("toyworld.clip" if name.startswith("clip") else "toyworld.encoder", f"{name}.safetensors",
                   {"name": name, **(tokenizer if name.startswith("clip") else {}), **cfg})
        for name, cfg in ENCODERS.items()
    }
    metrics["build_seconds"] = round(time.perf_counter() - start, 1)
    manifest = {
        "components": {
            "detector": spec("toyworld.detector", "detector.safetensors", {}),
            "train_classifier": spec("toyworld.classifier", "train_classifier.safetensors", TRAIN_CLASSIFIER),
            "eval_classifier": spec("toyworld.classifier", "eval_classifier.safetensors", EVAL_CLASSIFIER),
            "encoders": enc_specs,
            # CLIP-T is an evaluation metric, so it reads through the evaluation CLIP.
            "text_image_encoder": enc_specs["clip_eval"],
            "face_embedder": spec("toyworld.embedder", "face_embedder.safetensors", EMBEDDER),
            # Which shape a prompt asks for: the semantic-accuracy metric (CLIP-T's exact analog).
            "semantic_labeler": {"backend": "toyworld.semantic_labeler"},
        },
        "semantic_encoders": ["clip", "dino"],
        "eval_encoders": {"clip_i": "clip_eval", "dino": "dino_eval"},
        "face_bank": "face_bank.safetensors",
        "build": {"seed": seed, "quick": quick, "world_seed": W.WORLD_SEED},
        "metrics": metrics,
    }
    (out / "bundle.json").write_text(json.dumps(manifest, indent=1))
    return metrics


def main(argv: list[str] | None = None) -> None:
    """``python -m fairness.toyworld.perception OUT_DIR``: build a bundle on one CPU thread."""
    parser = argparse.ArgumentParser(prog="python -m fairness.toyworld.perception", description=main.__doc__)
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    print(json.dumps(build_perception(args.out_dir, args.seed, args.quick, args.device), indent=1))
