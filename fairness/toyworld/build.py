"""``fairness toyworld build``: train the toy world's perception bundle and SD model, then
measure how faithful the model is to the world it was trained on.

The debiasing experiments are only meaningful if the shipped generator draws what the world
says it should: the right shape for each concept (semantics to preserve) and each concept's
biased attribute law (the bias to remove). ``fidelity.json`` records both, each next to the
same measurement made on *rendered* ground truth for the same prompts: that reference
carries the same sampling noise and the same classifier errors, so the gap between the two is
the generator's own error. A third set, the rendered images *reconstructed* by the model's
VAE (encode, decode), splits that error in two: what the latent space cannot carry at all
(rendered vs reconstructed) and what the denoiser fails to draw (reconstructed vs generated).
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from diffusers import AutoencoderKL, StableDiffusionPipeline
from tqdm.auto import tqdm

from fairness.metrics.audit import agreement
from fairness.metrics.bias import bias, frequencies, total_variation
from fairness.perception.bundle import PerceptionBundle, load_bundle
from fairness.perception.regions import detect_largest, square_crop
from fairness.seeding import image_noise, numpy_rng
from fairness.toyworld import DEFAULT_ASSETS, world
from fairness.toyworld.diffusion import DEFAULTS_FILE, DiffusionRecipe, parse_overrides, train_diffusion
from fairness.toyworld.perception import build_perception
from fairness.toyworld.render import render

SPLITS = ("train", "val", "test")
SOURCES = ("generated", "reconstructed", "rendered")


# ---------------------------------------------------------------------------------------------
# Images for the measurement
# ---------------------------------------------------------------------------------------------


def concept_prompts(concept: world.Concept, n: int) -> list[tuple[str, int]]:
    """``n`` (prompt, image index) pairs cycling over the seen templates and contexts, so a
    concept's images cover its prompts evenly; the index keys the image's initial noise."""
    prompts = [world.make_prompt(concept, t, c) for t in world.TEMPLATES["seen"] for c in world.CONTEXTS["seen"]]
    return [(prompts[i % len(prompts)], i // len(prompts)) for i in range(n)]


@torch.no_grad()
def generate(pipe: StableDiffusionPipeline, items: list[tuple[str, int]], seed: int, steps: int,
             guidance: float, batch: int = 128, progress: bool = True) -> torch.Tensor:
    """Images ``(n, 3, H, W)`` in [0, 1] from the stock pipeline call, with noise keyed by
    (seed, prompt, index) as everywhere in the library."""
    c = pipe.unet.config
    shape = (c.in_channels, c.sample_size, c.sample_size)
    out = []
    for start in tqdm(range(0, len(items), batch), desc="fidelity: generate", disable=not progress):
        chunk = items[start:start + batch]
        noise = torch.cat([image_noise(seed, p, [i], shape) for p, i in chunk]).to(pipe.device, pipe.unet.dtype)
        images = pipe(prompt=[p for p, _ in chunk], latents=noise, num_inference_steps=steps,
                      guidance_scale=guidance, output_type="pt").images
        out.append(images.float().cpu())
    return torch.cat(out)


def render_reference(items: list[tuple[str, int]], seed: int) -> torch.Tensor:
    """Ground-truth renders of the same prompts, scenes drawn from each concept's law."""
    rng = numpy_rng(seed, "toyworld-fidelity", "reference")
    images = []
    for prompt, _ in items:
        concept, _, context = world.parse_prompt(prompt)
        if concept is None:
            raise ValueError(f"not a world prompt: {prompt!r}")
        images.append(render(world.sample_scene(rng, concept, context), rng)[0])
    return torch.from_numpy(np.stack(images))


@torch.no_grad()
def round_trip(vae: AutoencoderKL, images: torch.Tensor, batch: int = 512) -> torch.Tensor:
    """``images`` in [0, 1] encoded to their posterior means and decoded again: the best any
    denoiser on this latent space could draw them."""
    dev, dtype = vae.device, vae.dtype
    out = []
    for start in range(0, len(images), batch):
        x = images[start:start + batch].to(dev, dtype) * 2 - 1
        out.append((vae.decode(vae.encode(x).latent_dist.mean).sample.float().cpu() / 2 + 0.5).clamp(0, 1))
    return torch.cat(out)


