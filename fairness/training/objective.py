"""The debiasing objective for one batch: perception, OT targets, and the three losses.

``Objective`` is the single place where generated images become a scalar to backpropagate.
It works on the images of *this* process; a :class:`Collective` lets the OT targets be computed
over the whole batch when the images are split across workers (every worker then gets the same
targets for the same images), without the library knowing about Ray or torch.distributed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import torch

from fairness.config import LossConfig
from fairness.losses.alignment import alignment_loss, confident_mask
from fairness.losses.face import face_realism_loss
from fairness.losses.semantics import gradient_weight_map, image_semantics_loss, lost_region_weight
from fairness.losses.structure import OutlineEncoder, structure_loss
from fairness.dft.engine import scale_grad
from fairness.perception.bundle import PerceptionBundle
from fairness.perception.regions import detect_largest, square_crop
from fairness.targets.assignment import AttributeTargets, assign_targets
from fairness.targets.distributions import TargetGroup


class Collective(Protocol):
    """How the images of one batch are spread over processes."""

    def all_gather(self, local: np.ndarray) -> np.ndarray:
        """Concatenate every process's rows, in rank order."""
        ...

    def local_slice(self, total: int) -> slice:
        """Which rows of the gathered batch belong to this process."""
        ...


class SingleProcess:
    def all_gather(self, local: np.ndarray) -> np.ndarray:
        return local

    def local_slice(self, total: int) -> slice:
        return slice(0, total)


@dataclass
class OriginalsInfo:
    """What the loss needs from the frozen model's images: their classes and encoder features.

    An originals bank stores exactly this, so training can skip regenerating the originals.
    Where ``found`` is False the class is the classifier's reading of the whole image; the
    dynamic weights never count it as agreeing with a target (the original has no face class).
    """

    classes: dict[str, torch.Tensor]
    features: dict[str, torch.Tensor]
    found: torch.Tensor

    def rows(self, index: slice) -> "OriginalsInfo":
        """The info of some of the images (one prompt's share of a batch of several)."""
        return OriginalsInfo({k: v[index] for k, v in self.classes.items()},
                             {k: v[index] for k, v in self.features.items()}, self.found[index])

    def to(self, device: torch.device | str) -> "OriginalsInfo":
        return OriginalsInfo({k: v.to(device) for k, v in self.classes.items()},
                             {k: v.to(device) for k, v in self.features.items()}, self.found.to(device))


@dataclass
class Reference:
    """One prompt's extra images, drawn without gradient from the model being trained.

    The OT targets of a prompt's images are solved over a sample of its current law. With the
    few images a step can backpropagate (4 in the toy demo, over 8 joint classes) that sample is
    mostly noise: a balanced prompt's images are still pushed, and a biased one's push depends on
    which few images were drawn. A larger no-grad draw joins the OT, so the backpropagated images'
    targets are their share of a transport plan over many images. It is cheap (one sampler pass,
    no VJPs), and a deterministic function of (seed, step), so every worker draws the same.
    """

    probs: np.ndarray  # (M, sum of class counts): classifier probabilities, attributes concatenated
    found: np.ndarray  # (M,) bool: a face/object was found


@dataclass
class LossOutput:
    total: torch.Tensor
    logs: dict[str, float] = field(default_factory=dict)
    targets: dict[str, AttributeTargets] = field(default_factory=dict)


