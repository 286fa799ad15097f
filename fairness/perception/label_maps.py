"""Built-in label maps: the paper's consolidations of FairFace and CelebA labels.

A label map turns a dataset's raw label (a CSV cell) into one of a fixed, ordered list of
classes. The maps are data (:data:`LABEL_MAPS`); :func:`map_label` applies one.

- ``race4``: FairFace's 7 race groups into the official code's 4 classes, in its order
  ``WMELH`` (White + Middle Eastern + Latino_Hispanic), ``Black``, ``Indian``, ``Asian``
  (East Asian + Southeast Asian).
- ``age2``: ``young`` below 40, ``old`` from 40. FairFace age bins (``"0-2"`` ... ``"30-39"``,
  ``"40-49"`` ... ``"more than 70"``) map by their lower bound; plain numeric ages too.
- ``gender``: FairFace ``Male`` / ``Female`` and CelebA's ``Male`` column (``1`` male,
  ``-1`` female) into ``male``, ``female``.
- ``celeba_young``: CelebA's ``Young`` column (``1`` young, ``-1`` old) into age2's classes.

Spelling variants are tolerated: case, spaces, underscores and hyphens are ignored when
matching names (``"Latino_Hispanic"`` = ``"latino hispanic"``, ``"Southeast Asian"`` =
``"South-East Asian"``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class LabelMap:
    """``classes`` in class-index order; ``aliases``: normalised raw name -> class.

    ``age_bounds`` (ages, ascending) makes the map numeric: an age (or an age bin, by its
    lower bound) below ``age_bounds[0]`` is ``classes[0]``, from ``age_bounds[i]`` on it is
    ``classes[i + 1]``.
    """

    classes: tuple[str, ...]
    aliases: dict[str, str] = field(default_factory=dict)
    age_bounds: tuple[float, ...] = ()


_NUMBER = re.compile(r"[+\-]?\d+(?:\.\d+)?")


def _key(raw: Any) -> str:
    """Numbers in canonical form (``"+1"``, ``"1.0"`` -> ``"1"``); names lower case with
    everything but letters and digits removed (``"Latino_Hispanic"`` -> ``"latinohispanic"``)."""
    s = str(raw).strip().lower()
    if _NUMBER.fullmatch(s):
        return format(float(s), "g")
    return re.sub(r"[^a-z0-9]", "", s)


def _table(pairs: dict[str, tuple[str, ...]]) -> dict[str, str]:
    """``{class: (raw spellings...)}`` -> ``{key: class}`` (each class's own name included)."""
    return {_key(s): cls for cls, spellings in pairs.items() for s in (cls, *spellings)}


LABEL_MAPS: dict[str, LabelMap] = {
    "race4": LabelMap(
        classes=("WMELH", "Black", "Indian", "Asian"),
        aliases=_table({
            "WMELH": ("White", "Middle Eastern", "Middle_Eastern", "Latino_Hispanic", "Latino Hispanic",
                      "Latino", "Hispanic", "Latino/Hispanic", "Caucasian"),
            "Black": ("African American", "African"),
            "Indian": ("South Asian",),
            "Asian": ("East Asian", "East_Asian", "Southeast Asian", "Southeast_Asian", "South East Asian"),
        }),
    ),
    "age2": LabelMap(classes=("young", "old"), aliases=_table({"young": (), "old": ()}), age_bounds=(40,)),
    "gender": LabelMap(
        classes=("male", "female"),
        aliases=_table({"male": ("m", "man", "1", "+1", "1.0"), "female": ("f", "woman", "-1", "-1.0")}),
    ),
    "celeba_young": LabelMap(
        classes=("young", "old"),
        aliases=_table({"young": ("1", "+1", "1.0"), "old": ("-1", "-1.0", "0")}),
    ),
}

# On the label lower-cased without spaces or underscores: "0-2", "20-29", "30to39" (a bin, by
# its lower bound), "morethan70", "70+", "over70", "35", "35.5".
_AGE_PATTERNS = (
    re.compile(r"(\d+(?:\.\d+)?)(?:-|to)\d+(?:\.\d+)?"),
    re.compile(r"(?:morethan|over|above|>=?)(\d+(?:\.\d+)?)"),
    re.compile(r"(\d+(?:\.\d+)?)(?:\+|plus|andover|andolder|ormore)"),
    re.compile(r"(\d+(?:\.\d+)?)"),
)


def _age(raw: Any) -> float | None:
    s = re.sub(r"[\s_]", "", str(raw).strip().lower())
    for pattern in _AGE_PATTERNS:
        m = pattern.fullmatch(s)
        if m:
            return float(m.group(1))
    return None


def map_label(map_name: str, raw: Any, row: int | None = None, column: str | None = None) -> str:
    """The class that label map ``map_name`` gives the raw label ``raw``.

    ``row`` and ``column`` only name the cell in the error raised for a label the map does
    not know (:class:`ValueError`; an unknown map name raises :class:`KeyError`).
    """
    if map_name not in LABEL_MAPS:
        raise KeyError(f"unknown label map {map_name!r}; built in: {', '.join(sorted(LABEL_MAPS))}")
    spec = LABEL_MAPS[map_name]
    key = _key(raw)
    if key in spec.aliases:
        return spec.aliases[key]
    if spec.age_bounds:
        age = _age(raw)
        if age is not None:
            return spec.classes[sum(age >= b for b in spec.age_bounds)]
    where = "".join([f" in row {row}" if row is not None else "", f", column {column!r}" if column else ""])
    known = ", ".join(spec.classes) + (", an age or an age bin such as 20-29" if spec.age_bounds else "")
    raise ValueError(f"label map {map_name!r}: unknown label {str(raw)!r}{where} (expected {known}; "
                     f"accepted spellings: {', '.join(sorted(spec.aliases))})")
