"""Audit a generator: per-prompt group frequencies, bias, and semantics, as the paper measures.

For every prompt, ``images_per_prompt`` images are generated from noise keyed by (seed, prompt,
index) and classified by the *evaluation* classifier on the largest region. When an
``originals`` generator is given (the frozen model), its images from the same noise give
CLIP-I / DINO similarities; CLIP-T compares each image with its prompt. Where the bundle's
training classifier is another network, the audit also reports how often it names the same
class as the evaluation one on the objects found (``agreement``).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from fairness.checksums import file_sha256
from fairness.metrics.bias import bias, frequencies, gap_left, joint_classes, mean_bias_floor, mean_std, movement_shares
from fairness.perception.base import Regions
from fairness.perception.bundle import PerceptionBundle
from fairness.perception.regions import detect_largest, square_crop
from fairness.seeding import image_noise

GenerateFn = Callable[[list[str], torch.Tensor], torch.Tensor]


@dataclass
class PromptImages:
    """Everything the report shows about one prompt's images."""

    prompt: str
    images: torch.Tensor
    probs: dict[str, np.ndarray]
    boxes: np.ndarray
    found: np.ndarray


@dataclass
class AuditResult:
    rows: list[dict[str, Any]]
    summary: dict[str, Any]
    attributes: dict[str, list[str]]
    images: list[PromptImages] = field(default_factory=list)
    originals: list[PromptImages] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {"summary": self.summary, "attributes": self.attributes, "prompts": self.rows}


def audit_groups(attributes: dict[str, list[str]], joints: Sequence[str] | None = None) -> list[tuple[str, ...]]:
    """Single attributes, then the requested joints (default: every pair and the full joint)."""
    names = list(attributes)
    if joints is None:
        combos = [c for r in range(2, len(names) + 1) for c in itertools.combinations(names, r)]
    else:
        combos = [tuple(j.split("*")) for j in joints]
        for c in combos:
            unknown = [a for a in c if a not in attributes]
            if unknown:
                raise KeyError(f"unknown attribute(s) {unknown} in joint {'*'.join(c)}; known: {names}")
    return [(a,) for a in names] + combos


def agreement(classes: np.ndarray, other: np.ndarray, found: np.ndarray) -> float:
    """Share of the objects found on which two classifiers name the same class (NaN if none)."""
    found = np.asarray(found, dtype=bool)
    return float(np.mean(np.asarray(classes)[found] == np.asarray(other)[found])) if found.any() else float("nan")


@torch.no_grad()
def _perceive(bundle: PerceptionBundle, images: torch.Tensor) -> tuple[dict[str, np.ndarray], Regions, dict[str, torch.Tensor]]:
    """Evaluation-classifier probabilities on the largest region, the regions, and the logits."""
    clf = bundle.eval_classifier
    regions = detect_largest(bundle.detector, images)
    logits = clf(square_crop(images, regions, clf.input_size))
    probs = {a: v.softmax(-1).float().cpu().numpy() for a, v in logits.items()}
    return probs, regions, logits


@torch.no_grad()
def _classifier_agreement(bundle: PerceptionBundle, images: torch.Tensor, regions: Regions,
                          logits: dict[str, torch.Tensor]) -> dict[str, float]:
    """Per attribute, :func:`agreement` of the training classifier with the evaluation one's
    ``logits`` on the same regions; empty when the two are one network or nothing was found.

    Where the training classifier names another class than the evaluation one, a target met
    for the loss is not met for the audit: low before debiasing, the two disagree on what the
    generator draws; falling after it, the adapter draws objects they read differently, and on
    a targeted attribute it may have moved the training classifier rather than the attribute
    (the paper's Fig. 5b).
    """
    train, found = bundle.train_classifier, regions.found.cpu().numpy()
    if train is bundle.eval_classifier or not found.any():
        return {}
    train_logits = train(square_crop(images, regions, train.input_size))
    return {a: agreement(logits[a].argmax(-1).cpu().numpy(), train_logits[a].argmax(-1).cpu().numpy(), found)
            for a in bundle.eval_classifier.attributes if a in train_logits}


def _file_digest(path: str) -> str | None:
    try:
        return file_sha256(path)
    except OSError:
        return None


