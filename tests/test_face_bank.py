"""`fairness bank faces`: a bank of real-face embeddings from a folder of photos."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import fairness.cli as cli
from fairness.cli import main
from fairness.perception.bundle import load_bundle
from fairness.perception.tiny import TinyDetector, build_tiny_bundle

skimage = pytest.importorskip("skimage")

ATTRS = {"gender": ["male", "female"]}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    """The astronaut (one face) and a blank grey image (none), 512 x 512 PNGs."""
    root = tmp_path_factory.mktemp("photos")
    Image.fromarray(skimage.data.astronaut()).save(root / "astronaut.png")
    Image.fromarray(np.full((512, 512, 3), 128, np.uint8)).save(root / "blank.png")
    return root


def _objectness(bundle_dir: Path, path: Path) -> float:
    det = TinyDetector(threshold=0.0)
    det.load_state_dict(load_file(str(bundle_dir / "detector.safetensors")))
    x = torch.from_numpy(np.array(Image.open(path).convert("RGB"))).permute(2, 0, 1).float()[None] / 255
    with torch.no_grad():
        return float(det.net(x)[0, 0])


def test_bank_faces_with_the_tiny_detector(tmp_path, photos, capsys):
    bundle = build_tiny_bundle(tmp_path / "bundle", ATTRS)
    # Set the random detector's threshold between its scores for the two photos, so that
    # exactly one of them "has a face".
    scores = {p.name: _objectness(bundle, p) for p in sorted(photos.iterdir())}
    assert scores["astronaut.png"] != scores["blank.png"]
    manifest = json.loads((bundle / "bundle.json").read_text())
    manifest["components"]["detector"]["config"]["threshold"] = sum(scores.values()) / 2
    (bundle / "bundle.json").write_text(json.dumps(manifest))

    out = bundle / "real_faces.safetensors"
    assert main(["bank", "faces", "--images", str(photos), "--out", str(out), "--perception", str(bundle),
                 "--batch-size", "2", "--device", "cpu", "--quiet"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["images"] == 2 and report["faces"] == 1 and report["without_face_count"] == 1
    bank = load_file(str(out))["bank"]
    assert bank.shape == (1, 16) and torch.allclose(bank.norm(dim=-1), torch.ones(1), atol=1e-5)
    # the format load_bundle reads for face_bank
    manifest["face_bank"] = out.name
    (bundle / "bundle.json").write_text(json.dumps(manifest))
    assert load_bundle(bundle).face_bank.shape == (1, 16)


def test_bank_faces_errors(tmp_path, photos, capsys):
    bundle = build_tiny_bundle(tmp_path / "bundle", ATTRS, detector_threshold=1e9)  # finds nothing
    (tmp_path / "empty").mkdir()
    args = ["--out", str(tmp_path / "bank.safetensors"), "--perception", str(bundle), "--quiet"]
    assert main(["bank", "faces", "--images", str(tmp_path / "empty"), *args]) == 2
    assert "no images" in capsys.readouterr().err
    assert main(["bank", "faces", "--images", str(photos), *args]) == 2
    assert "no face found in any of the 2 images" in capsys.readouterr().err
    assert main(["bank", "faces", "--images", str(tmp_path / "missing"), *args]) == 2
    assert "no image folder" in capsys.readouterr().err
    assert not (tmp_path / "bank.safetensors").exists()


def test_other_bank_commands_still_go_to_ray(monkeypatch):
    seen = []
    monkeypatch.setattr(cli, "_ray_command", lambda module, name: lambda ns: seen.append((module, ns.args)) or 0)
    assert main(["bank", "--config", "x.yaml", "--out", "o"]) == 0
    assert seen == [("pipelines.bank", ["--config", "x.yaml", "--out", "o"])]


@pytest.mark.skipif(importlib.util.find_spec("facenet_pytorch") is None, reason="facenet-pytorch not installed")
def test_bank_faces_with_real_mtcnn(tmp_path, photos, capsys):
    presets = pytest.importorskip("fairness.perception.presets")
    bundle = presets.write_preset("tiny-real", tmp_path / "real")
    manifest = json.loads((bundle / "bundle.json").read_text())
    assert manifest["components"]["detector"]["backend"] == "real.mtcnn"
    out = tmp_path / "faces.safetensors"
    assert main(["bank", "faces", "--images", str(photos), "--out", str(out), "--perception", str(bundle),
                 "--device", "cpu", "--quiet"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["faces"] == 1 and report["without_face"] == [str(photos / "blank.png")]
    loaded = load_bundle(bundle)
    bank = load_file(str(out))["bank"]
    assert bank.shape == (1, loaded.face_bank.shape[1])  # the embedder's space, as the loss compares


def test_help_of_the_new_commands(capsys):
    for argv, usage in ((["bank", "faces", "--help"], "usage: fairness bank faces"),
                        (["classifier", "train", "--help"], "usage: fairness classifier train")):
        with pytest.raises(SystemExit) as exc:
            main(argv)
        assert exc.value.code == 0 and usage in capsys.readouterr().out
