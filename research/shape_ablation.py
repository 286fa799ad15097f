"""Where do the toy model's shapes go? Retrain part of it with one change, measure shape accuracy.

``python -m research.shape_ablation --tag NAME [--mode scratch|continue|full|shipped]
[--recipe JSON] [--min-size PX] --out bench/results/shape-ablation.jsonl`` appends one JSON line:
the change, the training loss and time, and the shape accuracy (the perception bundle's
semantic labeler) and attribute-law TV of generated images on every second train concept, 16
images each, with the shipped sampling settings, next to the shape accuracy of the same
concepts' rendered images after the VAE's round trip (how much of the shapes that latent space
keeps when it encodes rendered objects; a denoiser, which picks its own latents, can draw more). The modes:

* ``scratch``: a fresh text encoder and U-Net on the shipped VAE's latents (the VAE and the
  data are then held fixed, so the row isolates the denoiser);
* ``continue``: keep training the text encoder and U-Net of ``--assets`` (the shipped ones by
  default; does the budget limit it?);
* ``full``: the whole SD build (VAE too), for changes to the VAE recipe;
* ``shipped``: no training, the shipped model sampled with the recipe's ``num_inference_steps``
  and ``guidance_scale`` (is it the sampler?).

``scratch`` and ``continue`` train the recipe's whole denoiser training: its main run, then its
refine run (``"unet_refine_steps": 0`` for the main run alone).

``--min-size`` raises the world's smallest object (``world.MIN_SIZE``) for the training data
only, to test whether small objects are what the model cannot draw. Each row takes the
U-Net's training time (~50 min for 5000 steps of the default recipe on one CPU thread).
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from diffusers import StableDiffusionPipeline

from fairness.models.loading import load_perception, load_pipeline
from fairness.toyworld import DEFAULT_ASSETS, world
from fairness.toyworld import diffusion as recipe_lib
from fairness.toyworld.build import measure_fidelity

MODES = ("scratch", "continue", "full", "shipped")


def probe_concepts() -> list[world.Concept]:
    """Every second train concept with objects (19 of 38): enough to read the shape accuracy
    to a few points, at a sixth of the full fidelity report's cost."""
    return [c for c in world.concepts() if c.split == "train" and c.has_objects][::2]


def _pipeline_for(mode: str, recipe: recipe_lib.DiffusionRecipe, assets: Path, seed: int, init_seed: int
                  ) -> tuple[StableDiffusionPipeline, dict[str, float]]:
    """The shipped pipeline (``shipped``), or it with its text encoder and U-Net retrained
    (``continue``) or replaced by fresh ones and trained (``scratch``); plus training stats."""
    pipe = load_pipeline(str(assets / "sd"), device="cpu")
    if mode == "shipped":
        return pipe, {}
    data = recipe_lib.latent_dataset(pipe.vae, recipe, seed, torch.device("cpu"), progress=False)
    text_encoder, unet = pipe.text_encoder, pipe.unet
    if mode == "scratch":
        torch.manual_seed(init_seed)
        text_encoder, unet = recipe_lib.make_text_encoder(pipe.tokenizer, recipe), recipe_lib.make_unet(recipe)
    scaled = replace(data, latents=data.latents * pipe.vae.config.scaling_factor)
    stats = recipe_lib.train_denoiser(text_encoder, unet, pipe.tokenizer, scaled, recipe, seed,
                                      torch.device("cpu"), progress=False)
    pipe = recipe_lib.assemble_pipeline(pipe.vae, text_encoder, pipe.tokenizer, unet)
    pipe.set_progress_bar_config(disable=True)
    return pipe, stats


def run_ablation(mode: str, overrides: dict[str, Any], min_size: float | None = None, seed: int = 0,
                 init_seed: int = 1, assets: Path = DEFAULT_ASSETS, images_per_concept: int = 16,
                 concepts: list[world.Concept] | None = None, save_dir: Path | None = None) -> dict[str, Any]:
    """Train per ``mode`` with the shipped recipe changed by ``overrides``; return the row.

    ``seed`` drives the data, the batches and the sampling noise as in the build;
    ``init_seed`` only the fresh weights of ``scratch`` (the shipped model's init differs, so a
    ``scratch`` row with no overrides measures seed-to-seed noise)."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    recipe = recipe_lib.DiffusionRecipe().with_overrides(overrides)
    original_min = world.MIN_SIZE
    if min_size is not None:
        if not world.MIN_SIZE <= min_size <= world.MAX_SIZE:
            raise ValueError(f"--min-size must lie in [{world.MIN_SIZE}, {world.MAX_SIZE}], got {min_size}")
        world.MIN_SIZE = min_size
    try:
        start = time.perf_counter()
        if mode == "full":
            with tempfile.TemporaryDirectory() as tmp:
                model = recipe_lib.train_diffusion(save_dir or tmp, seed=seed, recipe=recipe, progress=False)
            pipe, stats = model.pipe, model.stats
        else:
            pipe, stats = _pipeline_for(mode, recipe, assets, seed, init_seed)
            if save_dir:
                pipe.save_pretrained(str(save_dir))
        seconds = time.perf_counter() - start
    finally:
        world.MIN_SIZE = original_min
    bundle = load_perception(str(assets / "perception"))
    spec = recipe_lib.sampling_defaults(recipe)
    report = measure_fidelity(pipe, bundle, seed, spec["num_inference_steps"], spec["guidance_scale"],
                              images_per_concept, concepts=concepts or probe_concepts(), progress=False)
    generated = report["summary"]["train"]["generated"]
    return {"mode": mode, "recipe": overrides, "min_size": min_size, "seed": seed,
            "init_seed": init_seed if mode == "scratch" else None, "stats": stats,
            "train_seconds": round(seconds), "torch_threads": torch.get_num_threads(),
            "shape_accuracy": generated["semantic_accuracy"], "tv": generated["tv"],
            "vae_shape_accuracy": report["summary"]["train"]["reconstructed"]["semantic_accuracy"]}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m research.shape_ablation", description="Retrain part of the toy SD model with one change; "
                                                 "append its shape accuracy to a JSON-lines file.")
    parser.add_argument("--tag", required=True)
    parser.add_argument("--mode", choices=MODES, default="scratch")
    parser.add_argument("--recipe", default="{}", help='DiffusionRecipe overrides, e.g. {"unet_steps": 3500}')
    parser.add_argument("--min-size", type=float, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--init-seed", type=int, default=1, help="fresh weights of --mode scratch")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--save-dir", type=Path, default=None, help="save the retrained pipeline here")
    parser.add_argument("--assets", type=Path, default=DEFAULT_ASSETS,
                        help="a world's assets (sd/, perception/); with --mode shipped, measure a saved model")
    parser.add_argument("--out", type=Path, default=Path("bench/results/shape-ablation.jsonl"))
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    row = {"tag": args.tag, **run_ablation(args.mode, recipe_lib.parse_overrides(args.recipe), args.min_size, args.seed,
                                          args.init_seed, assets=args.assets, save_dir=args.save_dir),
           "command": shlex.join(["python", "-m", "research.shape_ablation", *argv])}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with args.out.open("a") as f:
        f.write(json.dumps(row) + "\n")
    print(json.dumps(row, indent=1))


if __name__ == "__main__":
    main()
