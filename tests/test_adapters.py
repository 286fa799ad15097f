"""Exported adapters load into a fresh stock diffusers pipeline and reproduce our images."""

from __future__ import annotations

import json

import pytest
import torch

from fairness.adapters import AdapterSpec, attach_adapter, export_adapter, load_adapter_into
from fairness.dft.engine import SamplingConfig, generate
from fairness.models.tiny import build_tiny_pipeline

PROMPT = "a photo of the doctor"


def _perturb(adapter):
    with torch.no_grad():
        if adapter.spec.kind == "soft_tokens":
            emb = adapter.pipe.text_encoder.get_input_embeddings().weight
            emb[adapter._token_ids] += torch.randn_like(emb[adapter._token_ids])
        else:
            for p in adapter.parameters():
                p.add_(torch.randn_like(p) * 0.3)


@pytest.mark.parametrize("kind", ["text_lora", "unet_lora", "both_lora", "soft_tokens"])
def test_export_loads_in_stock_pipeline_and_matches(tmp_path, kind):
    pipe = build_tiny_pipeline(seed=0)
    adapter = attach_adapter(pipe, AdapterSpec(kind=kind, rank=4))
    _perturb(adapter)
    export_adapter(adapter, tmp_path / "adapter")
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    cfg = SamplingConfig(num_steps=5, guidance_scale=7.5, mode="none")
    with torch.no_grad():
        ours = generate(pipe, [adapter.prompt_prefix + PROMPT] * 2, noise, cfg)
    fresh = build_tiny_pipeline(seed=0)
    prefix = load_adapter_into(fresh, tmp_path / "adapter")
    # The stock call path, not ours: diffusers' own __call__ with the same latents.
    stock = fresh(prefix + PROMPT, num_images_per_prompt=2, latents=noise, num_inference_steps=5,
                  guidance_scale=7.5, output_type="pt").images
    torch.testing.assert_close(stock, ours, atol=1e-5, rtol=1e-4)
    base = build_tiny_pipeline(seed=0)(PROMPT, num_images_per_prompt=2, latents=noise, num_inference_steps=5,
                                       guidance_scale=7.5, output_type="pt").images
    assert (base - ours).abs().max() > 1e-3, "the adapter must change the images"
    manifest = json.loads((tmp_path / "adapter" / "adapter.json").read_text())
    assert manifest["kind"] == kind
    if kind == "soft_tokens":
        assert prefix == "<fair> "


def test_disabled_adapter_gives_frozen_model(tmp_path):
    pipe = build_tiny_pipeline(seed=0)
    noise = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    cfg = SamplingConfig(num_steps=4, guidance_scale=7.5, mode="none")
    with torch.no_grad():
        frozen = generate(pipe, [PROMPT], noise, cfg)
        adapter = attach_adapter(pipe, AdapterSpec(kind="both_lora", rank=4))
        _perturb(adapter)
        with adapter.disabled():
            off = generate(pipe, [PROMPT], noise, cfg)
        on = generate(pipe, [PROMPT], noise, cfg)
    torch.testing.assert_close(off, frozen)
    assert (on - frozen).abs().max() > 1e-3


def test_soft_tokens_train_only_new_rows():
    pipe = build_tiny_pipeline(seed=0)
    adapter = attach_adapter(pipe, AdapterSpec(kind="soft_tokens", num_tokens=3))
    emb = pipe.text_encoder.get_input_embeddings().weight
    before = emb.detach().clone()
    noise = torch.randn(1, 4, 8, 8)
    generate(pipe, [adapter.prompt_prefix + PROMPT], noise, SamplingConfig(num_steps=3, mode="adjusted")).mean().backward()
    changed = emb.grad.abs().sum(1) > 0
    assert set(torch.nonzero(changed).flatten().tolist()) <= set(adapter._token_ids.tolist())
    assert changed[adapter._token_ids].any()
    torch.testing.assert_close(emb.detach(), before)


def test_state_dict_round_trip():
    pipe = build_tiny_pipeline(seed=0)
    adapter = attach_adapter(pipe, AdapterSpec(kind="both_lora", rank=4))
    _perturb(adapter)
    state = adapter.state_dict()
    other = attach_adapter(build_tiny_pipeline(seed=0), AdapterSpec(kind="both_lora", rank=4))
    other.load_state_dict(state)
    for k, v in other.state_dict().items():
        torch.testing.assert_close(v, state[k])
