"""The toy-world build (smoke run) and the SD model shipped in the repository."""

from __future__ import annotations

import copy
import dataclasses
import json

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline
from scipy.stats import binom

from fairness.cli import main
from fairness.perception.bundle import load_bundle
from fairness.toyworld import default_model_dir, default_perception_dir, world
from fairness.toyworld.build import (build_toyworld, concept_prompts, generate, perceive, render_reference,
                                     round_trip, score_concept)
from fairness.toyworld.diffusion import DEFAULTS_FILE

PER_SHAPE = 12


def test_quick_build_writes_a_loadable_pipeline_and_a_report(tmp_path, capsys):
    report = build_toyworld(tmp_path, quick=True, device="cpu", progress=False)
    pipe = StableDiffusionPipeline.from_pretrained(str(tmp_path / "sd"))
    pipe.set_progress_bar_config(disable=True)
    images = pipe("a photo of a doctor", num_inference_steps=2, guidance_scale=2.0, output_type="pt").images
    assert images.shape == (1, 3, world.IMAGE_SIZE, world.IMAGE_SIZE)
    on_disk = json.loads((tmp_path / "fidelity.json").read_text())
    assert on_disk["summary"].keys() == report["summary"].keys() >= {"train", "val", "test", "scenery"}
    assert set(on_disk["summary"]["train"]) == {"concepts", "generated", "reconstructed", "rendered", "law"}
    for source in ("generated", "reconstructed", "rendered"):  # NaN where the smoke build's detector found no object
        agreement = on_disk["summary"]["train"][source]["classifier_agreement"]
        assert set(agreement) == set(world.ATTRIBUTES) and all(v != v or 0 <= v <= 1 for v in agreement.values())
    assert (tmp_path / "perception" / "bundle.json").exists()
    defaults = json.loads((tmp_path / "sd" / DEFAULTS_FILE).read_text())
    assert set(defaults) == {"num_inference_steps", "guidance_scale", "image_size"}

    # Measuring the built world again keeps the build's training figures and adds its own timing.
    assert main(["toyworld", "fidelity", "--assets", str(tmp_path), "--out", str(tmp_path / "fidelity.json"),
                 "--images-per-concept", "1", "--quiet"]) == 0
    again = json.loads((tmp_path / "fidelity.json").read_text())
    assert again["training"] == on_disk["training"] and again["sampling"]["images_per_concept"] == 1
    assert len(again["concepts"]) == len(world.concepts()) and again["measured"]["seconds"] > 0
    assert main(["toyworld", "fidelity", "--assets", str(tmp_path / "nowhere"), "--out", str(tmp_path / "x.json")]) == 2
    assert "no toy-world model" in capsys.readouterr().err


def test_build_takes_recipe_overrides_and_refuses_bad_ones_before_training(tmp_path, capsys):
    (tmp_path / "perception").symlink_to(default_perception_dir())
    threads = torch.get_num_threads()
    try:
        assert main(["toyworld", "build", "--out", str(tmp_path), "--quick", "--skip-perception", "--device", "cpu",
                     "--threads", "1", "--recipe", '{"vae_channels": [16, 32, 32], "latent_channels": 8}']) == 0
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(threads)
    pipe = StableDiffusionPipeline.from_pretrained(str(tmp_path / "sd"))
    assert (pipe.unet.config.sample_size, pipe.unet.config.in_channels) == (8, 8)  # 32x32 -> 8x8x8
    assert json.loads((tmp_path / "sd" / "training.json").read_text())["recipe"]["vae_channels"] == [16, 32, 32]
    for bad, message in (('{"unet_stepz": 3}', "unknown DiffusionRecipe fields ['unet_stepz']"),
                         ("[3]", "must be a JSON object"), ("{", "--recipe is not JSON")):
        assert main(["toyworld", "build", "--out", str(tmp_path / "bad"), "--quick", "--recipe", bad]) == 2
        assert message in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()