class Objective:
    """L = L_align + L_img (dynamically weighted) + lambda_face * L_face [+ lambda_struct * L_struct]."""

    def __init__(self, bundle: PerceptionBundle, groups: list[TargetGroup], loss: LossConfig):
        self.bundle, self.groups, self.cfg = bundle, groups, loss
        self.attributes = [a for g in groups for a in g.attributes]
        names = loss.semantic_encoders if loss.semantic_encoders is not None else bundle.semantic_encoders
        unknown = [n for n in names if n not in bundle.encoders]
        if unknown:
            raise KeyError(f"unknown semantic encoder(s) {unknown}; the bundle has {sorted(bundle.encoders)}")
        self.encoders = [bundle.encoders[n] for n in names]
        for enc, n in zip(self.encoders, names):
            enc.name = n
        self.structure = OutlineEncoder() if loss.structure_weight > 0 else None

    def classify(self, images: torch.Tensor, classifier=None):
        """Largest region, its crop, and the classifier's logits on it."""
        clf = classifier or self.bundle.train_classifier
        regions = detect_largest(self.bundle.detector, images)
        crops = square_crop(images, regions, clf.input_size)
        return regions, crops, clf(crops)

    def probabilities(self, logits: dict[str, torch.Tensor]) -> np.ndarray:
        """Per-image class probabilities of every attribute, concatenated in ``self.attributes`` order."""
        return np.concatenate([logits[a].detach().softmax(-1).double().cpu().numpy() for a in self.attributes], axis=1)

    @torch.no_grad()
    def reference(self, images: torch.Tensor) -> Reference:
        regions, _, logits = self.classify(images)
        return Reference(self.probabilities(logits), regions.found.cpu().numpy().astype(bool))

    @torch.no_grad()
    def describe_originals(self, images: torch.Tensor) -> OriginalsInfo:
        regions, _, logits = self.classify(images)
        return OriginalsInfo(
            classes={a: logits[a].argmax(-1) for a in self.attributes},
            features={enc.name: enc(images) for enc in self.encoders + ([self.structure] if self.structure else [])},
            found=regions.found,
        )

    def __call__(self, images: torch.Tensor, originals: OriginalsInfo, seed: int,
                 collective: Collective | None = None, reference: Reference | None = None) -> LossOutput:
        """The loss of one prompt's images; ``reference``: more of its images, which only join the OT."""
        collective = collective or SingleProcess()
        regions, crops, logits = self.classify(images)
        found = regions.found
        all_probs = collective.all_gather(self.probabilities(logits))
        all_found = collective.all_gather(found.cpu().numpy()[:, None].astype(np.float64))[:, 0] > 0.5
        num_faces_global = int(all_found.sum())
        n_global = len(all_found)
        split = collective.local_slice(n_global)
        if reference is not None:
            all_probs = np.concatenate([all_probs, reference.probs])
            all_found = np.concatenate([all_found, reference.found])
        probs, offset = {}, 0
        for a in self.attributes:
            k = logits[a].shape[-1]
            probs[a] = all_probs[:, offset:offset + k]
            offset += k
        global_targets = assign_targets(self.groups, probs, all_found, seed=seed, method=self.cfg.ot_method,
                                        samples=self.cfg.ot_samples, mass=self.cfg.ot_mass,
                                        joint_cost=self.cfg.ot_joint_cost)
        targets = {a: AttributeTargets(t.targets[split], t.confidence[split], t.q[split]) for a, t in global_targets.items()}
        # Per-worker normaliser chosen so that averaging the workers' gradients gives exactly the
        # single-process gradient of the whole batch (equal shares of N per worker).
        num_faces = max(num_faces_global, 1) * images.shape[0] / max(n_global, 1)
        thresholds = {a: self.cfg.threshold(a) for a in self.attributes}
        l_align = alignment_loss(logits, targets, thresholds, num_faces if num_faces_global else 0)
        weight_map = gradient_weight_map(targets, originals.classes, {a: self.cfg.img_weights(a) for a in self.attributes},
                                         regions, images.shape[-2], images.shape[-1],
                                         thresholds=thresholds, original_found=originals.found)
        lost = originals.found.to(found.device) & ~found
        weight_map = lost_region_weight(weight_map, lost, self.cfg.lost_face_weight)
        l_img, per_enc = image_semantics_loss(scale_grad(images, weight_map), originals.features, self.encoders)
        total = l_align + l_img
        logs = {"loss/align": l_align.item(), "loss/img": l_img.item(), **{f"loss/img_{k}": v.item() for k, v in per_enc.items()}}
        if self.bundle.face_embedder is not None and self.bundle.face_bank is not None and self.cfg.face_weight > 0:
            emb_crops = crops if self.bundle.face_embedder.input_size == crops.shape[-1] else \
                square_crop(images, regions, self.bundle.face_embedder.input_size)
            l_face = face_realism_loss(emb_crops, found, self.bundle.face_embedder, self.bundle.face_bank)
            total = total + self.cfg.face_weight * l_face * (found.sum() / max(num_faces, 1e-9) if num_faces_global else 0.0)
            logs["loss/face"] = l_face.item()
        if self.structure is not None:
            if self.structure.name not in originals.features:
                raise KeyError(f"loss.structure_weight is set but the originals carry no {self.structure.name!r} "
                               "features: rebuild the originals bank with this loss config")
            l_struct = structure_loss(images, originals.features[self.structure.name], self.structure)
            total = total + self.cfg.structure_weight * l_struct
            logs["loss/structure"] = l_struct.item()
        logs["loss/total"] = total.item()
        logs["faces"] = float(found.float().mean())
        logs["faces_lost"] = float(lost.float().mean())
        for a, t in targets.items():
            # confident: the images the alignment loss counts; pushed: those of them whose target is
            # not the class the classifier sees now, i.e. the images the loss is actually moving.
            counted = confident_mask(t, self.cfg.threshold(a), torch.device("cpu")).numpy()
            seen = logits[a].detach().argmax(-1).cpu().numpy()
            logs[f"confident/{a}"] = float(counted.mean())
            logs[f"pushed/{a}"] = float((counted & (t.targets != seen)).mean())
        return LossOutput(total=total, logs=logs, targets=targets)
