"""The toy-world diffusion recipe's data: object-weighted latent loss maps."""

from __future__ import annotations

import dataclasses

import torch

from fairness.toyworld.diffusion import DiffusionRecipe, latent_dataset, latent_size, make_vae


def test_latent_weights_favour_the_object_and_average_one():
    recipe = dataclasses.replace(DiffusionRecipe.quick(), train_images=24, latent_object_weight=4.0)
    vae = make_vae(recipe).eval()
    data = latent_dataset(vae, recipe, seed=0, device=torch.device("cpu"), progress=False)
    side = latent_size(recipe)
    assert len(data.prompts) == 24
    assert data.latents.shape == (24, recipe.latent_channels, side, side)
    assert data.weights.shape == (24, 1, side, side)
    torch.testing.assert_close(data.weights.mean(dim=(1, 2, 3)), torch.ones(24))
    spread = data.weights.amax(dim=(1, 2, 3)) - data.weights.amin(dim=(1, 2, 3))
    # Images with an object weight its cells above the background; the rest stay uniform.
    assert (spread > 1.0).sum() >= 12
    assert torch.all((spread > 1.0) | (spread < 1e-6))


def test_zero_object_weight_is_the_plain_sd_loss():
    recipe = dataclasses.replace(DiffusionRecipe.quick(), train_images=8, latent_object_weight=0.0)
    data = latent_dataset(make_vae(recipe).eval(), recipe, seed=0, device=torch.device("cpu"), progress=False)
    torch.testing.assert_close(data.weights, torch.ones_like(data.weights))