def same_classifier(bundle: PerceptionBundle) -> bool:
    """Whether the bundle's evaluation classifier is the same network as its training one.

    The same object, or built from the same spec (``bundle.component_specs``): same backend,
    same config and the same weights (one file, files with identical bytes, or no weights for
    either, where the config alone fixes the network).
    """
    if bundle.eval_classifier is bundle.train_classifier:
        return True
    specs = bundle.component_specs or {}
    train, ev = specs.get("train_classifier"), specs.get("eval_classifier")
    if not isinstance(train, Mapping) or not isinstance(ev, Mapping):
        return False
    if train.get("backend") != ev.get("backend") or train.get("config", {}) != ev.get("config", {}):
        return False
    wt, we = train.get("weights"), ev.get("weights")
    if wt == we:
        return True
    if not wt or not we:
        return False
    dt = _file_digest(wt)
    return dt is not None and dt == _file_digest(we)


def check_independent_classifiers(bundle: PerceptionBundle, allow_train_classifier: bool = False) -> bool:
    """Refuse to audit with the training classifier unless asked to; returns independence.

    The paper's evaluation classifiers are trained independently of the ones the loss trains
    against: measured with the loss's own classifier, an audit shows whether the adapter
    fooled that classifier, not whether the attribute changed.
    """
    if not same_classifier(bundle):
        return True
    if not allow_train_classifier:
        raise ValueError(
            "the perception bundle's eval_classifier is the same network as its train_classifier (same "
            "backend, config and weights), so an audit would measure with the classifier the loss trains "
            "against. Give bundle.json an independently trained eval_classifier (e.g. `fairness classifier "
            "train --half second --bundle DIR --role eval_classifier`), or ask for it explicitly: "
            "`fairness audit --classifier train`, or audit(..., allow_train_classifier=True)."
        )
    return False


def _cos(a: torch.Tensor, b: torch.Tensor) -> np.ndarray:
    return torch.nn.functional.cosine_similarity(a.float(), b.float(), dim=-1).cpu().numpy()


