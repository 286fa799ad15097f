"""The structure term: blind to the toy world's attributes, sensitive to its concept (shape)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from fairness.losses.structure import OutlineEncoder, structure_loss
from fairness.toyworld.render import render
from fairness.toyworld.world import BACKGROUNDS, Scene
from fairness.training.loop import Trainer
from tests.helpers import tiny_config

BASE = Scene(concept="probe", shape="circle", tone="light", color="red", pattern="plain", context="",
             has_object=True, cx=16, cy=16, size=16, rotation=0)


def _image(**change) -> torch.Tensor:
    image, _ = render(dataclasses.replace(BASE, **change), np.random.default_rng(0))
    return torch.from_numpy(image)[None]


@pytest.mark.parametrize("context", sorted(BACKGROUNDS))
def test_recolouring_costs_far_less_than_reshaping(context):
    enc, base = OutlineEncoder(), _image(context=context)
    original = enc(base)
    recoloured = [structure_loss(_image(context=context, **c), original, enc)
                  for c in ({"tone": "dark"}, {"color": "blue"}, {"color": "green", "tone": "dark"})]
    reshaped = [structure_loss(_image(context=context, shape=s), original, enc) for s in ("square", "diamond", "ring")]
    reshaped.append(structure_loss(_image(context=context, pattern="striped"), original, enc))
    assert structure_loss(base, original, enc) == pytest.approx(0.0, abs=1e-6)
    assert max(recoloured) < 0.2 * min(reshaped), (recoloured, reshaped)


@pytest.mark.parametrize("fill", ["flat", "noise"])
def test_gradient_is_finite_even_where_the_image_is_flat(fill):
    x = torch.full((1, 3, 32, 32), 0.5) if fill == "flat" else torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    x.requires_grad_(True)
    structure_loss(x, OutlineEncoder()(_image()), OutlineEncoder()).backward()
    assert torch.isfinite(x.grad).all()
    assert (x.grad.abs().sum() > 0) == (fill == "noise")  # a flat image is a stationary point


def test_objective_adds_the_weighted_term_and_names_a_stale_bank(tmp_path):
    cfg = tiny_config(tmp_path, loss__structure_weight=3.0)
    objective = Trainer(cfg, tmp_path / "run", progress=False).model.objective
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    originals = objective.describe_originals(torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1)))
    logs = objective(images, originals, seed=0).logs
    assert logs["loss/structure"] > 0
    rest = logs["loss/align"] + logs["loss/img"] + cfg.loss.face_weight * logs.get("loss/face", 0.0)
    assert logs["loss/total"] == pytest.approx(rest + 3.0 * logs["loss/structure"], rel=1e-5)
    del originals.features["structure"]
    with pytest.raises(KeyError, match="rebuild the originals bank"):
        objective(images, originals, seed=0)