@torch.no_grad()
def perceive(bundle: PerceptionBundle, images: torch.Tensor, batch: int = 512,
             classifiers: Sequence[Literal["eval", "train"]] = ("eval",)) -> dict[str, dict[str, np.ndarray]]:
    """Per classifier named in ``classifiers``, per image, its class index for every head
    (``-1`` where the detector finds no object), plus ``found``: the path the audit reads
    images through. The detector runs once: every classifier reads the same regions."""
    nets = {name: bundle.eval_classifier if name == "eval" else bundle.train_classifier for name in classifiers}
    device = next(bundle.eval_classifier.parameters()).device
    heads: dict[str, dict[str, list[np.ndarray]]] = {name: {} for name in nets}
    found_all = []
    for start in range(0, len(images), batch):
        x = images[start:start + batch].to(device)
        regions = detect_largest(bundle.detector, x)
        found = regions.found.cpu().numpy()
        for name, clf in nets.items():
            for head, logits in clf(square_crop(x, regions, clf.input_size)).items():
                heads[name].setdefault(head, []).append(np.where(found, logits.argmax(1).cpu().numpy(), -1))
        found_all.append(found)
    found_cat = np.concatenate(found_all)
    return {name: {**{k: np.concatenate(v) for k, v in h.items()}, "found": found_cat} for name, h in heads.items()}


# ---------------------------------------------------------------------------------------------
# Scores
# ---------------------------------------------------------------------------------------------


def _classes(bundle: PerceptionBundle) -> dict[str, list[str]]:
    clf = bundle.eval_classifier
    return {**clf.attributes, **getattr(clf, "semantic_attributes", {})}


def score_concept(concept: world.Concept, seen: dict[str, np.ndarray], classes: dict[str, list[str]],
                  seen_train: dict[str, np.ndarray] | None = None) -> dict[str, Any]:
    """One image set of one concept against the concept's law: no-object rate, semantic
    accuracy (share of detected objects of the concept's shape), per protected attribute the
    observed law, its total variation to the true law and its bias, and, given the training
    classifier's reading ``seen_train``, the share of objects on which the two classifiers agree."""
    found = seen["found"]
    out: dict[str, Any] = {"images": int(len(found)), "no_object_rate": float(1 - found.mean())}
    if not concept.has_objects:
        return out
    if seen_train is not None:
        out["agreement"] = {a: agreement(seen[a], seen_train[a], found) for a in world.ATTRIBUTES}
    out["semantic_accuracy"] = float(np.mean(seen["shape"][found] == classes["shape"].index(concept.shape))) \
        if found.any() else float("nan")
    law = world.attribute_distribution(concept)
    for attr in world.ATTRIBUTES:
        if not found.any():
            out[attr] = {"freq": [], "tv": float("nan"), "bias": float("nan")}
            continue
        freq = frequencies(seen[attr], len(classes[attr]))
        target = [law[attr][c] for c in classes[attr]]
        out[attr] = {"freq": [round(float(f), 4) for f in freq], "tv": total_variation(freq, target),
                     "bias": bias(freq)}
    return out


def law_summary(concept: world.Concept) -> dict[str, Any]:
    """The concept's true law and its bias, and how far from it a bias-free model would be."""
    law = world.attribute_distribution(concept)
    out: dict[str, Any] = {"no_object_rate": law["no_object"]}
    if not concept.has_objects:
        return out
    for attr, names in world.ATTRIBUTES.items():
        p = [law[attr][c] for c in names]
        out[attr] = {"freq": [round(v, 4) for v in p], "bias": bias(p),
                     "tv_of_uniform": total_variation(np.full(len(p), 1 / len(p)), p)}
    return out


def _mean(values: list[float]) -> float:
    v = [x for x in values if x == x]
    return float(np.mean(v)) if v else float("nan")


