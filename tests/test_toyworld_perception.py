"""Toy-world perception: the build runs, the shipped bundle loads and sees the world right."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from fairness.perception.base import AttributeClassifier, FaceEmbedder, ImageEncoder, TextImageEncoder
from fairness.perception.bundle import PerceptionBundle, load_bundle
from fairness.perception.regions import detect_largest, square_crop
from fairness.toyworld import world as W
from fairness.toyworld.perception import (
    RenderedSet,
    build_perception,
    measure_classifier,
    measure_detector,
    natural_data,
)
from fairness.toyworld.render import render

SHIPPED = Path(__file__).resolve().parents[1] / "fairness" / "toyworld" / "assets" / "perception"


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    """Tiny networks run fastest single-threaded on a shared CPU; restore the setting after."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def bundle() -> PerceptionBundle:
    return load_bundle(SHIPPED)


@pytest.fixture(scope="module")
def fresh() -> RenderedSet:
    """Images the shipped models never saw (a seed the build does not use)."""
    return natural_data(12345, "pytest", 300)


def test_quick_build_writes_a_loadable_bundle(tmp_path: Path) -> None:
    metrics = build_perception(tmp_path, seed=3, quick=True)
    assert set(metrics["eval_classifier"]) == {"tone", "color", "pattern", "shape"}
    b = load_bundle(tmp_path)
    assert b.attributes == W.ATTRIBUTES
    assert b.face_bank is not None and b.face_bank.shape[1] == b.face_embedder(torch.rand(2, 3, 24, 24)).shape[1]


def test_shipped_bundle_components(bundle: PerceptionBundle) -> None:
    assert bundle.attributes == W.ATTRIBUTES
    assert bundle.eval_classifier.attributes == W.ATTRIBUTES
    for clf in (bundle.train_classifier, bundle.eval_classifier):
        assert isinstance(clf, AttributeClassifier)
        assert clf.semantic_attributes == {"shape": W.SHAPES}
    assert bundle.train_classifier.trunk[0].kernel_size != bundle.eval_classifier.trunk[0].kernel_size
    assert bundle.train_classifier.input_size != bundle.eval_classifier.input_size
    assert isinstance(bundle.text_image_encoder, TextImageEncoder)
    assert isinstance(bundle.face_embedder, FaceEmbedder)
    assert all(isinstance(e, ImageEncoder) for e in bundle.encoders.values())
    assert bundle.semantic_encoders and set(bundle.eval_encoders) == {"clip_i", "dino"}
    bank = bundle.face_bank
    assert bank is not None and 1000 <= bank.shape[0] <= 2000
    torch.testing.assert_close(bank.norm(dim=1), torch.ones(len(bank)))
    size = sum(f.stat().st_size for f in SHIPPED.iterdir())
    assert size < 2_000_000


def test_eval_classifier_is_accurate_on_fresh_images(bundle: PerceptionBundle, fresh: RenderedSet) -> None:
    acc = measure_classifier(bundle.eval_classifier, bundle.detector, fresh)
    assert min(acc.values()) >= 0.98, acc


def test_detector_finds_the_object_and_nothing_else(bundle: PerceptionBundle, fresh: RenderedSet) -> None:
    stats = measure_detector(bundle.detector, fresh)
    assert stats["objectness_accuracy"] >= 0.99, stats
    assert stats["box_iou_over_0.8"] >= 0.9, stats
    rng = np.random.default_rng(0)
    scenery = [W.sample_scene(rng, W.concept("landscape"), ctx) for ctx in W.all_contexts() * 5]
    images = torch.from_numpy(np.stack([render(s, rng)[0] for s in scenery]))
    assert all(len(d) == 0 for d in bundle.detector.detect(images))


def test_gradients_reach_pixels(bundle: PerceptionBundle, fresh: RenderedSet) -> None:
    images = fresh.images[:8].clone().requires_grad_(True)
    regions = detect_largest(bundle.detector, images)
    logits = bundle.train_classifier(square_crop(images, regions, bundle.train_classifier.input_size))
    emb = bundle.face_embedder(square_crop(images, regions, bundle.face_embedder.input_size))
    loss = sum(v.logsumexp(-1).sum() for v in logits.values()) + emb.sum()
    for enc in bundle.encoders.values():
        loss = loss + enc(images).sum()
    loss.backward()
    assert images.grad is not None and images.grad.abs().sum() > 0


def test_clip_encodes_raw_prompts(bundle: PerceptionBundle) -> None:
    enc = bundle.text_image_encoder
    prompts = W.prompts("test")[:3] + ["a prompt with words the world never uses"]
    t = enc.encode_text(prompts)
    assert t.shape[0] == 4
    torch.testing.assert_close(t.norm(dim=1), torch.ones(4))


def test_public_names_are_reexported() -> None:
    """The package re-exports each component's public names (callers import them from here)."""
    import fairness.toyworld.perception as perception

    for name in perception.__all__:
        value = getattr(perception, name)
        assert name.isupper() or value.__module__.startswith("fairness.toyworld.perception."), name


def test_bundle_loads_its_backends_in_a_fresh_interpreter() -> None:
    """``toyworld.*`` backends register on first use: loading the shipped bundle imports the
    package, and each component comes from its own module."""
    code = (
        "import sys\n"
        "from fairness.perception.bundle import load_bundle\n"
        f"b = load_bundle({str(SHIPPED)!r})\n"
        "assert b.semantic_labeler is not None\n"
        "print(type(b.detector).__module__, type(b.eval_classifier).__module__, type(b.text_image_encoder).__module__,"
        " type(b.encoders['dino']).__module__, type(b.face_embedder).__module__)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["fairness.toyworld.perception." + m for m in ("detector", "classifier", "clip", "encoder", "encoder")]
