"""The toy world's grammar: concepts, prompt templates, contexts and biased attribute laws.

Real Stable Diffusion, CLIP and DINO weights cannot be had here, so the project ships a small
world in which every quantity the paper estimates is known exactly. A prompt names one
*concept*; the concept fixes the object's *shape* (the semantic attribute, which debiasing must
keep) and a strongly biased law over the *protected* attributes ``tone`` (gender analog),
``color`` (race analog) and ``pattern`` (age analog). All three are visible inside a square
crop around the object, exactly like face attributes inside a face crop.

Everything here is deterministic: each concept's law is derived from its name with
:func:`fairness.seeding.derive_seed` (never Python's salted ``hash()``), so every process, worker
and machine sees the same world. ``README_WORLD.md`` documents the resulting tables.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache
from typing import Sequence

import numpy as np

from fairness.seeding import numpy_rng

ATTRIBUTES: dict[str, list[str]] = {
    "tone": ["light", "dark"],
    "color": ["red", "green", "blue", "yellow"],
    "pattern": ["plain", "striped"],
}
SHAPES: list[str] = ["circle", "square", "triangle", "diamond", "cross", "ring"]

# The world's own seed: changing it would redraw every concept's law (and invalidate the
# shipped models), so it is a constant, not a parameter.
WORLD_SEED = 20240501

OCCUPATIONS = [
    "doctor", "nurse", "engineer", "teacher", "chef", "pilot", "farmer", "lawyer", "baker",
    "painter", "singer", "dancer", "writer", "judge", "sailor", "soldier", "plumber", "carpenter",
    "librarian", "banker", "cashier", "firefighter", "janitor", "mechanic", "pharmacist",
    "architect", "dentist", "tailor", "clerk", "scientist",
]
SPORTS = [
    "tennis", "soccer", "basketball", "golf", "baseball", "hockey", "rugby", "volleyball",
    "cricket", "badminton", "chess", "bowling", "football", "handball", "squash", "polo",
]
DESCRIPTORS = [
    "happy", "sad", "rich", "poor", "brave", "calm", "angry", "clever", "friendly", "lazy",
    "quiet", "strong", "shy", "kind", "tired", "busy",
]
# Scenery never shows an object: the "image without a face" case at the prompt level.
SCENERY = {"empty street": "train", "empty room": "val", "landscape": "test"}

SPLIT_SHARES = {"test": 0.25, "val": 0.15}  # the rest is "train"

# ``{concept}`` is replaced by the concept's noun phrase, article included ("an engineer",
# "a person playing tennis", "a happy person"), so one template serves every family.
TEMPLATES: dict[str, list[str]] = {
    "seen": ["a photo of {concept}", "a picture of {concept}", "an image of {concept}"],
    "unseen": ["a drawing of {concept}", "a portrait of {concept}"],
}
# Appended after a comma; each one selects a grayscale background (see ``BACKGROUNDS``).
CONTEXTS: dict[str, list[str]] = {
    "seen": ["", "on a light background", "on a dark background", "on a checkered background"],
    "unseen": ["on a noisy background", "on a gradient background"],
}
# context -> background kind drawn by the renderer. Backgrounds are grayscale only, so the
# object's colour is never confounded with the scene.
BACKGROUNDS: dict[str, str] = {
    "": "plain",
    "on a light background": "light",
    "on a dark background": "dark",
    "on a checkered background": "checkered",
    "on a noisy background": "noisy",
    "on a gradient background": "gradient",
}

# Object geometry (pixels on the 32x32 canvas) and pose jitter.
IMAGE_SIZE = 32
MIN_SIZE, MAX_SIZE = 8.0, 20.0
# Ranges of each concept's dominant tone / dominant colour probability and striped rate
# (:func:`_biased_concept`).
LAW_RANGES: dict[str, tuple[float, float]] = {"tone": (0.57, 0.63), "color": (0.40, 0.48), "striped": (0.36, 0.46)}
MAX_ROTATION = 10.0  # degrees: small, so a square never looks like a diamond


@dataclass(frozen=True)
class Concept:
    """One prompt concept and its ground-truth attribute law.

    ``tone_probs`` / ``color_probs`` follow the class order of :data:`ATTRIBUTES`; the joint
    law of (tone, color) is their product. ``striped_rate`` is P(pattern = striped) and
    ``no_object_rate`` the share of images without an object. Scenery has ``shape = None``
    and ``no_object_rate = 1``.
    """

    name: str
    family: str
    split: str
    shape: str | None
    phrase: str
    tone_probs: tuple[float, ...]
    color_probs: tuple[float, ...]
    striped_rate: float
    no_object_rate: float

    @property
    def has_objects(self) -> bool:
        return self.shape is not None

    @property
    def dominant_tone(self) -> str | None:
        return ATTRIBUTES["tone"][int(np.argmax(self.tone_probs))] if self.has_objects else None

    @property
    def dominant_color(self) -> str | None:
        return ATTRIBUTES["color"][int(np.argmax(self.color_probs))] if self.has_objects else None


@dataclass(frozen=True)
class Scene:
    """Everything the renderer needs for one image, besides background texture noise.

    Attribute fields are ``None`` when ``has_object`` is False. ``cx, cy`` is the object
    centre and ``size`` its nominal extent in pixels; ``rotation`` is in degrees.
    """

    concept: str
    shape: str | None
    tone: str | None
    color: str | None
    pattern: str | None
    context: str
    has_object: bool
    cx: float = 0.0
    cy: float = 0.0
    size: float = 0.0
    rotation: float = 0.0


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _phrase(name: str, family: str) -> str:
    if family == "occupation" or family == "scenery":
        return f"{_article(name)} {name}"
    if family == "sport":
        return f"a person playing {name}"
    return f"{_article(name)} {name} person"


def _splits(names: list[str], family: str) -> dict[str, str]:
    """Deterministic ~60/15/25 split: order names by a name-derived key, then cut by quota."""
    order = sorted(names, key=lambda n: numpy_rng(WORLD_SEED, "split", family, n).random())
    n_test = int(round(SPLIT_SHARES["test"] * len(names)))
    n_val = int(round(SPLIT_SHARES["val"] * len(names)))
    out = {n: "test" for n in order[:n_test]}
    out.update({n: "val" for n in order[n_test:n_test + n_val]})
    out.update({n: "train" for n in order[n_test + n_val:]})
    return out


def _biased_concept(name: str, family: str, split: str, shape: str, dominant: tuple[int, int]) -> Concept:
    """Draw the concept's law from its name around the given dominant (tone, colour) indices:
    dominant tone 0.57-0.63, dealt colour 0.40-0.48 (the rest spread unevenly, so a second
    colour may come close to it or pass it, as two groups often do in SD), striped rate
    0.36-0.46, no object 3-7%.

    The laws are mild on purpose. Classifier-free guidance tilts a learned attribute law by
    about the guidance scale's power (p_g ~ p_c^g / p_u^(g-1)), so at the shipped guidance 5 a
    0.60 tone law is drawn at about 0.83, Stable Diffusion 1.5's gender bias (0.67); the first
    world's 0.85-0.95 laws were drawn at 0.99, one tone per prompt whatever the noise."""
    rng = numpy_rng(WORLD_SEED, "law", family, name)
    dom_tone, dom_color = dominant
    tone = np.zeros(2)
    tone[dom_tone] = rng.uniform(*LAW_RANGES["tone"])
    tone[1 - dom_tone] = 1.0 - tone[dom_tone]
    color = np.zeros(4)
    color[dom_color] = rng.uniform(*LAW_RANGES["color"])
    rest = rng.dirichlet([2.0, 2.0, 2.0]) * (1.0 - color[dom_color])
    color[[i for i in range(4) if i != dom_color]] = rest
    return Concept(
        name=name, family=family, split=split, shape=shape, phrase=_phrase(name, family),
        tone_probs=tuple(float(p) for p in tone), color_probs=tuple(float(p) for p in color),
        striped_rate=float(rng.uniform(*LAW_RANGES["striped"])), no_object_rate=float(rng.uniform(0.03, 0.07)),
    )


