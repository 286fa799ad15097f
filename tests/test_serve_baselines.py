"""Peers served as model names on the toy world: the service gives the method's own images for
the request's seed, lists them, refuses bad specs at start-up; and one request over Ray Serve."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
import requests
import torch
from PIL import Image

from fairness.baselines.methods import build_method, parse_method
from fairness.dft.engine import SamplingConfig
from fairness.generation import load_model
from fairness.models.loading import load_perception
from fairness.seeding import image_noise
from pipelines.image_service import ImageService, ServiceConfig
from pipelines.openai_images import ImageGenerationRequest

pytestmark = [pytest.mark.timeout(300), pytest.mark.usefixtures("one_torch_thread")]

PROMPT = "a photo of an engineer"
STEPS = 4
LAW = {"marginals": {"tone": "uniform"}}
FAIR = {"method": "fair-diffusion", "law": LAW, "edit_threshold": 0.5,
        "edit_texts": {"tone": ["a photo of a person in light", "a photo of a person in dark"]}}
SUFFIX = {"method": "ethical-intervention", "attribute": "tone", "suffix": "in {classes}", "joiner": " "}


def _config(**over) -> ServiceConfig:
    data = {"model": "toyworld", "device": "cpu", "steps": STEPS, "perception": "toyworld",
            "baselines": {"fair-diffusion": FAIR, "ethical": SUFFIX}, **over}
    return ServiceConfig.model_validate(data)


@pytest.fixture(scope="module")
def service() -> ImageService:
    return ImageService(_config())


def _served(service: ImageService, model: str, n: int = 3, seed: int = 9) -> np.ndarray:
    job = service.prepare(ImageGenerationRequest(prompt=PROMPT, model=model, n=n, seed=seed))
    (pngs,) = service.run([job])
    return np.stack([np.asarray(Image.open(io.BytesIO(base64.b64decode(p)))) for p in pngs])


def test_served_baseline_is_the_method_on_the_request_noise(service):
    model = load_model("toyworld", device="cpu")
    attributes = load_perception("toyworld").train_classifier.attributes
    spec = parse_method({k: v for k, v in FAIR.items() if k != "law"})
    sampling = SamplingConfig(num_steps=STEPS, guidance_scale=service.guidance, mode="none")
    method = build_method(spec, model, attributes, sampling, LAW, "uniform")
    with torch.no_grad():
        expected = method.generate([PROMPT] * 3, image_noise(9, PROMPT, range(3), model.latent_shape))
    expected = (expected.permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)
    served = _served(service, "fair-diffusion")
    assert np.abs(served.astype(int) - expected.astype(int)).max() <= 1
    assert (served != _served(service, "base")).mean() > 0.05
    assert np.array_equal(_served(service, "ethical", n=1), _served(service, "ethical", n=1))
    assert {n: m["kind"] for n, m in service.models().items()} == {
        "base": "base", "fair-diffusion": "fair-diffusion", "ethical": "ethical-intervention"}


@pytest.mark.parametrize(("over", "match"), [
    ({"baselines": {"fd": {k: v for k, v in FAIR.items() if k != "law"}}}, "needs a target 'law'"),
    ({"baselines": {"ours": {"method": "ours", "adapters": {}}}}, "--adapter NAME=DIR"),
    ({"baselines": {"x": {"method": "sega"}}}, "unknown method 'sega'"),
    ({"baselines": {"base": FAIR}}, "not be 'base'"),
    ({"perception": None}, "needs a perception bundle"),
])
def test_bad_baseline_configs_are_refused(over, match):
    with pytest.raises(ValueError, match=match):
        _config(**over)


def test_a_bad_edit_text_stops_the_service_at_start():
    bad = {**FAIR, "edit_texts": {"tone": ["light", "dusky"]}}
    with pytest.raises(ValueError, match="'dusky'.*not a word"):
        ImageService(_config(baselines={"fd": bad}))


def test_cli_baseline_flag(tmp_path):
    import argparse

    from pipelines.serve import add_serve_arguments, config_from_args

    spec = tmp_path / "fd.yaml"
    spec.write_text("method: ethical-intervention\nattribute: tone\nsuffix: 'in {classes}'\njoiner: ' '\n")
    parser = argparse.ArgumentParser()
    add_serve_arguments(parser)
    args = parser.parse_args(["--perception", "toyworld", "--baseline", f"ethical={spec}",
                              "--baseline", 'fd={"method": "fair-diffusion", "law": {"marginals": {"tone": "uniform"}}, '
                                            '"edit_texts": {"tone": ["light", "dark"]}}'])
    config = config_from_args(args)
    assert config.baselines["ethical"]["attribute"] == "tone" and config.baselines["fd"]["method"] == "fair-diffusion"
    with pytest.raises(ValueError, match="NAME=SPEC"):
        config_from_args(parser.parse_args(["--baseline", "fd"]))


@pytest.mark.ray
def test_fair_diffusion_over_ray_serve(ray_session, service):
    from ray import serve

    from pipelines.bench_serve import free_port
    from pipelines.serve import ServeConfig, run_server

    config = ServeConfig.model_validate({**_config().model_dump(), "max_n": 3})
    url = run_server(config, port=free_port(), blocking=False)
    try:
        resp = requests.post(f"{url}/v1/images/generations", timeout=120,
                             json={"prompt": PROMPT, "model": "fair-diffusion", "n": 3, "seed": 9})
        assert resp.status_code == 200, resp.text
        served = np.stack([np.asarray(Image.open(io.BytesIO(base64.b64decode(d["b64_json"]))))
                           for d in resp.json()["data"]])
        assert np.array_equal(served, _served(service, "fair-diffusion"))
        ids = {m["id"] for m in requests.get(f"{url}/v1/models", timeout=30).json()["data"]}
        assert ids == {"base", "fair-diffusion", "ethical"}
    finally:
        serve.shutdown()
