"""The sd15 path end to end on a tiny SD pipeline with the real backends: MTCNN with its shipped
weights, tiny open_clip and DINOv2 encoders built from configs, the zero-shot CLIP classifier
and a face bank built by ``fairness bank faces``. Nothing here reaches a hub."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data as skdata

from fairness.cli import main as cli_main
from fairness.config import load_config
from fairness.models.tiny import build_tiny_pipeline
from fairness.perception.bundle import load_bundle
from fairness.perception.presets import write_preset
from fairness.targets.distributions import TargetSpec
from fairness.training.objective import Objective

ROOT = Path(__file__).parent.parent
GENDER = ROOT / "pipelines" / "configs" / "sd15" / "gender.yaml"


def _astronaut() -> torch.Tensor:
    return torch.from_numpy(skdata.astronaut()).permute(2, 0, 1).float().div(255)


@pytest.fixture(scope="module")
def real_bundle(tmp_path_factory) -> Path:
    """The tiny real-backend bundle, with a face bank of the astronaut's face."""
    root = tmp_path_factory.mktemp("real")
    bundle = write_preset("tiny-real", root / "perception")
    faces = root / "faces"
    faces.mkdir()
    Image.fromarray(skdata.astronaut()).save(faces / "astronaut.png")
    Image.fromarray(np.asarray(skdata.astronaut())[:, ::-1].copy()).save(faces / "mirrored.png")
    assert cli_main(["bank", "faces", "--images", str(faces), "--out", str(bundle / "face_bank.safetensors"),
                     "--perception", str(bundle)]) == 0
    return bundle


def test_objective_on_a_real_face_moves_pixels(real_bundle):
    """With a face found, every loss term (alignment, semantics, face realism) is live and the
    gradient reaches the pixels."""
    bundle = load_bundle(real_bundle)
    assert bundle.face_bank is not None and bundle.face_bank.shape[0] == 2
    cfg = load_config(GENDER)
    groups = TargetSpec.from_dict(cfg.target).compile(bundle.attributes)
    objective = Objective(bundle, groups, cfg.loss.model_copy(update={"confidence_threshold": 0.0}))
    images = torch.stack([_astronaut(), _astronaut().flip(-1)])
    originals = objective.describe_originals(images)
    assert originals.found.all()
    x = images.clone().requires_grad_(True)
    out = objective(x, originals, seed=0)
    out.total.backward()
    assert torch.isfinite(out.total) and out.logs["faces"] == 1.0 and "loss/face" in out.logs
    assert x.grad is not None and x.grad.abs().sum() > 0


@pytest.mark.timeout(600)
def test_two_iteration_gender_debias_on_a_tiny_sd_with_real_backends(real_bundle, tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    model = tmp_path / "sd"
    build_tiny_pipeline(seed=0, image_size=64).save_pretrained(model)
    prompts = "pipelines/configs/sd15/prompts"
    cfg = load_config(GENDER, {
        "model.path": str(model), "model.dtype": "float32", "perception": str(real_bundle),
        "prompts.train": [{"name": "occupations", "file": f"{prompts}/occupations_train.txt", "limit": 2}],
        "prompts.val": [{"name": "val", "file": f"{prompts}/occupations_val.txt", "limit": 1}],
        "prompts.test": [{"name": "test", "file": f"{prompts}/occupations_test.txt", "limit": 1}],
        "dft.steps": 3, "dft.eval_steps": 3, "adapter.rank": 4,
        "train.iterations": 2, "train.images_per_prompt": 2, "train.checkpoint_every": 2,
        "train.val_images_per_prompt": 2, "audit_images_per_prompt": 2,
    })
    from fairness.job import run_job

    result = run_job(cfg, tmp_path / "run", progress=False, report=False)
    assert result.train.steps == 2
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert len(log) == 2 and all(np.isfinite(r["loss/total"]) for r in log)
    # The exported adapter is a plain diffusers LoRA folder a stock pipeline loads.
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(model)
    pipe.load_lora_weights(str(result.train.adapter_dir))
    assert pipe("a photo of the face of a doctor, a person", num_inference_steps=2, output_type="np").images.shape[-1] == 3