@lru_cache(maxsize=1)
def _all_concepts() -> tuple[Concept, ...]:
    """Build the world. Shapes and dominant (tone, colour) pairs are dealt round-robin within
    each split, so every split sees every shape and every dominant pair (not all "dark red");
    the cycles have lengths 6 and 8, so shape and dominant pair do not move in lockstep."""
    combos = [(t, c) for t in range(2) for c in range(4)]
    dealt = {"train": 0, "val": 0, "test": 0}
    out: list[Concept] = []
    for family, names in (("occupation", OCCUPATIONS), ("sport", SPORTS), ("descriptor", DESCRIPTORS)):
        split = _splits(names, family)
        for name in names:
            k = dealt[split[name]]
            dealt[split[name]] += 1
            out.append(_biased_concept(name, family, split[name], SHAPES[k % len(SHAPES)],
                                       combos[k % len(combos)]))
    for name, split in SCENERY.items():
        out.append(Concept(name=name, family="scenery", split=split, shape=None,
                           phrase=_phrase(name, "scenery"), tone_probs=(), color_probs=(),
                           striped_rate=0.0, no_object_rate=1.0))
    return tuple(out)


def concepts() -> list[Concept]:
    """Every concept of the world, in a fixed order (occupations, sports, descriptors, scenery)."""
    return list(_all_concepts())


