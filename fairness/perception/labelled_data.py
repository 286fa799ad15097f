"""Labelled face images for training attribute classifiers: reading them, and splitting them.

Layouts (:func:`read_labelled_images`):

- a CSV with a file column and label columns. FairFace: ``file,age,gender,race,...``
  (``fairface_label_train.csv``); CelebA: ``image_id`` plus attribute columns with ``1`` /
  ``-1`` (``list_attr_celeba.csv``; ``gender`` reads its ``Male`` column and ``age`` its
  ``Young`` column unless a column is named). File paths are relative to the CSV's folder
  (or ``images_dir``);
- a folder holding one such CSV;
- a folder of per-class subfolders (``data/male/*.png``, ``data/female/*.png``) for one attribute.

Raw labels go through a label map (:mod:`fairness.perception.label_maps`) or, without one,
become classes as they are (sorted). The datasets are expected to be face crops already.

Splits are deterministic and never use Python's ``hash()``: each image's key (its path
relative to the data root) is hashed with SHA-256. ``half="first"`` / ``"second"`` keeps the
images whose key hashes below / above the middle — a split that does not depend on the seed, so
a training classifier trained on one half and an evaluation classifier on the other never share
an image. The validation split (seeded) is taken inside the chosen half.
"""

from __future__ import annotations

import csv
import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch

from fairness.perception.label_maps import LABEL_MAPS, map_label

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")
FILE_COLUMNS = ("file", "image_id", "path", "filename", "file_name", "image", "img")
# Attribute name -> (CelebA column, label map) used when the CSV has no column of that name.
CELEBA_COLUMNS = {"gender": ("Male", "gender"), "age": ("Young", "celeba_young")}
# Label maps applied without being asked (other attributes keep their raw labels).
DEFAULT_LABEL_MAPS = {"gender": "gender"}
RAW = ("none", "raw")  # --label-map attr=none keeps raw labels
HALVES = ("all", "first", "second")


@dataclass
class LabelledImages:
    """Image files with one class index per attribute.

    ``keys`` identify images for the splits (path relative to the data root, POSIX);
    ``rows`` are CSV rows as a spreadsheet counts them (header = row 1; 0 for folders).
    """

    files: list[Path]
    keys: list[str]
    rows: list[int]
    labels: dict[str, np.ndarray]
    classes: dict[str, list[str]]
    columns: dict[str, str] = field(default_factory=dict)
    label_maps: dict[str, str | None] = field(default_factory=dict)
    source: str = ""

    def __len__(self) -> int:
        return len(self.files)

    def subset(self, index: Sequence[int] | np.ndarray) -> "LabelledImages":
        idx = np.asarray(index, dtype=np.int64)
        return LabelledImages([self.files[i] for i in idx], [self.keys[i] for i in idx], [self.rows[i] for i in idx],
                              {a: v[idx] for a, v in self.labels.items()}, self.classes, self.columns,
                              self.label_maps, self.source)

    def class_counts(self) -> dict[str, dict[str, int]]:
        return {a: {c: int((self.labels[a] == k).sum()) for k, c in enumerate(cls)} for a, cls in self.classes.items()}


def parse_attributes(text: str | Sequence[str]) -> dict[str, str | None]:
    """``"gender,race"`` or ``"gender=Male,age=Young"`` -> ``{attribute: column or None}``."""
    items = [s.strip() for s in (text.split(",") if isinstance(text, str) else text) if s.strip()]
    if not items:
        raise ValueError("no attributes given (e.g. --attributes gender,race,age)")
    out: dict[str, str | None] = {}
    for item in items:
        name, _, column = item.partition("=")
        if name.strip() in out:
            raise ValueError(f"attribute {name.strip()!r} given twice")
        out[name.strip()] = column.strip() or None
    return out


def parse_label_maps(text: str | Mapping[str, str] | None) -> dict[str, str]:
    """``"race=race4,age=age2"`` -> ``{"race": "race4", "age": "age2"}`` (names checked)."""
    if not text:
        return {}
    pairs = dict(text) if isinstance(text, Mapping) else {}
    if isinstance(text, str):
        for item in filter(None, (s.strip() for s in text.split(","))):
            attr, sep, name = item.partition("=")
            if not sep:
                raise ValueError(f"label map {item!r}: expected attribute=map, e.g. race=race4")
            pairs[attr.strip()] = name.strip()
    for attr, name in pairs.items():
        if name not in LABEL_MAPS and name not in RAW:
            raise ValueError(f"unknown label map {name!r} for {attr!r}; built in: {', '.join(sorted(LABEL_MAPS))} "
                             f"(or 'none' for raw labels)")
    return pairs


