"""The peers on the real toy world: each moves the tone toward the target by a margin chance
cannot explain (same noise with and without the method, an exact McNemar test on the images
whose class changed); the SEGA step equals diffusers' ``SemanticStableDiffusionPipeline``; the
ADP learns; bad edit texts, unknown methods and missing ADPs fail clearly."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from scipy.stats import binom

from fairness.baselines.methods import build_method, parse_method
from fairness.baselines.texts import BaselineError
from fairness.baselines.distribution_guidance import ADPTrainConfig, load_adp, train_adp
from fairness.baselines.fair_diffusion import SegaParams, draw_classes, sega_prediction
from fairness.baselines.sampler import cfg_embeddings, cfg_prediction, sample
from fairness.dft.engine import (
    SamplingConfig,
    encode_prompts,
    fresh_scheduler,
    generate,
)
from fairness.generation import load_model
from fairness.metrics.audit import _perceive
from fairness.models.loading import load_perception
from fairness.seeding import image_noise
from fairness.toyworld import world

pytestmark = [pytest.mark.timeout(600), pytest.mark.usefixtures("one_torch_thread")]

PROMPT = "a photo of an engineer"
STEPS, GUIDANCE, N = 8, 5.0, 24
SAMPLING = SamplingConfig(num_steps=STEPS, guidance_scale=GUIDANCE, mode="none")
TONE_TEXTS = {"tone": ["a photo of a person in light", "a photo of a person in dark"]}
UNIFORM = {"marginals": {"tone": "uniform"}}
# The toy world's settings of docs/baselines.md (its 16x16 latent and 64x4x4 h; see compare.yaml).
FAIR_DIFFUSION = {"method": "fair-diffusion", "edit_texts": TONE_TEXTS, "edit_threshold": 0.5}
# Held-out accuracy of the ADP must beat always answering the commonest pseudo-label by this much.
ADP_MARGIN = 0.2


@pytest.fixture(scope="module")
def toy():
    model = load_model("toyworld", device="cpu")
    bundle = load_perception("toyworld")
    return model, bundle


@pytest.fixture(scope="module")
def adp_dir(toy, tmp_path_factory):
    """A small ADP for tone: 12 training prompts x 8 images, 8 steps (~30 s on one core)."""
    model, bundle = toy
    prompts = world.prompts("train")[::40][:12]
    out = tmp_path_factory.mktemp("adp")
    # One thread, like the tests that use it (a module fixture is built before the function-scoped
    # one_torch_thread applies): a small ADP's guidance is sensitive to its exact weights.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train_adp(model.pipe, bundle, prompts, out, ADPTrainConfig(images_per_prompt=8, num_steps=STEPS,
                                                                   guidance_scale=GUIDANCE, epochs=30, val_fraction=0.3),
                  attributes=["tone"], progress=False)
    finally:
        torch.set_num_threads(threads)
    return out


def _tones(bundle, images: torch.Tensor) -> np.ndarray:
    probs, regions, _ = _perceive(bundle, images)
    return np.where(regions.found.numpy(), probs["tone"].argmax(1), -1)


def _mcnemar_toward_minority(before: np.ndarray, after: np.ndarray, dominant: int) -> tuple[float, float, float]:
    """(p-value, minority share before, after) for flips toward vs away from the minority tone."""
    both = (before >= 0) & (after >= 0)
    to_minority = int(np.sum(both & (before == dominant) & (after != dominant)))
    to_dominant = int(np.sum(both & (before != dominant) & (after == dominant)))
    flips = to_minority + to_dominant
    p = float(binom.sf(to_minority - 1, flips, 0.5)) if flips else 1.0
    return p, float(np.mean(before[both] != dominant)), float(np.mean(after[both] != dominant))


def _moves_toward_the_minority(toy, spec: dict) -> None:
    """The target puts all mass on the tone the original draws least for this prompt (whatever the
    world's laws), so every image the method changes should change toward it."""
    model, bundle = toy
    noise = image_noise(4321, PROMPT, range(N), model.latent_shape)
    before = _tones(bundle, generate(model.pipe, [PROMPT] * N, noise, SAMPLING))
    dominant = int(np.bincount(before[before >= 0], minlength=2).argmax())
    classes = bundle.train_classifier.attributes["tone"]
    law = {"marginals": {"tone": {c: float(k != dominant) for k, c in enumerate(classes)}}}
    method = build_method(parse_method(spec), model, bundle.train_classifier.attributes, SAMPLING, law, "minority")
    after = _tones(bundle, method.generate([PROMPT] * N, noise))
    p, share_before, share_after = _mcnemar_toward_minority(before, after, dominant)
    print(f"{spec['method']}: minority tone share {share_before:.2f} -> {share_after:.2f}, p={p:.2g}")
    assert share_after > share_before and p < 0.01


def test_sampler_without_guidance_is_the_engine(toy):
    model, _ = toy
    noise = image_noise(0, PROMPT, range(3), model.latent_shape)
    uncond, cond = cfg_embeddings(model.pipe, [PROMPT] * 3)
    ours = sample(model.pipe, noise, STEPS, lambda ts: cfg_prediction(model.pipe, uncond, cond, GUIDANCE))
    assert torch.equal(ours, generate(model.pipe, [PROMPT] * 3, noise, SAMPLING))


def test_sega_step_equals_diffusers_semantic_pipeline(toy):
    """Our SEGA inside the sampler = SemanticStableDiffusionPipeline with the same latents."""
    from diffusers import SemanticStableDiffusionPipeline

    model, _ = toy
    pipe = model.pipe
    sem = SemanticStableDiffusionPipeline(vae=pipe.vae, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer,
                                          unet=pipe.unet, scheduler=fresh_scheduler(pipe), safety_checker=None,
                                          feature_extractor=None, requires_safety_checker=False)
    sem.set_progress_bar_config(disable=True)
    params = SegaParams(guidance_scale=4.0, warmup=2 / 6, threshold=0.9, momentum_scale=0.3, momentum_beta=0.6)
    noise = image_noise(1, PROMPT, range(2), model.latent_shape)
    theirs = sem(PROMPT, num_images_per_prompt=2, latents=noise, num_inference_steps=6, guidance_scale=GUIDANCE,
                 editing_prompt=TONE_TEXTS["tone"], reverse_editing_direction=[True, False],
                 edit_warmup_steps=2, edit_guidance_scale=4.0, edit_threshold=0.9, edit_momentum_scale=0.3,
                 edit_mom_beta=0.6, output_type="pt").images
    uncond, cond = cfg_embeddings(pipe, [PROMPT] * 2)
    edits = encode_prompts(pipe, TONE_TEXTS["tone"])
    signs = torch.tensor([[-1.0, 1.0], [-1.0, 1.0]])
    with torch.no_grad():
        ours = sample(pipe, noise, 6, lambda ts: sega_prediction(pipe, uncond, cond, edits, signs, GUIDANCE, params, 6))
    assert (ours - theirs).abs().max() < 1e-4
    assert (ours - generate(pipe, [PROMPT] * 2, noise, SamplingConfig(6, GUIDANCE, "none"))).abs().mean() > 1e-3


def test_directions_follow_the_target_and_the_noise():
    noise = torch.randn(2000, 4, 2, 2, generator=torch.Generator().manual_seed(0))
    chosen = draw_classes(noise, np.array([0.75, 0.25]), 0, "tone")
    assert abs(chosen.mean() - 0.25) < 3 * np.sqrt(0.25 * 0.75 / 2000)
    assert np.array_equal(chosen[:7], draw_classes(noise[:7], np.array([0.75, 0.25]), 0, "tone"))
    assert np.array_equal(chosen[5:9], draw_classes(noise[5:9], np.array([0.75, 0.25]), 0, "tone"))


def test_fair_diffusion_moves_tone_toward_the_target(toy):
    _moves_toward_the_minority(toy, FAIR_DIFFUSION)


def test_distribution_guidance_moves_tone_toward_the_target(toy, adp_dir):
    _moves_toward_the_minority(toy, {"method": "distribution-guidance", "adp": str(adp_dir), "step_size": 4000})


def test_adp_learns_above_chance(toy, adp_dir):
    model, _ = toy
    _, manifest = load_adp(adp_dir, model.pipe)
    m = manifest["metrics"]
    acc, majority = m["val_accuracy_mean"]["tone"], m["majority_rate"]["tone"]
    print(f"ADP held-out tone accuracy {acc:.2f} (last head {m['val_accuracy_last']['tone']:.2f}) on "
          f"{m['val_images']} images; majority rate {majority:.2f}")
    assert m["val_images"] >= 20
    assert acc >= majority + ADP_MARGIN
    assert manifest["timesteps"] == [int(t) for t in manifest["timesteps"]] and len(manifest["timesteps"]) == STEPS


def test_ethical_intervention_appends_the_class_words(toy):
    model, bundle = toy
    spec = parse_method({"method": "ethical-intervention", "attribute": "tone", "suffix": "in {classes}",
                         "joiner": " "})
    method = build_method(spec, model, bundle.train_classifier.attributes, SAMPLING)
    assert method.info["suffix"] == "in light dark"
    noise = image_noise(0, PROMPT, range(2), model.latent_shape)
    expected = generate(model.pipe, [f"{PROMPT} in light dark"] * 2, noise, SAMPLING)
    assert torch.equal(method.generate([PROMPT] * 2, noise), expected)


@pytest.mark.parametrize(("spec", "match"), [
    ({"method": "fair-diffusion", "edit_texts": {"tone": ["light", "dusky"]}}, r"'dusky'.*not a word"),
    ({"method": "fair-diffusion", "edit_texts": {"tone": ["light", "dark", "red"]}}, "3 texts for the 2 classes"),
    ({"method": "fair-diffusion", "edit_texts": {"size": ["small", "large"]}}, "unknown attribute 'size'"),
    ({"method": "ethical-intervention", "attribute": "tone"}, r"'if' \(in 'if all individuals.*not a word"),
    ({"method": "distribution-guidance", "adp": "/nonexistent/adp"}, "train-adp"),
])
def test_bad_specs_fail_clearly(toy, spec, match):
    model, bundle = toy
    with pytest.raises((BaselineError, FileNotFoundError), match=match):
        build_method(parse_method(spec), model, bundle.train_classifier.attributes, SAMPLING, UNIFORM, "uniform")


def test_unknown_method_and_bad_fields_are_named():
    with pytest.raises(BaselineError, match="unknown method 'sega'; known: original, ours, fair-diffusion"):
        parse_method({"method": "sega"})
    with pytest.raises(BaselineError, match="edit_threshold"):
        parse_method({**FAIR_DIFFUSION, "edit_threshold": 1.5})


def test_mid_block_features_of_an_sd_shaped_unet():
    """The hook reads any UNet2DConditionModel: a tiny SD-shaped one, at its own size."""
    from fairness.baselines.distribution_guidance import (
        mid_block_shape,
        sample_recording,
    )
    from fairness.models.tiny import build_tiny_pipeline

    pipe = build_tiny_pipeline(seed=0)
    c = pipe.unet.config
    noise = image_noise(0, "a photo", range(2), (c.in_channels, c.sample_size, c.sample_size))
    images, h, timesteps = sample_recording(pipe, "a photo", noise, 3, 7.5)
    assert h.shape == (2, 3, int(np.prod(mid_block_shape(pipe)))) and len(timesteps) == 3
    assert torch.equal(images, generate(pipe, ["a photo"] * 2, noise, SamplingConfig(3, 7.5, "none")))


def test_adp_of_another_unet_is_refused(adp_dir):
    from fairness.models.tiny import build_tiny_pipeline

    with pytest.raises(BaselineError, match="another U-Net"):
        load_adp(adp_dir, build_tiny_pipeline(seed=0))


def test_train_adp_command(tmp_path, capsys):
    from fairness.cli import main

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(world.prompts("train")[::100][:4]) + "\n")
    out = tmp_path / "adp"
    args = ["baseline", "train-adp", "--prompts", str(prompts), "--images-per-prompt", "4", "--steps", "3",
            "--epochs", "2", "--device", "cpu", "--quiet", "--out", str(out)]
    assert main([*args, "--attributes", "tone"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert set(printed["val_accuracy_last"]) == {"tone"} and printed["images"] > 0
    assert (out / "adp.json").is_file() and (out / "adp.safetensors").is_file()
    assert main([*args, "--attributes", "size"]) == 2
    assert "unknown attribute(s) ['size']" in capsys.readouterr().err
