"""The training loop: checkpoints, exact resume, non-finite skips, no-face batches, EMA, best."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from fairness.config import SelectionConfig
from fairness.seeding import image_noise
from fairness.training.loop import Trainer
from fairness.training.objective import Reference
from tests.helpers import tiny_config


def _adapter_state(trainer):
    return {k: v.clone() for k, v in trainer.model.adapter.state_dict().items()}


def test_run_directory_layout_and_exported_adapter(tmp_path):
    cfg = tiny_config(tmp_path)
    result = Trainer(cfg, tmp_path / "run", progress=False).fit()
    run = tmp_path / "run"
    assert result.steps == 4 and result.best_step in (2, 4)
    assert (run / "config.yaml").exists() and (run / "adapter" / "pytorch_lora_weights.safetensors").exists()
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_000002", "step_000004"]
    rows = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    for key in ("loss/total", "loss/align", "loss/img", "loss/face", "grad_norm"):
        assert all(key in r for r in rows)
    assert len((run / "val.jsonl").read_text().splitlines()) == 2


def test_validation_reports_kept_objects_and_generates_the_originals_once(tmp_path):
    trainer = Trainer(tiny_config(tmp_path), tmp_path / "run", progress=False)
    calls = []
    sample_original = trainer.model.sample_original
    trainer.model.sample_original = lambda *a: calls.append(a[0]) or sample_original(*a)
    first, second = trainer.validate(), trainer.validate()
    assert len(calls) == len(trainer.val_prompts) > 0  # the second check reuses the cache
    assert first == second  # the adapter did not change, so neither does anything measured
    assert 0 <= first["val_target_gap"] <= 1
    assert first["val_objects_kept"] == 1.0  # the tiny detector finds a face in every image
    assert first["val_score"] == trainer.cfg.train.selection.score(first)


@pytest.mark.parametrize("schedule", [{}, {"train__prompts_per_step": 2, "train__lr_scheduler": "cosine",
                                           "train__lr_warmup_steps": 1}], ids=["one-prompt", "two-prompts-cosine"])
def test_resume_reproduces_uninterrupted_run_exactly(tmp_path, schedule):
    cfg = tiny_config(tmp_path, train__ema_decay=0.9, **schedule)
    full = Trainer(cfg, tmp_path / "full", progress=False)
    full.fit()
    part = Trainer(cfg, tmp_path / "part", progress=False)
    part.fit(stop_after=2)  # "killed" after the step-2 checkpoint
    resumed = Trainer(cfg, tmp_path / "part", progress=False)
    assert resumed.resume() and resumed.step == 2
    resumed.fit()
    a, b = _adapter_state(full), _adapter_state(resumed)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)
    ema_a, ema_b = full.ema.state_dict(), resumed.ema.state_dict()  # the EMA resumes exactly too
    assert ema_a["optimization_step"] == ema_b["optimization_step"] == 4
    for x, y in zip(ema_a["shadow_params"], ema_b["shadow_params"]):
        torch.testing.assert_close(x, y, rtol=0, atol=0)
    la = (tmp_path / "full" / "log.jsonl").read_text().splitlines()
    lb = (tmp_path / "part" / "log.jsonl").read_text().splitlines()
    strip = lambda rows: [{k: v for k, v in json.loads(r).items() if k != "seconds"} for r in rows]
    assert strip(la) == strip(lb)


def test_prompts_per_step_average_their_gradients_and_keep_the_first_draw(tmp_path):
    one = Trainer(tiny_config(tmp_path), tmp_path / "one", progress=False)
    two = Trainer(tiny_config(tmp_path, train__prompts_per_step=2), tmp_path / "two", progress=False)
    plans = [two.iteration_plan(step) for step in range(1, 9)]
    assert [p[0] for p in plans] == [one.iteration_plan(step)[0] for step in range(1, 9)]
    assert all(p[0].num_steps == p[1].num_steps and p[0].noise_seed != p[1].noise_seed for p in plans)
    assert {p[1].prompt for p in plans} == set(tiny_config(tmp_path).prompts.train[0].prompts)

    # One batch of two prompts gives each prompt the loss and gradient it gets alone (same
    # noise, same subsampled steps), and the step follows their mean.
    one.model.adapter.load_state_dict(two.model.adapter.state_dict())

    def alone(draw):
        one.iteration_plan = lambda step: [draw]
        one.optimizer.zero_grad(set_to_none=True)
        loss = one.loss_for(1)[0]
        loss.backward()
        return float(loss.detach()), [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in one.params]

    (l0, g0), (l1, g1) = alone(plans[0][0]), alone(plans[0][1])
    seen = []  # the iteration's gradient, where workers would average it
    two.collective.average_gradients = lambda params: seen.extend(p.grad.clone() for p in params)
    row = two.train_step()
    assert row["loss/total"] == pytest.approx((l0 + l1) / 2, rel=1e-4)
    assert len(seen) == len(g0) and any(float(g.abs().sum()) > 0 for g in seen)
    for got, a, b in zip(seen, g0, g1):
        torch.testing.assert_close(got, (a + b) / 2, rtol=1e-3, atol=1e-6)
    assert row["prompt"] == [plans[0][0].prompt, plans[0][1].prompt]


def test_lr_schedule_follows_the_iterations(tmp_path):
    cfg = tiny_config(tmp_path, train__lr_scheduler="cosine", train__lr_warmup_steps=1)
    trainer = Trainer(cfg, tmp_path / "run", progress=False)
    trainer.fit()
    lrs = [json.loads(line)["lr"] for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    peak = cfg.train.lr
    # diffusers' cosine: 0 in the one warm-up step, then half a cosine from the peak toward 0.
    expected = [0.0] + [peak * 0.5 * (1 + math.cos(math.pi * s / 3)) for s in (0, 1, 2)]
    assert lrs == pytest.approx(expected)


def test_non_finite_gradients_are_skipped_and_counted(tmp_path):
    cfg = tiny_config(tmp_path, train__iterations=3, train__checkpoint_every=3)
    trainer = Trainer(cfg, tmp_path / "run", progress=False)
    before = _adapter_state(trainer)
    original = trainer.loss_for

    def poisoned(step):
        loss, logs = original(step)
        return loss * float("nan") if step == 2 else loss, logs

    trainer.loss_for = poisoned
    trainer.train_step()
    after_one = _adapter_state(trainer)
    trainer.train_step()
    assert trainer.skipped == 1
    for k in after_one:  # the poisoned step changed nothing
        torch.testing.assert_close(_adapter_state(trainer)[k], after_one[k])
    trainer.train_step()
    assert trainer.step == 3 and trainer.skipped == 1
    assert any((before[k] - v).abs().max() > 0 for k, v in _adapter_state(trainer).items())
    rows = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [r["skipped"] for r in rows] == [False, True, False]


def test_batches_without_any_face_only_get_the_semantics_loss(tmp_path):
    cfg = tiny_config(tmp_path, detector_threshold=1e9, train__iterations=1)
    trainer = Trainer(cfg, tmp_path / "run", progress=False)
    row = trainer.train_step()
    assert row["faces"] == 0 and row["loss/align"] == 0
    assert row["loss/total"] == pytest.approx(row["loss/img"])


def test_joint_and_conditional_targets_train(tmp_path):
    cfg = tiny_config(tmp_path, target={"joint": {"attributes": ["gender", "race"], "probs": "uniform"}},
                      loss__confidence_threshold={"gender": 0.6, "race": 0.3}, train__iterations=2)
    row = Trainer(cfg, tmp_path / "run", progress=False).train_step()
    assert row["loss/align"] >= 0
    for attr in ("gender", "race"):  # the images moved are among those counted
        assert 0 <= row[f"pushed/{attr}"] <= row[f"confident/{attr}"] <= 1


def test_pushed_counts_the_images_whose_target_is_not_the_class_seen(tmp_path):
    """Against an all-male and then an all-female target every image found is confidently
    targeted, and each is pushed by exactly one of the two: the two pushed shares add up to
    the share of the batch with a face."""
    rows = []
    for cls in ("male", "female"):
        probs = {"male": float(cls == "male"), "female": float(cls == "female")}
        cfg = tiny_config(tmp_path, target={"marginals": {"gender": probs}}, train__iterations=1)
        rows.append(Trainer(cfg, tmp_path / f"run_{cls}", progress=False).train_step())
    assert rows[0]["faces"] == rows[1]["faces"] > 0
    assert rows[0]["confident/gender"] == rows[1]["confident/gender"] == rows[0]["faces"]
    assert rows[0]["pushed/gender"] + rows[1]["pushed/gender"] == pytest.approx(rows[0]["faces"])


def test_loss_falls_on_a_fixed_batch(tmp_path):
    cfg = tiny_config(tmp_path, prompts={"train": [{"prompts": ["a photo of the doctor"]}]},
                      train__iterations=8, train__lr=0.02, train__ema_decay=None, train__checkpoint_every=8,
                      dft__steps=3, adapter__rank=8)
    trainer = Trainer(cfg, tmp_path / "run", progress=False)
    with torch.no_grad():
        first, _ = trainer.loss_for(1)
    trainer.fit()
    with torch.no_grad():
        last, _ = trainer.loss_for(1)
    assert float(last) < float(first)


def test_validation_score_charges_lost_semantics_and_objects_only_below_their_floors():
    sel = SelectionConfig(semantic_floor=0.9, object_floor=0.9, penalty=2.0)
    val = {"val_target_gap": 0.2, "val_semantic_sim": 0.95, "val_objects_kept": 1.0}
    assert sel.score(val) == pytest.approx(0.2)
    assert sel.score({**val, "val_semantic_sim": 0.8}) == pytest.approx(0.4)
    assert sel.score({**val, "val_objects_kept": 0.5}) == pytest.approx(0.2 + 2 * 0.4)
    assert sel.score({**val, "val_objects_kept": float("nan")}) == pytest.approx(0.2)
    assert math.isnan(sel.score({**val, "val_target_gap": float("nan")}))


def test_export_skips_a_fairer_looking_checkpoint_that_erased_the_objects(tmp_path):
    # Step 2 has the lower target gap only because most objects are gone; the score charges
    # that, so step 4 is exported (the gap alone would have picked step 2).
    trainer = Trainer(tiny_config(tmp_path), tmp_path / "run", progress=False)
    scripted = {2: {"val_target_gap": 0.10, "val_semantic_sim": 0.95, "val_objects_kept": 0.2},
                4: {"val_target_gap": 0.30, "val_semantic_sim": 0.95, "val_objects_kept": 1.0}}
    states = {}

    def validate():
        states[trainer.step] = {k: v.clone() for k, v in trainer.export_state().items()}
        m = scripted[trainer.step]
        return {"step": trainer.step, **m, "val_score": trainer.cfg.train.selection.score(m)}

    trainer.validate = validate
    result = trainer.fit()
    assert result.best_step == 4 and result.best_score == pytest.approx(0.30)
    for k, v in _adapter_state(trainer).items():
        torch.testing.assert_close(v, states[4][k], rtol=0, atol=0)
    assert not all(torch.equal(states[2][k], states[4][k]) for k in states[2])
    rows = [json.loads(line) for line in (tmp_path / "run" / "val.jsonl").read_text().splitlines()]
    assert [r["val_score"] for r in rows] == pytest.approx([0.10 + 2 * 0.7, 0.30])


@pytest.mark.parametrize("weight", [None, 40.0])
def test_an_image_that_lost_its_face_gets_the_lost_face_weight(tmp_path, weight):
    # The first two originals show a face and the third none; the detector finds none in the
    # generated images, so the first two have left the alignment loss. The paper's rule weighs
    # their semantics gradient like an image that needs no change (lambda1); lost_face_weight
    # replaces that weight, and only for them.
    cfg = tiny_config(tmp_path, detector_threshold=1e9, loss__lost_face_weight=weight)
    objective = Trainer(cfg, tmp_path / "run", progress=False).model.objective
    paper = cfg.loss.model_copy(update={"lost_face_weight": None})
    images = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    originals = objective.describe_originals(torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(1)))
    originals.found = torch.tensor([True, True, False])

    def grads(loss_cfg):
        objective.cfg = loss_cfg
        x = images.clone().requires_grad_(True)
        out = objective(x, originals, seed=0)
        out.total.backward()
        return x.grad.flatten(1).norm(dim=1), out.logs

    (with_rule, logs), (paper_rule, _) = grads(cfg.loss), grads(paper)
    assert logs["faces"] == 0 and logs["faces_lost"] == pytest.approx(2 / 3)
    ratio = with_rule / paper_rule
    expected = (weight or paper.img.lambda1) / paper.img.lambda1
    torch.testing.assert_close(ratio[:2], torch.full((2,), expected))
    torch.testing.assert_close(ratio[2], torch.tensor(1.0))  # its original had no face either


def test_reference_images_decide_the_targets_of_the_images_backpropagated(tmp_path):
    """The reference draw joins the prompt's OT: against a 50/50 target, a reference of 60 images
    that are surely male leaves every backpropagated image to be made female, where the four
    images alone split between the two. It is the current model's no-grad images of noise
    indices after the backpropagated ones, the same at every call."""
    cfg = tiny_config(tmp_path, train__reference_images=3, train__iterations=1)
    trainer = Trainer(cfg, tmp_path / "run", progress=False)
    draws = trainer.iteration_plan(1)
    first, again = trainer.references(draws), trainer.references(draws)
    assert first[0].probs.shape == (3, 2) and first[0].found.shape == (3,)
    np.testing.assert_array_equal(first[0].probs, again[0].probs)

    obj, d = trainer.model.objective, draws[0]
    noise = image_noise(d.noise_seed, d.prompt, range(4), trainer.model.latent_shape)
    with torch.no_grad():
        images = trainer.model.sample([d.prompt] * 4, noise, d.num_steps, "none")
        originals = obj.describe_originals(images)
    assert not np.isclose(obj.reference(images).probs[:3], first[0].probs).all()  # other noise, other images

    alone = obj(images, originals, seed=0).targets["gender"]
    male = np.tile([1.0, 0.0], (60, 1))  # the targeted attribute's probabilities: surely male
    helped = obj(images, originals, seed=0, reference=Reference(male, np.ones(60, dtype=bool))).targets["gender"]
    assert set(alone.targets) == {0, 1}
    assert (helped.targets == 1).all() and (helped.confidence > 0.9).all()
    assert trainer.train_step()["loss/total"] > 0