def test_classifier_agreement_counts_the_objects_both_classifiers_read_alike():
    concept = next(c for c in world.concepts() if c.has_objects)
    classes = {"shape": world.SHAPES, **world.ATTRIBUTES}
    found = np.array([True, True, True, True, False])
    seen = {a: np.zeros(5, dtype=int) for a in classes} | {"found": found}
    seen_train = {a: np.zeros(5, dtype=int) for a in classes} | {"found": found}
    seen_train["pattern"] = np.array([0, 1, 1, 0, 1])  # differs on two of the four objects found
    seen_train["tone"] = np.array([0, 0, 0, 0, 1])  # differs only where nothing was found
    agreement = score_concept(concept, seen, classes, seen_train)["agreement"]
    assert agreement == {"tone": 1.0, "color": 1.0, "pattern": 0.5}


@pytest.fixture(scope="module")
def shipped() -> StableDiffusionPipeline:
    pipe = StableDiffusionPipeline.from_pretrained(str(default_model_dir()))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_shipped_tokenizer_has_one_token_per_world_word(shipped):
    tok = shipped.tokenizer
    assert len(tok) > 100
    for word in world.caption_vocabulary():
        assert len(tok(word, add_special_tokens=False).input_ids) == 1, word
    longest = max(world.prompts("train", "all", "all"), key=lambda p: len(tok(p).input_ids))
    assert len(tok(longest).input_ids) <= tok.model_max_length


def test_round_trip_passes_images_through_the_vae(shipped):
    """The reconstructed set is the VAE's encode-decode of the renders: close to them (the
    shipped VAE's object-weighted MSE is ~0.008 in [-1, 1]) but not the same images, and a
    VAE with its decoder zeroed gives flat grey, so the decoder is really in the path."""
    items = [(p, 0) for p in world.prompts("train", "seen", "seen")[:8]]
    rendered = render_reference(items, seed=0)
    again = round_trip(shipped.vae, rendered, batch=3)
    assert again.shape == rendered.shape and 0 <= again.min() and again.max() <= 1
    assert 0 < ((again - rendered) ** 2).mean() < 0.01
    vae = copy.deepcopy(shipped.vae)
    torch.nn.init.zeros_(vae.decoder.conv_out.weight)
    torch.nn.init.zeros_(vae.decoder.conv_out.bias)
    assert torch.allclose(round_trip(vae, rendered), torch.full_like(rendered, 0.5))


def test_perceive_reads_every_classifier_off_one_detector_pass():
    """Both classifiers in one call read what each reads alone, whatever the batch; the
    training classifier's readings are its own (a copy forced to one colour says only that
    colour where an object is found, -1 elsewhere) while the evaluation ones are untouched."""
    bundle = load_bundle(default_perception_dir())
    forced = copy.deepcopy(bundle.train_classifier)
    torch.nn.init.zeros_(forced.heads["color"].weight)
    with torch.no_grad():
        forced.heads["color"].bias.copy_(torch.tensor([0.0, 0.0, 0.0, 1.0]))
    bundle = dataclasses.replace(bundle, train_classifier=forced)
    items = [(p, 0) for p in world.prompts("train", "seen", "seen")[:8]]
    images = render_reference(items, seed=0)
    both = perceive(bundle, images, batch=3, classifiers=("eval", "train"))
    alone = perceive(bundle, images)["eval"]
    assert both["eval"].keys() == alone.keys() and {"found", *world.ATTRIBUTES} <= alone.keys()
    for head, values in alone.items():
        np.testing.assert_array_equal(both["eval"][head], values)
    found = both["train"]["found"]
    np.testing.assert_array_equal(found, alone["found"])
    assert found.any()
    np.testing.assert_array_equal(both["train"]["color"], np.where(found, 3, -1))
    assert (alone["color"][found] != 3).any()


