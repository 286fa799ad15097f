"""The toy world's grammar and renderer: determinism, coverage and the documented bias."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from fairness.toyworld import world as W
from fairness.toyworld.render import render


def _bias(freqs: list[float]) -> float:
    """The paper's bias: mean over class pairs of |freq_i - freq_j|."""
    pairs = list(itertools.combinations(freqs, 2))
    return sum(abs(a - b) for a, b in pairs) / len(pairs)


def test_world_size_and_families() -> None:
    cs = W.concepts()
    assert len([c for c in cs if c.has_objects]) >= 60
    families = {c.family for c in cs}
    assert families == {"occupation", "sport", "descriptor", "scenery"}
    assert len({c.name for c in cs}) == len(cs)
    assert len({c.phrase for c in cs}) == len(cs)


def test_splits_disjoint_and_cover_all_shapes() -> None:
    names = {s: {c.name for c in W.concepts_by_split(s)} for s in ("train", "val", "test")}
    assert not names["train"] & names["val"]
    assert not names["train"] & names["test"]
    assert not names["val"] & names["test"]
    assert set().union(*names.values()) == {c.name for c in W.concepts()}
    n = len(W.concepts())
    assert 0.5 < len(names["train"]) / n < 0.7 and 0.2 < len(names["test"]) / n < 0.3
    for split in ("train", "val", "test"):
        assert {c.shape for c in W.concepts_by_split(split) if c.has_objects} == set(W.SHAPES)


def test_world_is_deterministic() -> None:
    W._all_concepts.cache_clear()
    first = W.concepts()
    W._all_concepts.cache_clear()
    assert W.concepts() == first
    rng_a, rng_b = np.random.default_rng(7), np.random.default_rng(7)
    for _ in range(20):
        pa, ia, sa = W.sample_training_pair(rng_a)
        pb, ib, sb = W.sample_training_pair(rng_b)
        assert pa == pb and sa == sb
        np.testing.assert_array_equal(ia, ib)


def test_laws_are_biased_and_varied() -> None:
    dominants = set()
    for c in W.concepts():
        if not c.has_objects:
            assert W.attribute_distribution(c)["no_object"] == 1.0
            continue
        lo, hi = W.LAW_RANGES["tone"]
        assert 0.5 < lo <= max(c.tone_probs) <= hi
        lo, hi = W.LAW_RANGES["color"]
        # The dealt colour lies in its range; the other three share the rest unevenly, so a
        # second colour can come close to it (or pass it), as two groups often do in SD.
        assert 0.25 < lo and any(lo <= p <= hi for p in c.color_probs)
        lo, hi = W.LAW_RANGES["striped"]
        assert lo <= c.striped_rate <= hi
        assert 0.0 < c.no_object_rate < 0.1
        dist = W.attribute_distribution(c)
        joint = sum(p for row in dist["tone_color"].values() for p in row.values())
        assert joint == pytest.approx(1.0)
        dominants.add((c.dominant_tone, c.dominant_color))
    assert len(dominants) == 8


def test_laws_are_mild_so_guidance_makes_them_sd_like() -> None:
    """The ground-truth laws are mild (tone bias ~0.2): the shipped model's guidance sharpens
    them into SD 1.5's range, and the noise still decides (the fidelity report measures it;
    tests/test_toyworld_diffusion.py checks the shipped model)."""
    tone_bias, color_bias = [], []
    for c in W.concepts_by_split("test"):
        if c.has_objects:
            tone_bias.append(_bias(list(c.tone_probs)))
            color_bias.append(_bias(list(c.color_probs)))
    assert 0.1 <= np.mean(tone_bias) <= 0.3
    assert 0.1 <= np.mean(color_bias) <= 0.3
    assert max(max(c.tone_probs) for c in W.concepts() if c.has_objects) < 0.7


def test_empirical_law_matches_ground_truth() -> None:
    c = W.concepts_by_split("test")[0]
    rng = np.random.default_rng(0)
    scenes = [W.sample_scene(rng, c, "") for _ in range(6000)]
    with_obj = [s for s in scenes if s.has_object]
    dist = W.attribute_distribution(c)
    assert 1 - len(with_obj) / len(scenes) == pytest.approx(dist["no_object"], abs=0.015)
    for attr in ("tone", "color", "pattern"):
        for cls, p in dist[attr].items():
            freq = np.mean([getattr(s, attr) == cls for s in with_obj])
            assert freq == pytest.approx(p, abs=0.025), (attr, cls)
    for tone, row in dist["tone_color"].items():
        for color, p in row.items():
            freq = np.mean([(s.tone, s.color) == (tone, color) for s in with_obj])
            assert freq == pytest.approx(p, abs=0.02)


