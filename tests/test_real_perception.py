"""The real perception backends (MTCNN, open_clip, DINOv2, FaceNet) and the presets that use them.

Only MTCNN has real weights here (they ship in facenet-pytorch); CLIP, DINO and FaceNet run as
tiny random networks built from configs, through the same loading code as the real ones.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from fairness.perception import bundle as bundle_mod
from fairness.perception.bundle import build_component, load_bundle
from fairness.perception.presets import RACE4, TINY_CLIP, TINY_DINO, TINY_DINO_SIZE, write_preset
from fairness.perception.real import (
    EVAL_CLIP_MODEL,
    EVAL_CLIP_PRETRAINED,
    EVAL_DINO,
    TRAIN_CLIP_MODEL,
    TRAIN_CLIP_PRETRAINED,
    TRAIN_DINO,
    MissingWeightsError,
)
from fairness.perception.real.mtcnn import _detections
from fairness.perception.real.preprocess import Preprocess
from fairness.perception.regions import detect_largest, largest_region, square_boxes, square_crop

ASTRONAUT_FACE = np.array([181, 62, 268, 172])  # MTCNN's box, measured (ENVIRONMENT-NOTES.md)
CLIP = {"model": None, "model_config": TINY_CLIP, "pretrained": None}


@pytest.fixture(scope="module")
def astronaut() -> torch.Tensor:
    skimage_data = pytest.importorskip("skimage.data")
    return torch.tensor(skimage_data.astronaut()).permute(2, 0, 1).float()[None] / 255


@pytest.fixture(scope="module")
def small_astronaut(astronaut) -> torch.Tensor:
    """Half size (256 px, the face ~45 px): detection is 4x cheaper where the exact box is not the point."""
    return torch.nn.functional.interpolate(astronaut, size=(256, 256), mode="bilinear", antialias=True)


# min_face_size 40 (default 20) only skips the finest pyramid scales: about 40% less CPU time here.
MTCNN_CONFIG = {"device": "cpu", "min_face_size": 40}


@pytest.fixture(scope="module")
def detector():
    return build_component({"backend": "real.mtcnn", "config": MTCNN_CONFIG})


def _grad_of(fn, x: torch.Tensor) -> torch.Tensor:
    """d <fn(x), w> / dx for a fixed random w (a plain sum can be constant: a LayerNorm-ed
    embedding, as DINO's CLS token is, sums to zero)."""
    x = x.clone().requires_grad_(True)
    y = fn(x)
    w = torch.randn(y.shape[1:], generator=torch.Generator().manual_seed(0))
    (y * w).sum().backward()
    return x.grad


def test_mtcnn_finds_the_astronaut_and_nothing_in_a_blank_image(detector, astronaut, small_astronaut):
    blank = torch.full_like(astronaut, 0.5)
    dets = detector.detect(torch.cat([astronaut, blank]))
    assert [tuple(d.shape) for d in dets] == [(1, 5), (0, 5)]
    box, score = dets[0][0, :4].numpy(), float(dets[0][0, 4])
    assert np.abs(box - ASTRONAUT_FACE).max() < 8 and score > 0.99
    regions = largest_region(dets)
    assert regions.found.tolist() == [True, False]
    crops = square_crop(torch.cat([astronaut, blank]), regions, 64)
    sq = square_boxes(regions, 512, 512)[0].numpy()
    assert crops.shape == (2, 3, 64, 64)
    assert sq[0] <= box[0] and sq[1] <= box[1] and sq[2] >= box[2] and sq[3] >= box[3]  # crop covers the face
    # chunked batches give the same boxes; a probability floor above 1 keeps nothing
    small = torch.cat([torch.full_like(small_astronaut, 0.5), small_astronaut])
    chunked = build_component({"backend": "real.mtcnn", "config": {**MTCNN_CONFIG, "batch_size": 1}})
    whole, parts = detector.detect(small), chunked.detect(small)
    assert [len(d) for d in whole] == [0, 1] and torch.allclose(parts[1], whole[1])
    assert np.abs(whole[1][0, :4].numpy() * 2 - ASTRONAUT_FACE).max() < 12
    assert _detections(whole[1][:, :4].numpy(), whole[1][:, 4].numpy(), 1.01, 256, 256, torch.device("cpu")).shape == (0, 5)
    with pytest.raises(ValueError, match="unknown config"):
        build_component({"backend": "real.mtcnn", "config": {"treshold": 0.5}})


def test_preprocess_resizes_crops_normalises_and_passes_gradients():
    pp = Preprocess(size=32, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    x = torch.rand(2, 3, 48, 80)
    out = pp(x)
    assert out.shape == (2, 3, 32, 32)
    assert torch.allclose(pp(torch.full((1, 3, 40, 40), 0.75)), torch.ones(1, 3, 32, 32), atol=1e-5)
    grad = _grad_of(pp, x)
    # shortest-side resize then centre crop: the left and right margins of the wide image are cut
    assert grad[..., 20:28, 30:50].abs().sum() > 0 and grad[..., :, :5].abs().sum() == 0
    assert pp(x, torch.bfloat16).dtype == torch.bfloat16


def test_tiny_open_clip_embeds_with_unit_norm_gradients_and_text():
    enc = build_component({"backend": "real.open_clip", "config": {**CLIP, "name": "clip", "seed": 3}})
    images = torch.rand(2, 3, 40, 40)
    emb = enc(images)
    assert emb.shape == (2, TINY_CLIP["embed_dim"]) and emb.dtype == torch.float32
    assert torch.allclose(emb.norm(dim=-1), torch.ones(2), atol=1e-5)
    assert _grad_of(enc, images).abs().sum() > 0
    text = enc.encode_text(["a photo of a man", "a photo of a woman"])
    assert text.shape == (2, TINY_CLIP["embed_dim"]) and torch.allclose(text.norm(dim=-1), torch.ones(2), atol=1e-5)
    assert not torch.allclose(text[0], text[1])
    # seeded random weights: another process (a Ray worker) builds the same network
    again = build_component({"backend": "real.open_clip", "config": {**CLIP, "seed": 3}})
    assert again.model is enc.model and torch.allclose(again(images), emb)
    other = build_component({"backend": "real.open_clip", "config": {**CLIP, "seed": 4}})
    assert not torch.allclose(other(images), emb)
    # a bundle moved to bf16 still returns float32 embeddings, and the moved model is not shared again
    enc.to(torch.bfloat16)
    assert enc(images).dtype == torch.float32
    fresh = build_component({"backend": "real.open_clip", "config": {**CLIP, "seed": 3}})
    assert fresh.model is not enc.model and next(fresh.model.parameters()).dtype == torch.float32


def test_open_clip_loads_a_local_checkpoint_relative_to_the_bundle(tmp_path):
    from safetensors.torch import save_file

    from fairness.perception.real.openclip import build_open_clip

    net = build_open_clip(TINY_CLIP, seed=11)
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(tmp_path / "clip.safetensors"))
    spec = {"backend": "real.open_clip", "config": {**CLIP, "pretrained": "clip.safetensors"}}
    enc = build_component(spec, tmp_path)
    images = torch.rand(1, 3, 32, 32)
    net.eval()
    expected = torch.nn.functional.normalize(net.encode_image(enc.preprocess(images)), dim=-1)
    assert torch.allclose(enc(images), expected, atol=1e-5)


def test_tiny_dinov2_embeds_and_loads_from_a_local_folder(tmp_path):
    spec = {"backend": "real.dinov2", "config": {"model_config": TINY_DINO, "image_size": TINY_DINO_SIZE, "seed": 5}}
    enc = build_component(spec)
    images = torch.rand(2, 3, 64, 80)
    emb = enc(images)
    assert emb.shape == (2, TINY_DINO["hidden_size"]) and emb.dtype == torch.float32
    assert torch.allclose(emb.norm(dim=-1), torch.ones(2), atol=1e-5)
    assert _grad_of(enc, images).abs().sum() > 0
    enc.model.save_pretrained(str(tmp_path / "dino"))
    local = build_component({"backend": "real.dinov2", "config": {"source": "dino", "image_size": TINY_DINO_SIZE}},
                            tmp_path)
    assert torch.allclose(local(images), emb, atol=1e-5)
    local.to(torch.bfloat16)
    assert local(images).dtype == torch.float32


def test_zero_shot_classifier_keeps_class_order_and_is_differentiable():
    attrs = {"gender": {"female": ["a photo of a woman", "a photo of a female person"], "male": "a photo of a man"},
             "age": {"young": ["a photo of a young person"], "old": ["a photo of an old person"]}}
    clf = build_component({"backend": "real.zero_shot", "config": {"attributes": attrs, "clip": CLIP}})
    assert clf.attributes == {"gender": ["female", "male"], "age": ["young", "old"]}
    assert clf.input_size == TINY_CLIP["vision_cfg"]["image_size"]
    crops = torch.rand(3, 3, clf.input_size, clf.input_size)
    logits = clf(crops)
    assert {k: tuple(v.shape) for k, v in logits.items()} == {"gender": (3, 2), "age": (3, 2)}
    assert _grad_of(lambda x: clf(x)["gender"][:, 0], crops).abs().sum() > 0
    # logits = scale * cos(image, mean of the class's normalised prompt embeddings, renormalised)
    enc = clf.encoder
    female = torch.nn.functional.normalize(enc.encode_text(attrs["gender"]["female"]).mean(0), dim=-1)
    male = enc.encode_text([attrs["gender"]["male"]])[0]
    expected = clf.logit_scale * enc(crops) @ torch.stack([female, male]).T
    assert torch.allclose(logits["gender"], expected, atol=1e-4)
    with pytest.raises(ValueError, match="at least two classes"):
        build_component({"backend": "real.zero_shot", "config": {"attributes": {"gender": {"male": "a man"}}, "clip": CLIP}})


def test_facenet_embedder_random_init_and_user_weights(tmp_path):
    rand = build_component({"backend": "real.facenet_embedder", "config": {"pretrained": None, "random_init": True}})
    crops = torch.rand(1, 3, 100, 100)
    emb = rand(crops)
    assert rand.input_size == 160 and emb.shape == (1, 512)
    assert torch.allclose(emb.norm(dim=-1), torch.ones(1), atol=1e-5)
    # a user's file (the released ones also carry the identity-classification layer)
    state = {**rand.network.state_dict(), "logits.weight": torch.zeros(8631, 512), "logits.bias": torch.zeros(8631)}
    torch.save(state, tmp_path / "facenet.pt")
    loaded = build_component({"backend": "real.facenet_embedder", "config": {"weights_file": "facenet.pt"}}, tmp_path)
    mine, theirs = loaded.network.state_dict(), rand.network.state_dict()
    assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)
    with pytest.raises(MissingWeightsError, match="20180402-114759-vggface2.pt"):
        build_component({"backend": "real.facenet_embedder", "config": {}})