def test_shipped_model_draws_the_prompted_shape(shipped):
    """A few dozen images of train concepts covering every shape, at the shipped sampling
    defaults: the evaluation classifier must see the prompt's shape on most of them (the
    fidelity report: 97% of train concepts' objects; the first shipped model drew 24%), far
    beyond what chance (1/6) can explain (exact binomial test)."""
    defaults = json.loads((default_model_dir() / DEFAULTS_FILE).read_text())
    firsts = {}
    for c in world.concepts_by_split("train"):
        if c.has_objects:
            firsts.setdefault(c.shape, c)
    concepts = list(firsts.values())
    assert {c.shape for c in concepts} == set(world.SHAPES)
    items = [it for c in concepts for it in concept_prompts(c, PER_SHAPE)]
    images = generate(shipped, items, seed=0, steps=defaults["num_inference_steps"],
                      guidance=defaults["guidance_scale"], progress=False)
    assert images.shape == (len(items), 3, defaults["image_size"], defaults["image_size"])
    assert torch.isfinite(images).all() and images.min() >= 0 and images.max() <= 1
    seen = perceive(load_bundle(default_perception_dir()), images)["eval"]
    shapes = world.SHAPES
    expected = np.repeat([shapes.index(c.shape) for c in concepts], PER_SHAPE)
    found = seen["found"]
    assert found.mean() >= 0.8
    hits = int(np.sum(seen["shape"][found] == expected[found]))
    assert hits >= 0.85 * found.sum(), (hits, int(found.sum()))
    assert binom.sf(hits - 1, int(found.sum()), 1 / len(shapes)) < 1e-6, (hits, int(found.sum()))


def test_shipped_model_lets_the_noise_decide_the_tone(shipped):
    """As in Stable Diffusion, a prompt's protected attribute depends on the initial noise: 24
    images each of 4 held-out concepts, at the shipped sampling defaults, show both tones for
    at least 3 of the 4 (the first world's model drew every prompt in one tone), while the
    prompts stay biased (the mean tone share of the majority is above one half by a margin no
    fair coin gives at this sample size, binomial test)."""
    defaults = json.loads((default_model_dir() / DEFAULTS_FILE).read_text())
    concepts = [c for c in world.concepts_by_split("test") if c.has_objects][:4]
    items = [it for c in concepts for it in concept_prompts(c, 24)]
    images = generate(shipped, items, seed=0, steps=defaults["num_inference_steps"],
                      guidance=defaults["guidance_scale"], progress=False)
    seen = perceive(load_bundle(default_perception_dir()), images)["eval"]
    tone, found = seen["tone"].reshape(4, 24), seen["found"].reshape(4, 24)
    majority, mixed = 0, 0
    for t, f in zip(tone, found):
        counts = np.bincount(t[f], minlength=2)
        mixed += int(counts.min() >= 2)
        majority += int(counts.max())
    assert mixed >= 3, tone
    total = int(found.sum())
    assert binom.sf(majority - 1, total, 0.5) < 0.01, (majority, total)


def test_build_can_start_from_a_saved_model(tmp_path):
    """``--init-from`` keeps the saved model's VAE (and latent scale) as it is and trains its
    text encoder and U-Net further; a folder without a model is refused by name."""
    from fairness.toyworld.diffusion import DiffusionRecipe, train_diffusion

    recipe = DiffusionRecipe.quick()
    first = train_diffusion(tmp_path / "a", recipe=recipe, progress=False).pipe
    again = train_diffusion(tmp_path / "b", recipe=recipe, progress=False, init_from=tmp_path / "a").pipe
    for (name, p), q in zip(first.vae.state_dict().items(), again.vae.state_dict().values()):
        assert torch.equal(p, q), name
    assert again.vae.config.scaling_factor == first.vae.config.scaling_factor
    moved = [not torch.equal(p, q) for p, q in zip(first.unet.state_dict().values(), again.unet.state_dict().values())]
    assert any(moved)
    assert json.loads((tmp_path / "b" / "training.json").read_text())["stats"]["init_from"] == str(tmp_path / "a")
    with pytest.raises(FileNotFoundError, match="saved toy pipeline"):
        train_diffusion(tmp_path / "c", recipe=recipe, progress=False, init_from=tmp_path / "nothing")