def concepts_by_split(split: str) -> list[Concept]:
    if split not in ("train", "val", "test"):
        raise ValueError(f"split must be train, val or test, got {split!r}")
    return [c for c in _all_concepts() if c.split == split]


def concept(name: str) -> Concept:
    """Look a concept up by name."""
    for c in _all_concepts():
        if c.name == name:
            return c
    raise KeyError(f"unknown toy-world concept {name!r}")


def make_prompt(concept: Concept, template: str, context: str, attributes: Sequence[str] = ()) -> str:
    """``template`` filled with the concept's phrase, then ``" in " + attributes`` if any (only
    training captions name attributes), then ``", " + context`` if any."""
    base = template.replace("{concept}", concept.phrase)
    if attributes:
        base = f"{base} in {' '.join(attributes)}"
    return f"{base}, {context}" if context else base


def mentioned_attributes(scene: Scene, rng: np.random.Generator, rate: float) -> list[str]:
    """The scene's tone, colour and pattern words, each kept with probability ``rate``.

    Web captions sometimes say "a female doctor": that is what gives SD a text direction for
    the attribute, which debiasing then uses. Training captions that name the object's
    attributes now and then give the toy model the same; plain prompts keep the concept's law.
    """
    if not scene.has_object or rate <= 0:
        return []
    words = [scene.tone, scene.color, scene.pattern]
    return [w for w, keep in zip(words, rng.random(len(words)) < rate) if keep]


def _choose(names: str) -> list[str]:
    if names not in ("seen", "unseen", "all"):
        raise ValueError(f"expected 'seen', 'unseen' or 'all', got {names!r}")
    return ["seen", "unseen"] if names == "all" else [names]


def all_templates() -> list[str]:
    return TEMPLATES["seen"] + TEMPLATES["unseen"]


def all_contexts() -> list[str]:
    return CONTEXTS["seen"] + CONTEXTS["unseen"]


@lru_cache(maxsize=1)
def _template_patterns() -> tuple[tuple[str, re.Pattern[str]], ...]:
    out = []
    for t in all_templates():
        head, tail = t.split("{concept}")
        out.append((t, re.compile("^" + re.escape(head) + "(.+)" + re.escape(tail) + "$")))
    return tuple(out)


def parse_prompt(prompt: str) -> tuple[Concept | None, str | None, str]:
    """Invert :func:`make_prompt`: ``(concept, template, context)``.

    The concept and template are ``None`` when the prompt does not follow the grammar (e.g. a
    user-written prompt); the context is ``""`` when no known context suffix is present.
    """
    text = " ".join(prompt.strip().split())
    context = ""
    for ctx in sorted(all_contexts(), key=len, reverse=True):
        if ctx and text.endswith(", " + ctx):
            context, text = ctx, text[: -len(ctx) - 2]
            break
    by_phrase = {c.phrase: c for c in _all_concepts()}
    for template, pattern in _template_patterns():
        m = pattern.match(text)
        if m and m.group(1) in by_phrase:
            return by_phrase[m.group(1)], template, context
    return None, None, context


def attribute_distribution(concept: Concept) -> dict:
    """The documented ground truth of ``concept``'s images.

    ``tone``, ``color``, ``pattern``: marginal laws among images *with* an object;
    ``tone_color``: the joint law ``{tone: {color: p}}``; ``no_object``: share of images
    without an object. Scenery has empty laws and ``no_object = 1``.
    """
    if not concept.has_objects:
        return {"tone": {}, "color": {}, "pattern": {}, "tone_color": {}, "no_object": 1.0}
    tone = dict(zip(ATTRIBUTES["tone"], concept.tone_probs))
    color = dict(zip(ATTRIBUTES["color"], concept.color_probs))
    return {
        "tone": tone,
        "color": color,
        "pattern": {"plain": 1.0 - concept.striped_rate, "striped": concept.striped_rate},
        "tone_color": {t: {c: tone[t] * color[c] for c in color} for t in tone},
        "no_object": concept.no_object_rate,
    }