def test_missing_weights_say_what_to_download_and_where(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # "weights/dino" could be a Hub id too: never try the network
    # a local folder that does not exist
    with pytest.raises(FileNotFoundError) as err:
        build_component({"backend": "real.dinov2", "config": {"source": "weights/dino"}}, tmp_path)
    msg = str(err.value)
    assert str(tmp_path / "weights" / "dino") in msg and "config.source" in msg and "config.json" in msg
    with pytest.raises(MissingWeightsError, match="clip_missing.safetensors"):
        build_component({"backend": "real.open_clip", "config": {**CLIP, "pretrained": "clip_missing.safetensors"}}, tmp_path)
    # a Hub id in offline mode: never downloads, names the repository, the files and the field
    cache = str(tmp_path / "empty-cache")
    with pytest.raises(MissingWeightsError) as err:
        build_component({"backend": "real.dinov2", "config": {"source": TRAIN_DINO, "cache_dir": cache}})
    msg = str(err.value)
    assert f"hf download {TRAIN_DINO} config.json model.safetensors" in msg and "config.source" in msg
    assert "offline" in msg
    # an open_clip tag: the Hub repository behind the tag and the checkpoint file name
    clip = {"model": TRAIN_CLIP_MODEL, "pretrained": TRAIN_CLIP_PRETRAINED, "cache_dir": cache}
    with pytest.raises(MissingWeightsError) as err:
        build_component({"backend": "real.zero_shot", "config": {"attributes": {"g": {"a": "a", "b": "b"}}, "clip": clip}})
    msg = str(err.value)
    assert "laion/CLIP-ViT-H-14-laion2B-s32B-b79K" in msg and "open_clip_model.safetensors" in msg
    assert "config.clip.pretrained" in msg


def test_tiny_real_preset_is_a_complete_loadable_bundle(tmp_path, small_astronaut):
    astronaut = small_astronaut
    out = write_preset("tiny-real", tmp_path / "bundle")
    bundle = load_bundle(out)
    regions = detect_largest(bundle.detector, astronaut)
    assert bool(regions.found[0]) and np.abs(regions.boxes[0].numpy() * 2 - ASTRONAUT_FACE).max() < 12
    for clf in (bundle.train_classifier, bundle.eval_classifier):
        assert clf.attributes == {"gender": ["male", "female"], "race": list(RACE4), "age": ["young", "old"]}
        crops = square_crop(astronaut, regions, clf.input_size)
        probs = clf.probabilities(crops)
        assert all(torch.allclose(p.sum(-1), torch.ones(1)) for p in probs.values())
    assert bundle.train_classifier.encoder.model is not bundle.eval_classifier.encoder.model
    # one CLIP behind the training classifier, the L_img encoder and the face embedder
    assert bundle.train_classifier.encoder.model is bundle.encoders["clip"].model is bundle.face_embedder.encoder.model
    for name in bundle.semantic_encoders + list(bundle.eval_encoders.values()):
        emb = bundle.encoders[name](astronaut)
        assert emb.ndim == 2 and torch.allclose(emb.norm(dim=-1), torch.ones(1), atol=1e-5)
    text = bundle.text_image_encoder.encode_text(["a photo of the face of a doctor"])
    assert text.shape[1] == bundle.encoders["clip_eval"](astronaut).shape[1]
    face = bundle.face_embedder(square_crop(astronaut, regions, bundle.face_embedder.input_size))
    assert face.shape[1] == bundle.face_bank.shape[1]
    with pytest.raises(FileExistsError):
        write_preset("tiny-real", out)


def test_sd15_paper_preset_names_registered_backends_and_asks_for_weights(tmp_path, monkeypatch):
    out = write_preset("sd15-paper", tmp_path / "sd15", cache_dir=str(tmp_path / "empty-cache"))
    spec = json.loads((out / "bundle.json").read_text())
    comps = spec["components"]
    flat = [comps[k] for k in ("detector", "train_classifier", "eval_classifier", "text_image_encoder", "face_embedder")]
    flat += list(comps["encoders"].values())
    import fairness.perception.real  # noqa: F401  (registers every real.* backend)

    assert {c["backend"] for c in flat} <= set(bundle_mod._BACKENDS)
    assert comps["train_classifier"]["config"]["clip"]["model"] == TRAIN_CLIP_MODEL
    assert comps["train_classifier"]["config"]["clip"]["pretrained"] == TRAIN_CLIP_PRETRAINED
    assert comps["eval_classifier"]["config"]["clip"]["model"] == EVAL_CLIP_MODEL
    assert comps["text_image_encoder"]["config"]["pretrained"] == EVAL_CLIP_PRETRAINED
    assert comps["encoders"]["dino"]["config"]["source"] == TRAIN_DINO
    assert comps["encoders"]["dino_eval"]["config"]["source"] == EVAL_DINO
    assert list(comps["train_classifier"]["config"]["attributes"]["race"]) == list(RACE4)
    assert spec["semantic_encoders"] == ["clip", "dino"]
    assert spec["eval_encoders"] == {"clip_i": "clip_eval", "dino": "dino_eval"}
    assert spec["face_bank"] == "face_bank.safetensors" and (out / "README_BUNDLE.md").exists()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(MissingWeightsError, match="laion/CLIP-ViT-H-14-laion2B-s32B-b79K"):
        load_bundle(out)
    for comp in flat[1:]:  # every component but MTCNN needs a download, and says so
        with pytest.raises(MissingWeightsError, match="hf download"):
            build_component(comp, out)
    with pytest.raises(ValueError, match="sd15-paper, tiny-real"):
        write_preset("sd21", tmp_path / "x")
    with pytest.raises(TypeError, match="cache_dir"):
        write_preset("sd15-paper", tmp_path / "y", cachedir="/tmp")