def test_no_object_share_exists() -> None:
    rng = np.random.default_rng(1)
    draws = [W.sample_training_pair(rng)[2].has_object for _ in range(1500)]
    share = 1 - np.mean(draws)
    assert 0.03 < share < 0.15
    scenery = [c for c in W.concepts() if not c.has_objects]
    assert scenery and all(not W.sample_scene(rng, c, "").has_object for c in scenery)


def test_every_concept_and_context_renders() -> None:
    rng = np.random.default_rng(2)
    for c, ctx in zip(W.concepts(), itertools.cycle(W.all_contexts())):
        scene = W.sample_scene(rng, c, ctx)
        image, box = render(scene, rng)
        assert image.shape == (3, 32, 32) and image.dtype == np.float32
        assert image.min() >= 0.0 and image.max() <= 1.0
        assert (box is None) == (not scene.has_object)
    for ctx in W.all_contexts():
        bg, _ = render(W.sample_scene(rng, W.concept("landscape"), ctx), rng)
        assert np.allclose(bg[0], bg[1]) and np.allclose(bg[1], bg[2]), "backgrounds are grayscale"


def test_box_encloses_object_of_expected_size() -> None:
    rng = np.random.default_rng(3)
    for c in [c for c in W.concepts() if c.has_objects][:24]:
        scene = W.sample_scene(rng, c, "on a dark background")
        if not scene.has_object:
            continue
        image, box = render(scene, rng)
        x0, y0, x1, y1 = box
        assert 0 <= x0 < x1 <= 32 and 0 <= y0 < y1 <= 32
        assert 4 <= max(x1 - x0, y1 - y0) <= 22
        assert x0 - 1 <= scene.cx <= x1 + 1 and y0 - 1 <= scene.cy <= y1 + 1
        inside = image[:, int(y0):int(y1), int(x0):int(x1)]
        sat = inside.max(0) - inside.min(0)
        assert sat.max() > 0.2, "the object is coloured, the background is not"


def test_prompts_round_trip_and_vocabulary() -> None:
    vocab = set(W.vocabulary())
    every = [p for s in ("train", "val", "test") for p in W.prompts(s, "all", "all")]
    assert len(every) == len(set(every)) == len(W.concepts()) * 5 * 6
    for prompt in every:
        c, template, context = W.parse_prompt(prompt)
        assert c is not None and template is not None
        assert W.make_prompt(c, template, context) == prompt
        assert set(prompt.replace(",", " ").split()) <= vocab
    assert W.parse_prompt("a cat sitting on a mat") == (None, None, "")
    seen = W.prompts("test", "seen", "seen")
    unseen = W.prompts("test", "unseen", "unseen")
    assert not set(seen) & set(unseen)
    assert all(W.parse_prompt(p)[1] in W.TEMPLATES["unseen"] for p in unseen)


def test_training_captions_name_the_drawn_attributes_without_changing_the_scenes() -> None:
    plain = [W.sample_training_pair(np.random.default_rng(11))[2] for _ in range(1)]
    rng, caption_rng = np.random.default_rng(11), np.random.default_rng(12)
    pairs = [W.sample_training_pair(rng, caption_rng, attribute_rate=0.5) for _ in range(400)]
    assert pairs[0][2] == plain[0]  # captioning draws from its own generator
    vocab, named = set(W.caption_vocabulary()), 0
    for caption, _, scene in pairs:
        assert set(caption.replace(",", " ").split()) <= vocab
        base = caption.split(",")[0]
        if " in " in base and scene.has_object:
            words = base.rsplit(" in ", 1)[1].split()
            assert words and set(words) <= {scene.tone, scene.color, scene.pattern}, (caption, scene)
            named += 1
        else:
            assert W.parse_prompt(caption)[0] is not None  # a plain caption is a world prompt
    share = named / sum(p[2].has_object for p in pairs)
    assert 0.8 < share < 0.95  # 1 - 0.5**3 of the captions with an object name something
    assert W.mentioned_attributes(pairs[0][2], caption_rng, 0.0) == []


def test_render_is_fast() -> None:
    import time

    rng = np.random.default_rng(4)
    start = time.perf_counter()
    for _ in range(500):
        W.sample_training_pair(rng)
    assert (time.perf_counter() - start) / 500 < 0.005


def test_readme_table_matches_the_world() -> None:
    from pathlib import Path

    readme = Path(W.__file__).with_name("README_WORLD.md").read_text()
    assert W.concept_table() in readme, "regenerate README_WORLD.md's table from world.concept_table()"