def summarize(concepts: list[world.Concept], per_concept: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Means over the concepts of one split, for each image set (:data:`SOURCES`) and the law."""
    objs = [c for c in concepts if c.has_objects]
    out: dict[str, Any] = {"concepts": len(objs)}
    for source in SOURCES:
        rows = [per_concept[c.name][source] for c in objs]
        s: dict[str, Any] = {
            "semantic_accuracy": _mean([r["semantic_accuracy"] for r in rows]),
            "no_object_rate": _mean([r["no_object_rate"] for r in rows]),
            "tv": {a: _mean([r[a]["tv"] for r in rows]) for a in world.ATTRIBUTES},
            "bias": {a: _mean([r[a]["bias"] for r in rows]) for a in world.ATTRIBUTES},
        }
        if all("agreement" in r for r in rows):
            s["classifier_agreement"] = {a: _mean([r["agreement"][a] for r in rows]) for a in world.ATTRIBUTES}
        s["tv"]["mean"] = _mean(list(s["tv"].values()))
        out[source] = s
    laws = [per_concept[c.name]["law"] for c in objs]
    out["law"] = {
        "no_object_rate": _mean([r["no_object_rate"] for r in laws]),
        "bias": {a: _mean([r[a]["bias"] for r in laws]) for a in world.ATTRIBUTES},
        "tv_of_uniform": {a: _mean([r[a]["tv_of_uniform"] for r in laws]) for a in world.ATTRIBUTES},
    }
    return out


def measure_fidelity(pipe: StableDiffusionPipeline, bundle: PerceptionBundle, seed: int, steps: int,
                     guidance: float, images_per_concept: int, concepts: list[world.Concept] | None = None,
                     progress: bool = True) -> dict[str, Any]:
    """Generate ``images_per_concept`` images for every concept, render as many, pass the
    renders through the VAE (:func:`round_trip`), and score the three sets against each
    concept's law (see :func:`score_concept`); summaries per split.

    Every set is also read by the training classifier: where it and the evaluation classifier
    disagree on an attribute of generated images while agreeing on rendered ones, the generator
    draws that attribute ambiguously, and a target met for the loss is not met for the audit.
    """
    concepts = concepts if concepts is not None else world.concepts()
    items = {c.name: concept_prompts(c, images_per_concept) for c in concepts}
    flat = [it for c in concepts for it in items[c.name]]
    classes = _classes(bundle)
    rendered = render_reference(flat, seed)
    images = {"generated": generate(pipe, flat, seed, steps, guidance, progress=progress),
              "reconstructed": round_trip(pipe.vae, rendered), "rendered": rendered}
    seen = {source: perceive(bundle, x, classifiers=("eval", "train")) for source, x in images.items()}
    per_concept: dict[str, dict[str, Any]] = {}
    start = 0
    for c in concepts:
        part = slice(start, start + len(items[c.name]))
        start = part.stop
        per_concept[c.name] = {"split": c.split, "family": c.family, "shape": c.shape, "law": law_summary(c)}
        for source, obs in seen.items():
            per_concept[c.name][source] = score_concept(c, {k: v[part] for k, v in obs["eval"].items()}, classes,
                                                        {k: v[part] for k, v in obs["train"].items()})
    summary = {s: summarize([c for c in concepts if c.split == s], per_concept) for s in SPLITS
               if any(c.split == s and c.has_objects for c in concepts)}
    scenery = [c.name for c in concepts if not c.has_objects]
    if scenery:
        summary["scenery"] = {src: {"no_object_rate": _mean([per_concept[n][src]["no_object_rate"] for n in scenery])}
                              for src in SOURCES}
    return {
        "sampling": {"num_inference_steps": steps, "guidance_scale": guidance,
                     "images_per_concept": images_per_concept, "seed": seed},
        "summary": summary,
        "concepts": per_concept,
    }


# ---------------------------------------------------------------------------------------------
# The build
# ---------------------------------------------------------------------------------------------


def _perception_metrics(perception_dir: Path) -> dict[str, Any]:
    manifest = perception_dir / "bundle.json"
    if not manifest.exists():
        raise FileNotFoundError(f"--skip-perception needs an existing bundle, none at {perception_dir}")
    return json.loads(manifest.read_text()).get("metrics", {})


def build_toyworld(out_dir: Path, seed: int = 0, quick: bool = False, device: str | None = None,
                   progress: bool = True, skip_perception: bool = False,
                   recipe_overrides: dict[str, Any] | None = None,
                   init_from: Path | None = None) -> dict[str, Any]:
    """Build ``out_dir/perception`` (unless ``skip_perception``: reuse it), train
    ``out_dir/sd`` and write ``out_dir/fidelity.json``; returns that report.

    ``quick`` trains every network for a handful of steps and measures a few concepts (a smoke
    test in well under a minute). ``recipe_overrides`` changes fields of the SD model's
    :class:`DiffusionRecipe` (the shipped model is the default recipe; the shape ablation's
    rows name recipes worth a larger budget). ``init_from`` starts the SD model from a saved
    one (:func:`~fairness.toyworld.diffusion.train_diffusion`). The device defaults to CUDA when present.
    """
    recipe = (DiffusionRecipe.quick() if quick else DiffusionRecipe()).with_overrides(recipe_overrides or {})
    dev = device or ("cuda" if torch.cuda.is_available() else "cpu")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    if skip_perception:
        perception = _perception_metrics(out / "perception")
    else:
        perception = build_perception(out / "perception", seed=seed, quick=quick, device=dev)
    timings["perception"] = time.perf_counter() - t0

    t1 = time.perf_counter()
    model = train_diffusion(out / "sd", seed=seed, recipe=recipe, device=dev, progress=progress, init_from=init_from)
    timings["diffusion"] = time.perf_counter() - t1

    t2 = time.perf_counter()
    bundle = load_bundle(out / "perception").to(dev)
    concepts = None
    if quick:  # one concept per split plus one scenery concept
        concepts = [next(c for c in world.concepts() if c.split == s and c.has_objects) for s in SPLITS]
        concepts.append(next(c for c in world.concepts() if not c.has_objects))
    report = measure_fidelity(model.pipe, bundle, seed, recipe.num_inference_steps, recipe.guidance_scale,
                              images_per_concept=2 if quick else 48, concepts=concepts, progress=progress)
    timings["fidelity"] = time.perf_counter() - t2
    timings["total"] = time.perf_counter() - t0
    report["eval_classifier_on_rendered"] = perception.get("eval_classifier", {})
    report["perception"] = perception
    report["training"] = model.stats
    report["build"] = {"seed": seed, "quick": quick, "device": str(dev), "torch_threads": torch.get_num_threads(),
                       "seconds": {k: round(v, 1) for k, v in timings.items()}}
    (out / "fidelity.json").write_text(json.dumps(report, indent=1) + "\n")
    return report


def remeasure_fidelity(assets: Path, out: Path, images_per_concept: int = 48, seed: int = 0,
                       device: str | None = None, progress: bool = True) -> dict[str, Any]:
    """Measure an already built world again (its ``sd`` and ``perception``), without training,
    and write the report to ``out``. Keys the measurement does not produce (the build's
    training statistics and timings) are kept from the report already at ``out``."""
    assets = Path(assets)
    dev = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if not (assets / "sd" / DEFAULTS_FILE).exists():
        raise FileNotFoundError(f"no toy-world model at {assets / 'sd'} (build it with `fairness toyworld build`)")
    defaults = json.loads((assets / "sd" / DEFAULTS_FILE).read_text())
    pipe = StableDiffusionPipeline.from_pretrained(str(assets / "sd")).to(dev)
    pipe.set_progress_bar_config(disable=True)
    bundle = load_bundle(assets / "perception").to(dev)
    t0 = time.perf_counter()
    report = measure_fidelity(pipe, bundle, seed, defaults["num_inference_steps"], defaults["guidance_scale"],
                              images_per_concept=images_per_concept, progress=progress)
    out = Path(out)
    kept = json.loads(out.read_text()) if out.exists() else {}
    report = {**kept, **report, "measured": {"device": str(dev), "torch_threads": torch.get_num_threads(),
                                             "seconds": round(time.perf_counter() - t0, 1)}}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n")
    return report


def main(argv: list[str] | None = None) -> None:
    """``python -m fairness.toyworld.build``: the same build as ``fairness toyworld build``."""
    parser = argparse.ArgumentParser(description="Build the toy world's perception bundle and SD model.")
    parser.add_argument("--out", type=Path, default=DEFAULT_ASSETS)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="a handful of steps (tests)")
    parser.add_argument("--skip-perception", action="store_true", help="reuse an existing perception bundle")
    parser.add_argument("--device", default=None)
    parser.add_argument("--init-from", type=Path, default=None, help="start the SD model from this saved one")
    parser.add_argument("--recipe", default="{}", help="DiffusionRecipe overrides as JSON")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    report = build_toyworld(args.out, seed=args.seed, quick=args.quick, device=args.device,
                            skip_perception=args.skip_perception, recipe_overrides=parse_overrides(args.recipe),
                            init_from=args.init_from)
    print(json.dumps({"summary": report["summary"], "build": report["build"]}, indent=1))


if __name__ == "__main__":
    main()