def sample_scene(rng: np.random.Generator, concept: Concept, context: str) -> Scene:
    """One scene of ``concept`` drawn from its biased law, with random size, position, pose."""
    if context not in BACKGROUNDS:
        raise ValueError(f"unknown context {context!r}")
    if not concept.has_objects or rng.random() < concept.no_object_rate:
        return Scene(concept=concept.name, shape=None, tone=None, color=None, pattern=None,
                     context=context, has_object=False)
    tone = ATTRIBUTES["tone"][int(rng.choice(2, p=concept.tone_probs))]
    color = ATTRIBUTES["color"][int(rng.choice(4, p=concept.color_probs))]
    pattern = "striped" if rng.random() < concept.striped_rate else "plain"
    size = float(rng.uniform(MIN_SIZE, MAX_SIZE))
    half = size / 2 + 1.0
    cx, cy = (float(v) for v in rng.uniform(half, IMAGE_SIZE - half, size=2))
    return Scene(concept=concept.name, shape=concept.shape, tone=tone, color=color, pattern=pattern,
                 context=context, has_object=True, cx=cx, cy=cy, size=size,
                 rotation=float(rng.uniform(-MAX_ROTATION, MAX_ROTATION)))


def sample_training_pair(rng: np.random.Generator, caption_rng: np.random.Generator | None = None,
                         attribute_rate: float = 0.0) -> tuple[str, np.ndarray, Scene]:
    """A random (prompt, image, scene) over ALL concepts, templates and contexts.

    The generator must know every word (unseen concepts, templates and contexts are only held
    out from *debiasing*), so its training data covers the whole grammar. With
    ``attribute_rate > 0`` the caption also names some of the object's attributes
    (:func:`mentioned_attributes`), drawn from ``caption_rng`` so that the scenes themselves
    do not depend on the captioning.
    """
    from fairness.toyworld.render import render  # render.py imports this module: import late

    pool = _all_concepts()
    c = pool[int(rng.integers(len(pool)))]
    templates, contexts = all_templates(), all_contexts()
    template = templates[int(rng.integers(len(templates)))]
    context = contexts[int(rng.integers(len(contexts)))]
    scene = sample_scene(rng, c, context)
    image, _ = render(scene, rng)
    mentioned = mentioned_attributes(scene, caption_rng, attribute_rate) if caption_rng is not None else []
    return make_prompt(c, template, context, mentioned), image, scene


def vocabulary() -> list[str]:
    """Every word (lower case, punctuation stripped) that appears in any prompt of the world."""
    words: set[str] = set()
    texts = [c.phrase for c in _all_concepts()] + all_templates() + all_contexts()
    for text in texts:
        for w in re.findall(r"[a-z]+", text.replace("{concept}", "").lower()):
            words.add(w)
    return sorted(words)


def caption_vocabulary() -> list[str]:
    """:func:`vocabulary` plus the attribute words that training captions may name."""
    return sorted(set(vocabulary()) | {w for classes in ATTRIBUTES.values() for w in classes} | {"in"})


def prompts(split: str, templates: str = "seen", contexts: str = "seen") -> list[str]:
    """All prompts of ``split``'s concepts under the chosen template and context sets
    (``"seen"``, ``"unseen"`` or ``"all"``), in a fixed order."""
    ts = [t for k in _choose(templates) for t in TEMPLATES[k]]
    cs = [x for k in _choose(contexts) for x in CONTEXTS[k]]
    return [make_prompt(c, t, x) for c in concepts_by_split(split) for t in ts for x in cs]


def concept_table() -> str:
    """The concepts and their ground-truth laws as a markdown table (README_WORLD.md embeds it;
    a test keeps the two in sync)."""
    head = ("| concept | family | split | shape | P(tone) light / dark | P(color) red / green / blue / yellow "
            "| P(striped) | P(no object) |")
    rows = [head, "|" + "---|" * 8]
    for c in _all_concepts():
        if not c.has_objects:
            rows.append(f"| {c.name} | {c.family} | {c.split} | - | - | - | - | 1.00 |")
            continue
        tone = " / ".join(f"{p:.2f}" for p in c.tone_probs)
        color = " / ".join(f"{p:.2f}" for p in c.color_probs)
        rows.append(f"| {c.name} | {c.family} | {c.split} | {c.shape} | {tone} | {color} "
                    f"| {c.striped_rate:.2f} | {c.no_object_rate:.2f} |")
    return "\n".join(rows)