def _find_column(header: Sequence[str], name: str) -> str | None:
    if name in header:
        return name
    folded = {h.strip().lower(): h for h in header}
    return folded.get(name.strip().lower())


def _classes_and_labels(attr: str, raw: list[str], rows: list[int], column: str, map_name: str | None,
                        where: str) -> tuple[list[str], np.ndarray]:
    if map_name:
        classes = list(LABEL_MAPS[map_name].classes)
        mapped = [map_label(map_name, v, row=r, column=column) for v, r in zip(raw, rows)]
    else:
        mapped = [v.strip() for v in raw]
        for v, r in zip(mapped, rows):
            if not v:
                raise ValueError(f"{where}: empty label in row {r}, column {column!r}")
        classes = sorted(set(mapped))
        if len(classes) < 2:
            raise ValueError(f"{where}: column {column!r} ({attr}) has a single class {classes}; a classifier needs two")
    index = {c: k for k, c in enumerate(classes)}
    return classes, np.array([index[v] for v in mapped], dtype=np.int64)


def _read_csv(path: Path, attributes: Mapping[str, str | None], label_maps: Mapping[str, str],
              file_column: str | None, images_dir: Path | None) -> LabelledImages:
    with path.open(newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        header = [h for h in (reader.fieldnames or []) if h is not None]
        records = list(reader)
    if not header:
        raise ValueError(f"{path}: empty CSV (no header)")
    if file_column:
        fcol = _find_column(header, file_column)
        if fcol is None:
            raise KeyError(f"{path}: no file column {file_column!r}; columns: {', '.join(header)}")
    else:
        fcol = next((c for c in (_find_column(header, n) for n in FILE_COLUMNS) if c), None)
        if fcol is None:
            raise KeyError(f"{path}: no file column (looked for {', '.join(FILE_COLUMNS)}); columns: "
                           f"{', '.join(header)}; name it with --file-column")
    columns, maps = {}, {}
    for attr, col in attributes.items():
        given = label_maps.get(attr)
        found = _find_column(header, col or attr)
        default_map = DEFAULT_LABEL_MAPS.get(attr)
        if found is None and col is None and attr in CELEBA_COLUMNS:
            found = _find_column(header, CELEBA_COLUMNS[attr][0])
            default_map = CELEBA_COLUMNS[attr][1]
        if found is None:
            hint = f" (CelebA: {attr}={CELEBA_COLUMNS[attr][0]})" if attr in CELEBA_COLUMNS else ""
            raise KeyError(f"{path}: no column {col or attr!r} for attribute {attr!r}{hint}; columns: {', '.join(header)}")
        columns[attr] = found
        maps[attr] = None if given in RAW else (given or default_map)
    if not records:
        raise ValueError(f"{path}: no rows below the header (an empty set)")
    rows = list(range(2, len(records) + 2))  # a spreadsheet's numbering: the header is row 1
    root = images_dir or path.parent
    files, keys, missing = [], [], []
    for rec, r in zip(records, rows):
        cell = (rec.get(fcol) or "").strip()
        if not cell:
            raise ValueError(f"{path}: empty file name in row {r}, column {fcol!r}")
        p = Path(cell)
        p = p if p.is_absolute() else root / p
        if not p.is_file():
            missing.append(f"row {r}: {p}")
        files.append(p)
        keys.append(Path(cell).as_posix())
    if missing:
        raise FileNotFoundError(f"{path}: {len(missing)} of {len(records)} image files are missing (paths are "
                                f"relative to {root}; set --images-dir otherwise), e.g. " + "; ".join(missing[:5]))
    labels, classes = {}, {}
    for attr, col in columns.items():
        classes[attr], labels[attr] = _classes_and_labels(attr, [rec.get(col) or "" for rec in records], rows, col,
                                                          maps[attr], str(path))
    return LabelledImages(files, keys, rows, labels, classes, columns, maps, str(path))


def _read_class_folders(root: Path, attributes: Mapping[str, str | None], label_maps: Mapping[str, str]) -> LabelledImages:
    if len(attributes) != 1:
        raise ValueError(f"{root}: per-class subfolders label one attribute; got {list(attributes)}")
    (attr,) = attributes
    folders = sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    files, raw = [], []
    for d in folders:
        found = sorted(p for p in d.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
        files += found
        raw += [d.name] * len(found)
    if not files:
        raise ValueError(f"{root}: no CSV and no images in class subfolders (an empty set)")
    given = label_maps.get(attr)
    map_name = None if given in RAW else (given or DEFAULT_LABEL_MAPS.get(attr))
    keys = [p.relative_to(root).as_posix() for p in files]
    classes, labels = _classes_and_labels(attr, raw, [0] * len(files), "<folder>", map_name, str(root))
    return LabelledImages(files, keys, [0] * len(files), {attr: labels}, {attr: classes}, {attr: "<folder>"},
                          {attr: map_name}, str(root))


def read_labelled_images(data: str | Path, attributes: str | Sequence[str] | Mapping[str, str | None],
                         label_maps: str | Mapping[str, str] | None = None, file_column: str | None = None,
                         images_dir: str | Path | None = None) -> LabelledImages:
    """Read a labelled image set (see the module docstring for the layouts).

    ``attributes``: names, optionally ``name=column``; ``label_maps``: ``{attribute: map}``
    (``gender`` defaults to the ``gender`` map). Raises :class:`KeyError` for a missing
    column, :class:`FileNotFoundError` for missing data or images (with their rows) and
    :class:`ValueError` for an unknown label (with row and column) or an empty set.
    """
    attrs = dict(attributes) if isinstance(attributes, Mapping) else parse_attributes(attributes)
    maps = parse_label_maps(label_maps)
    unknown = sorted(set(maps) - set(attrs))
    if unknown:
        raise ValueError(f"label maps given for attributes not trained: {unknown}")
    path = Path(data)
    img_root = Path(images_dir) if images_dir else None
    if path.is_file():
        return _read_csv(path, attrs, maps, file_column, img_root)
    if not path.is_dir():
        raise FileNotFoundError(f"no labelled data at {path} (give a CSV file or a folder)")
    csvs = sorted(path.glob("*.csv"))
    if len(csvs) > 1:
        raise ValueError(f"{path} holds several CSVs ({', '.join(p.name for p in csvs)}); pass one of them as --data")
    if csvs:
        return _read_csv(csvs[0], attrs, maps, file_column, img_root)
    return _read_class_folders(path, attrs, maps)


def _unit_hash(*parts: Any) -> float:
    """A number in [0, 1) from SHA-256 of the parts (stable across runs and machines)."""
    digest = hashlib.sha256("\x1f".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def select_half(keys: Sequence[str], half: str) -> np.ndarray:
    """Indices of the images in ``half`` (``all``, ``first``, ``second``); seed-independent."""
    if half not in HALVES:
        raise ValueError(f"half must be one of {HALVES}, got {half!r}")
    if half == "all":
        return np.arange(len(keys))
    u = np.array([_unit_hash("fairness-half", k) for k in keys])
    return np.flatnonzero(u < 0.5 if half == "first" else u >= 0.5)


def train_val_split(keys: Sequence[str], val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded split: the ``round(n * val_fraction)`` images whose keyed hash is lowest validate."""
    if not 0 <= val_fraction < 1:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    n = len(keys)
    order = np.argsort(np.array([_unit_hash("fairness-val", seed, k) for k in keys]), kind="stable")
    n_val = int(round(n * val_fraction))
    if val_fraction > 0 and n >= 2:
        n_val = min(max(n_val, 1), n - 1)
    return np.sort(order[n_val:]), np.sort(order[:n_val])


def read_image(path: Path, size_for: Callable[[tuple[int, int]], tuple[int, int]] | None = None) -> torch.Tensor:
    """``(3, H, W)`` float in ``[0, 1]`` from an image file, resized (PIL bilinear) to
    ``size_for((width, height))`` when that differs from the file's size."""
    from PIL import Image

    with Image.open(path) as im:
        im = im.convert("RGB")
        target = size_for(im.size) if size_for else im.size
        if target != im.size:
            im = im.resize(target, Image.BILINEAR)
        arr = np.asarray(im, dtype=np.uint8).copy()
    return torch.from_numpy(arr).permute(2, 0, 1).float().div_(255.0)


def load_image(path: Path, size: int) -> torch.Tensor:
    """``(3, size, size)`` float in ``[0, 1]`` (a plain resize: the images are face crops)."""
    return read_image(path, lambda _: (size, size))


class ImageSet(torch.utils.data.Dataset):
    def __init__(self, data: LabelledImages, size: int, flip: bool = False):
        self.data, self.size, self.flip = data, size, flip
        self.attrs = list(data.classes)

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        try:
            x = load_image(self.data.files[i], self.size)
        except Exception as exc:  # a corrupt file: say which
            raise ValueError(f"cannot read image {self.data.files[i]} (row {self.data.rows[i]}): {exc}") from exc
        if self.flip and torch.rand(()) < 0.5:
            x = x.flip(-1)
        return x, torch.tensor([int(self.data.labels[a][i]) for a in self.attrs])
