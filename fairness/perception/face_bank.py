"""A bank of real-face embeddings for the face-realism loss (``face_bank`` in ``bundle.json``).

Each image of a folder goes through the bundle's detector; the largest face is cropped
(the same square crop the training loss uses) and embedded with the bundle's face embedder.
The bank is ``{"bank": (M, D)}`` in a safetensors file, M = the images in which a face was
found, rows L2-normalised.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from tqdm.auto import tqdm

from fairness.perception.bundle import PerceptionBundle
from fairness.perception.labelled_data import IMAGE_EXTENSIONS, read_image
from fairness.perception.regions import detect_largest, square_crop


@dataclass
class FaceBankReport:
    path: Path
    images: int
    faces: int
    dim: int
    without_face: list[str] = field(default_factory=list)

    def to_json(self) -> dict:
        return {"bank": str(self.path), "images": self.images, "faces": self.faces, "dim": self.dim,
                "without_face": self.without_face[:20], "without_face_count": len(self.without_face)}


def list_images(folder: str | Path) -> list[Path]:
    """Image files under ``folder`` (recursively), sorted."""
    root = Path(folder)
    if not root.is_dir():
        raise FileNotFoundError(f"no image folder at {root}")
    return sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


def _load(path: Path, max_side: int) -> torch.Tensor:
    """The image, shrunk so that its longer side is at most ``max_side``."""
    def shrunk(size: tuple[int, int]) -> tuple[int, int]:
        w, h = size
        if max(w, h) <= max_side:
            return size
        scale = max_side / max(w, h)
        return max(1, round(w * scale)), max(1, round(h * scale))

    return read_image(path, shrunk)


def _batches(paths: list[Path], batch_size: int, max_side: int) -> Iterator[tuple[list[Path], torch.Tensor]]:
    """Consecutive images of one size, at most ``batch_size`` together (detectors take a stack)."""
    group: list[tuple[Path, torch.Tensor]] = []
    for p in paths:
        x = _load(p, max_side)
        if group and (len(group) >= batch_size or group[0][1].shape != x.shape):
            yield [g[0] for g in group], torch.stack([g[1] for g in group])
            group = []
        group.append((p, x))
    if group:
        yield [g[0] for g in group], torch.stack([g[1] for g in group])


@torch.no_grad()
def embed_faces(bundle: PerceptionBundle, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Embeddings of the largest face of each image, and the ``found`` mask (rows where found)."""
    if bundle.face_embedder is None:
        raise ValueError("the perception bundle has no face_embedder (components.face_embedder in bundle.json)")
    regions = detect_largest(bundle.detector, images)
    found = regions.found
    if not found.any():
        return images.new_zeros(0, 0), found
    crops = square_crop(images[found], _subset(regions, found), bundle.face_embedder.input_size)
    return F.normalize(bundle.face_embedder(crops).float(), dim=-1), found


def _subset(regions, mask):
    from fairness.perception.base import Regions

    return Regions(regions.boxes[mask], regions.scores[mask], regions.found[mask])


def build_face_bank(images_dir: str | Path, bundle: PerceptionBundle, out: str | Path, batch_size: int = 16,
                    max_side: int = 1024, progress: bool = True) -> FaceBankReport:
    """Embed the largest face of every image under ``images_dir`` and write the bank to ``out``.

    Images larger than ``max_side`` are shrunk first. Raises :class:`ValueError` for a folder
    without images or without a single face.
    """
    paths = list_images(images_dir)
    if not paths:
        raise ValueError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) under {images_dir}")
    device = next((p.device for m in bundle.modules() for p in m.parameters()), torch.device("cpu"))
    rows, without = [], []
    bar = tqdm(total=len(paths), desc="face bank", unit="img", disable=not progress)
    for names, x in _batches(paths, batch_size, max_side):
        emb, found = embed_faces(bundle, x.to(device))
        if len(emb):
            rows.append(emb.cpu())
        without += [str(n) for n, f in zip(names, found.cpu().tolist()) if not f]
        bar.update(len(names))
    bar.close()
    if not rows:
        raise ValueError(f"no face found in any of the {len(paths)} images under {images_dir}")
    bank = torch.cat(rows).contiguous()
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({"bank": bank}, str(path))
    return FaceBankReport(path, len(paths), int(bank.shape[0]), int(bank.shape[1]), without)