def audit(
    generate: GenerateFn,
    bundle: PerceptionBundle,
    prompts: Sequence[str],
    images_per_prompt: int,
    seed: int,
    latent_shape: tuple[int, ...],
    originals: GenerateFn | None = None,
    joints: Sequence[str] | None = None,
    batch_size: int = 32,
    keep_images: bool = False,
    progress: bool = True,
    allow_train_classifier: bool = False,
) -> AuditResult:
    """Generate, classify and score; returns per-prompt rows and a summary (mean +- std).

    Refuses (:class:`ValueError`) a bundle whose evaluation classifier is its training
    classifier unless ``allow_train_classifier`` (:func:`check_independent_classifiers`).
    """
    if not prompts:
        raise ValueError("audit needs at least one prompt")
    independent = check_independent_classifiers(bundle, allow_train_classifier)
    attrs = dict(bundle.eval_classifier.attributes)
    groups = audit_groups(attrs, joints)
    sizes = {a: len(c) for a, c in attrs.items()}
    labeler = bundle.semantic_labeler
    rows: list[dict[str, Any]] = []
    kept, kept_orig = [], []
    device = next(bundle.eval_classifier.parameters()).device
    for prompt in tqdm(prompts, desc="audit", disable=not progress, unit="prompt"):
        imgs, origs = [], []
        for start in range(0, images_per_prompt, batch_size):
            idx = range(start, min(start + batch_size, images_per_prompt))
            noise = image_noise(seed, prompt, idx, latent_shape)
            imgs.append(generate([prompt] * len(idx), noise).to(device))
            if originals is not None:
                origs.append(originals([prompt] * len(idx), noise).to(device))
        images = torch.cat(imgs)
        probs, regions, logits = _perceive(bundle, images)
        boxes, found = regions.boxes.cpu().numpy(), regions.found.cpu().numpy()
        agreed = _classifier_agreement(bundle, images, regions, logits)
        classes = {a: np.where(found, probs[a].argmax(1), -1) for a in attrs}
        row: dict[str, Any] = {"prompt": prompt, "images": len(images), "faces": int(found.sum()),
                               "freq": {}, "bias": {}, "semantics": {}, "agreement": agreed}
        for g in groups:
            name = "*".join(g)
            k = int(np.prod([sizes[a] for a in g]))
            f = frequencies(joint_classes(classes, sizes, g), k)
            row["freq"][name] = f.tolist()
            row["bias"][name] = bias(f) if found.any() else float("nan")
        sem = row["semantics"]
        if bundle.text_image_encoder is not None:
            enc = bundle.text_image_encoder
            sem["clip_t"] = float(_cos(enc(images), enc.encode_text([prompt]).expand(len(images), -1)).mean())
        if labeler is not None:
            expected = labeler(prompt)
            for attr, cls in (expected or {}).items():
                if attr in logits:
                    names = bundle.eval_classifier.semantic_attributes[attr]
                    pred = logits[attr].argmax(1).cpu().numpy()
                    ok = (pred == names.index(cls)) if cls is not None else ~found
                    sem[f"accuracy_{attr}"] = float(np.mean(ok))
        if origs:
            original_images = torch.cat(origs)
            for metric, enc_name in bundle.eval_encoders.items():
                enc = bundle.encoders[enc_name]
                sem[metric] = float(_cos(enc(images), enc(original_images)).mean())
            if keep_images:
                o_probs, o_regions, _ = _perceive(bundle, original_images)
                kept_orig.append(PromptImages(prompt, original_images.cpu(), o_probs, o_regions.boxes.cpu().numpy(),
                                              o_regions.found.cpu().numpy()))
        if keep_images:
            kept.append(PromptImages(prompt, images.cpu(), probs, boxes, found))
        rows.append(row)
    summary = {
        "bias": {"*".join(g): mean_std([r["bias"]["*".join(g)] for r in rows]) for g in groups},
        # What a perfectly fair generator would score on the same number of faces per prompt.
        "bias_floor": {"*".join(g): mean_bias_floor([r["faces"] for r in rows], int(np.prod([sizes[a] for a in g])))
                       for g in groups},
        "semantics": {m: mean_std([r["semantics"][m] for r in rows if m in r["semantics"]])
                      for m in sorted({m for r in rows for m in r["semantics"]})},
        "faces": mean_std([r["faces"] / r["images"] for r in rows]),
        # Share of detected objects on which the training classifier agrees with the evaluation one.
        "agreement": {a: mean_std([r["agreement"][a] for r in rows if a in r["agreement"]])
                      for a in attrs if any(a in r["agreement"] for r in rows)},
        "prompts": len(rows),
        # False when measured, on request, with the training classifier itself.
        "independent_classifier": independent,
        "images_per_prompt": images_per_prompt,
        "seed": seed,
    }
    return AuditResult(rows=rows, summary=summary, attributes=attrs, images=kept, originals=kept_orig)


def rows_to_csv_records(result: AuditResult) -> list[dict[str, Any]]:
    """Flat per-prompt records (one column per bias / frequency / semantics value)."""
    out = []
    for r in result.rows:
        rec: dict[str, Any] = {"prompt": r["prompt"], "images": r["images"], "faces": r["faces"]}
        rec.update({f"bias.{k}": v for k, v in r["bias"].items()})
        for name, f in r["freq"].items():
            if "*" not in name:
                rec.update({f"freq.{name}.{c}": x for c, x in zip(result.attributes[name], f)})
        rec.update({f"semantics.{k}": v for k, v in r["semantics"].items()})
        rec.update({f"agreement.{k}": v for k, v in r.get("agreement", {}).items()})
        out.append(rec)
    return out


def movements(before: Sequence[Mapping[str, Any]], after: Sequence[Mapping[str, Any]],
              targets: Mapping[str, Sequence[float]]) -> dict[str, dict[str, float]]:
    """Where debiasing moved each prompt, per targeted law: the share of prompts ``kept`` near
    the original, brought ``near`` the target, or ``reversed`` past it (``fairness.metrics.bias.
    movement_shares``). ``before`` / ``after`` are the two audits' rows, prompt by prompt; only
    prompts with an object in both count, and laws the rows do not carry are left out."""
    out = {}
    for name, target in targets.items():
        if not before or name not in before[0]["freq"]:
            continue
        gaps = [gap_left(b["freq"][name], a["freq"][name], target)
                for b, a in zip(before, after) if b["faces"] and a["faces"]]
        out[name] = movement_shares(gaps)
    return out
