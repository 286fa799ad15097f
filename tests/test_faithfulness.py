"""Faithfulness to the paper and the official code: sampler, dynamic weights, EMA, originals-bank
fingerprint, OT methods and costs, and the memory settings (half-precision frozen weights, SDPA,
sliced VAE decode)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from diffusers import DPMSolverMultistepScheduler, PNDMScheduler
from diffusers.models.attention_processor import AttnProcessor2_0

from fairness.config import DFTConfig, LossConfig
from fairness.dft.engine import SamplingConfig, decode, generate
from fairness.losses.semantics import ImgWeights, gradient_weight_map
from fairness.models.loading import load_pipeline, resolve_model_path
from fairness.models.tiny import build_tiny_pipeline
from fairness.perception.base import Regions
from fairness.targets.assignment import (AttributeTargets, ENUMERATION_LIMIT, assign_targets, concatenated_cost,
                                         expected_assignment, num_count_vectors)
from fairness.targets.distributions import TargetSpec
from fairness.training.bank import (FINGERPRINT_FILE, BankMismatch, OriginalsBank, bank_fingerprint, info_to_rows,
                                    write_fingerprint)
from fairness.training.loop import EMA, Trainer
from fairness.training.objective import OriginalsInfo
from tests.helpers import tiny_config

KNOWN = {"gender": ["male", "female"], "race": ["w", "a", "b", "i"]}


# -- 1. sampler ------------------------------------------------------------------------------
def test_a_pndm_checkpoint_samples_with_dpm_solver_pp_one_unet_call_per_step(tmp_path):
    pipe = build_tiny_pipeline(seed=0)
    pipe.scheduler = PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                   skip_prk_steps=True, steps_offset=1, set_alpha_to_one=False)
    pipe.save_pretrained(tmp_path / "sd")
    loaded = load_pipeline(str(tmp_path / "sd"), device="cpu")
    sched = loaded.scheduler
    assert isinstance(sched, DPMSolverMultistepScheduler) and sched.config.algorithm_type == "dpmsolver++"
    assert sched.config.steps_offset == 1 and sched.config.prediction_type == "epsilon"
    torch.testing.assert_close(sched.betas, pipe.scheduler.betas)
    timesteps: list[int] = []
    loaded.unet.register_forward_pre_hook(lambda m, args: timesteps.append(int(args[1])))
    noise = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    generate(loaded, ["a photo of the doctor"], noise, SamplingConfig(num_steps=20, guidance_scale=7.5, mode="none"))
    assert len(timesteps) == 20 and len(set(timesteps)) == 20  # PNDM: 21 calls, t=901 twice


def test_the_toy_worlds_scheduler_is_left_exactly_as_shipped():
    pipe = load_pipeline("toyworld", device="cpu")
    shipped = json.loads((Path(resolve_model_path("toyworld")) / "scheduler" / "scheduler_config.json").read_text())
    public = lambda config: {k: v for k, v in dict(config).items() if not k.startswith("_")}  # noqa: E731
    assert public(pipe.scheduler.config) == public(shipped)
    assert {type(p) for m in (pipe.unet, pipe.vae) for p in m.attn_processors.values()} == {AttnProcessor2_0}
    assert pipe.text_encoder.config._attn_implementation == "sdpa"


# -- 2, 3. dynamic lambda_img ----------------------------------------------------------------
def _weight_map(targets, confidence, original_classes, original_found, threshold=0.8):
    n = len(targets)
    tgt = {"gender": AttributeTargets(np.array(targets), np.array(confidence), np.zeros((n, 2)))}
    # Every generated image shows a face in its upper-left 4x4 quarter of an 8x8 image.
    regions = Regions(boxes=torch.tensor([[0.0, 0.0, 4.0, 4.0]] * n), scores=torch.ones(n), found=torch.ones(n, dtype=torch.bool))
    return gradient_weight_map(tgt, {"gender": torch.tensor(original_classes)}, {"gender": ImgWeights()}, regions, 8, 8,
                               thresholds={"gender": threshold}, original_found=torch.tensor(original_found))


def test_an_original_without_a_face_never_agrees_with_a_target():
    w = ImgWeights()
    # Same class index either way; only the original's face decides.
    out = _weight_map([1, 1], [0.95, 0.95], [1, 1], [True, False])
    assert (out[0] == w.lambda1).all()
    assert out[1, 0, 0, 0] == pytest.approx(w.lambda3) and out[1, 0, 7, 7] == pytest.approx(w.lambda2)


def test_an_unconfident_target_never_agrees_but_a_missing_face_keeps_lambda1():
    w = ImgWeights()
    # image 0: confident, agrees -> lambda1; image 1: same class but confidence 0.6 < 0.8 ->
    # lambda2 / lambda3 (the official code marks it -1 first); image 2: the generated image has
    # no face (target -1): lambda1 as before (lost_region_weight handles a lost face).
    out = _weight_map([0, 0, -1], [0.9, 0.6, 0.0], [0, 0, 0], [True, True, True])
    assert (out[0] == w.lambda1).all() and (out[2] == w.lambda1).all()
    assert out[1, 0, 1, 1] == pytest.approx(w.lambda3) and out[1, 0, 6, 6] == pytest.approx(w.lambda2)
    # At threshold 0.5 the same target is confident and agrees.
    assert (_weight_map([0], [0.6], [0], [True], threshold=0.5) == w.lambda1).all()


# -- 4. EMA ----------------------------------------------------------------------------------
def test_ema_warm_up_forgets_the_initial_weights():
    p = torch.nn.Parameter(torch.ones(1))
    ema = EMA([p], decay=0.996)
    with torch.no_grad():
        p.fill_(0.0)  # initial weights 1, every update 0: the EMA is the initial weights' share
        for _ in range(200):
            ema.update()
    # Step 200 (the first checkpoint): 0 (EMAModel's first update has decay 0, then
    # min(0.996, (1 + s) / (10 + s))); a constant 0.996 would leave 0.996**200 = 0.449.
    assert float(ema.shadow[0]) == 0.0 and 0.996 ** 200 == pytest.approx(0.449, abs=1e-3)
    # And the first 100 updates' share at step 200 is prod_{k=101}^{200} k / (9 + k) = 0.24%.
    q = torch.nn.Parameter(torch.zeros(1))
    ema = EMA([q], decay=0.996)
    with torch.no_grad():
        for step in range(1, 201):
            q.fill_(0.0 if step <= 100 else 1.0)
            ema.update()
    first_half = 1.0 - float(ema.shadow[0])
    assert first_half == pytest.approx(math.prod(k / (9 + k) for k in range(101, 201)), rel=1e-4)
    assert first_half < 0.003


def test_ema_state_round_trips_and_applies_only_inside_the_context():
    p = torch.nn.Parameter(torch.zeros(3))
    ema = EMA([p], decay=0.996)
    with torch.no_grad():
        for v in (1.0, 2.0, 3.0):
            p.fill_(v)
            ema.update()
    state = ema.state_dict()
    q = torch.nn.Parameter(torch.zeros(3))
    other = EMA([q], decay=0.996)
    other.load_state_dict(state)
    assert other.model.optimization_step == 3
    torch.testing.assert_close(other.shadow[0], ema.shadow[0], rtol=0, atol=0)
    with ema.applied():
        torch.testing.assert_close(p.detach(), ema.shadow[0])
    assert (p.detach() == 3.0).all()


# -- 5. originals-bank fingerprint -----------------------------------------------------------
def _write_bank(path, cfg, fingerprint=True):
    info = OriginalsInfo(classes={"gender": torch.tensor([0, 1])}, features={"enc_a": torch.randn(2, 4)},
                         found=torch.tensor([True, False]))
    path.mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(info_to_rows(info, "a photo of the doctor", 7, [0, 1], 3)), path / "part-0.parquet")
    if fingerprint:
        write_fingerprint(path, bank_fingerprint(cfg))


def test_a_bank_built_for_another_job_is_refused_naming_the_fields(tmp_path):
    cfg = tiny_config(tmp_path)
    _write_bank(tmp_path / "bank", cfg)
    bank = OriginalsBank(tmp_path / "bank")
    assert len(bank) == 2 and (tmp_path / "bank" / FINGERPRINT_FILE).exists()
    bank.check(bank_fingerprint(cfg), ["gender"])  # the job it was built for
    other = tiny_config(tmp_path, dft__guidance_scale=3.0, model__dtype="bfloat16")
    with pytest.raises(BankMismatch, match=r"dtype, guidance_scale differ") as err:
        bank.check(bank_fingerprint(other), ["gender"])
    assert "guidance_scale: bank 7.5, job 3.0" in str(err.value)
    structured = tiny_config(tmp_path, loss__structure_weight=1.0)
    with pytest.raises(BankMismatch, match="structure"):
        bank.check(bank_fingerprint(structured))
    with pytest.raises(BankMismatch, match=r"targets \['race'\]"):
        bank.check(bank_fingerprint(cfg), ["gender", "race"])
    _write_bank(tmp_path / "old", cfg, fingerprint=False)
    with pytest.raises(BankMismatch, match="no _fingerprint.json"):
        OriginalsBank(tmp_path / "old").check(bank_fingerprint(cfg))


def test_training_refuses_a_stale_bank(tmp_path):
    cfg = tiny_config(tmp_path)
    _write_bank(tmp_path / "bank", cfg)
    stale = tiny_config(tmp_path, dft__steps=5, train__originals_bank=str(tmp_path / "bank"))
    with pytest.raises(BankMismatch, match="steps"):
        Trainer(stale, tmp_path / "run", progress=False)


# -- 6. OT: exact is exact, and refuses what it cannot enumerate -----------------------------
def test_exact_is_the_full_expectation_and_truncated_is_the_old_default():
    rng = np.random.default_rng(0)
    p = rng.dirichlet([1, 1], size=16)
    d = np.array([.3, .7])
    closed = expected_assignment(p, d, method="binary")  # the exact expectation for K = 2
    assert np.abs(expected_assignment(p, d, method="exact") - closed).max() < 1e-9
    assert np.abs(expected_assignment(p, d, method="truncated", mass=0.95) - closed).max() > 1e-4
    p4 = rng.dirichlet(np.ones(4), size=8)
    np.testing.assert_array_equal(expected_assignment(p4, np.full(4, .25)),  # auto -> truncated at 0.95
                                  expected_assignment(p4, np.full(4, .25), method="truncated", mass=0.95))
    assert LossConfig(ot_method="exact").ot_method == "exact" and LossConfig().ot_mass == 0.95


@pytest.mark.parametrize("method", ["exact", "truncated"])
def test_enumeration_refuses_a_problem_too_large(method):
    assert num_count_vectors(40, 16) > 10**12 > ENUMERATION_LIMIT
    p = np.full((40, 16), 1 / 16)
    with pytest.raises(ValueError, match=r"would enumerate 1\.\d+e\+13 class-count vectors for N=40 .* K=16.*monte_carlo"):
        expected_assignment(p, np.full(16, 1 / 16), method=method)


# -- 7. joint OT cost ------------------------------------------------------------------------
def test_joint_and_concatenated_costs_agree_on_one_attribute_and_both_run_jointly():
    rng = np.random.default_rng(1)
    probs = {a: rng.dirichlet(np.ones(len(c)), size=10) for a, c in KNOWN.items()}
    (race,) = TargetSpec.from_dict({"marginals": {"race": "uniform"}}).compile(KNOWN)
    for method in ("exact", "monte_carlo"):
        a = assign_targets([race], probs, method=method, seed=3, joint_cost="joint")["race"]
        b = assign_targets([race], probs, method=method, seed=3, joint_cost="concatenated")["race"]
        np.testing.assert_array_equal(a.q, b.q)
    (joint,) = TargetSpec.from_dict({"joint": {"attributes": ["gender", "race"], "probs": "uniform"}}).compile(KNOWN)
    cost = concatenated_cost(joint, probs)
    # The official formula: sqrt(|p_g - e_g|^2 + |p_r - e_r|^2), joint class j = 4 g + r.
    g, r = 1, 2
    official = math.sqrt(((probs["gender"][0] - np.eye(2)[g]) ** 2).sum() + ((probs["race"][0] - np.eye(4)[r]) ** 2).sum())
    assert cost[0, 4 * g + r] == pytest.approx(official)
    for joint_cost in ("joint", "concatenated"):
        out = assign_targets([joint], probs, seed=0, joint_cost=joint_cost)
        for attr in KNOWN:
            np.testing.assert_allclose(out[attr].q.sum(1), 1.0)
            np.testing.assert_allclose(out[attr].q.sum(0), 10 * joint.marginal(attr), atol=1.5)


def test_the_objective_passes_the_ot_settings_on(tmp_path, monkeypatch):
    import fairness.training.objective as objective_module

    seen = {}
    real = objective_module.assign_targets
    monkeypatch.setattr(objective_module, "assign_targets", lambda *a, **kw: seen.update(kw) or real(*a, **kw))
    cfg = tiny_config(tmp_path, target={"joint": {"attributes": ["gender", "race"], "probs": "uniform"}},
                      loss__ot_joint_cost="concatenated", loss__ot_method="truncated", loss__ot_mass=0.9)
    objective = Trainer(cfg, tmp_path / "run", progress=False).model.objective
    originals = objective.describe_originals(torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(1)))
    objective(torch.rand(4, 3, 32, 32), originals, seed=0)
    assert (seen["joint_cost"], seen["method"], seen["mass"]) == ("concatenated", "truncated", 0.9)


# -- 8. memory: half-precision frozen weights, fp32 adapter, sliced decode --------------------
def test_bfloat16_frozen_weights_train_with_float32_lora(tmp_path):
    cfg = tiny_config(tmp_path, model__dtype="bfloat16", train__iterations=2, train__checkpoint_every=2,
                      train__images_per_prompt=2, dft__steps=2)
    trainer = Trainer(cfg, tmp_path / "run", progress=False)
    pipe = trainer.model.pipe
    assert pipe.unet.dtype == pipe.vae.dtype == torch.bfloat16
    frozen = [p for p in pipe.text_encoder.parameters() if not p.requires_grad]
    assert frozen and all(p.dtype == torch.bfloat16 for p in frozen)
    for _ in range(2):
        row = trainer.train_step()
        assert math.isfinite(row["loss/total"]) and math.isfinite(row["grad_norm"]) and not row["skipped"]
    assert row["grad_norm"] > 0
    assert trainer.params and all(p.dtype == torch.float32 for p in trainer.params)


def test_sliced_vae_decode_matches_whole_batch_values_and_gradients():
    pipe = build_tiny_pipeline(seed=0).to(torch.float64)
    calls = []
    pipe.vae.decoder.register_forward_pre_hook(lambda m, args: calls.append(args[0].shape[0]))
    z = torch.randn(3, 4, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    outs, grads = [], []
    for slice_size in (None, 2):
        x = z.clone().requires_grad_(True)
        img = decode(pipe, x, use_checkpoint=True, slice_size=slice_size)
        (img ** 2).sum().backward()
        outs.append(img.detach())
        grads.append(x.grad)
    torch.testing.assert_close(outs[0], outs[1])
    torch.testing.assert_close(grads[0], grads[1])
    # Whole batch: one call and its recomputation; sliced: each slice (2 + 1 images) on its own.
    assert calls[:2] == [3, 3] and sorted(calls[2:]) == [1, 1, 2, 2]
    assert DFTConfig(vae_slice=2).sampling(3).vae_slice == 2 and DFTConfig().sampling(3).vae_slice is None
