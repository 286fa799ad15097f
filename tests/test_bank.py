"""Ray Data originals bank: training with it gives the same loss as generating the originals."""

from __future__ import annotations

import pytest
import torch

from fairness.training.bank import BankMismatch, OriginalsBank, bank_fingerprint
from fairness.training.loop import Trainer
from pipelines.bank import build_bank
from tests.helpers import tiny_config

pytestmark = [pytest.mark.ray, pytest.mark.timeout(300)]


def test_bank_gives_same_loss_as_generating(tmp_path, ray_session):
    cfg = tiny_config(tmp_path, train__iterations=3)
    out = build_bank(cfg, tmp_path / "bank", first_step=1, last_step=2, actors=1, chunk=2)
    bank = OriginalsBank(out)
    assert len(bank) == 2 * cfg.train.images_per_prompt
    plain = Trainer(cfg, tmp_path / "a", progress=False)
    banked = Trainer(cfg, tmp_path / "b", progress=False, bank=bank)
    for step in (1, 2):
        (draw,) = plain.iteration_plan(step)
        assert bank.has(draw.prompt, draw.noise_seed, plain.local_indices(), draw.num_steps)
        torch.manual_seed(0)
        la, logs_a = plain.loss_for(step)
        lb, logs_b = banked.loss_for(step)
        torch.testing.assert_close(la, lb, rtol=1e-5, atol=1e-6)
    # Iterations outside the bank fall back to generating.
    (draw,) = plain.iteration_plan(3)
    assert not bank.has(draw.prompt, draw.noise_seed, plain.local_indices(), draw.num_steps)
    # The bank carries the job's fingerprint: another guidance is refused, for training and for
    # adding rows to the same folder.
    assert bank.fingerprint == bank_fingerprint(cfg)
    other = tiny_config(tmp_path, train__iterations=3, dft__guidance_scale=2.0)
    with pytest.raises(BankMismatch, match="guidance_scale"):
        Trainer(other, tmp_path / "c", progress=False, bank=bank)
    with pytest.raises(BankMismatch, match="guidance_scale"):
        build_bank(other, out, first_step=3, last_step=3, actors=1, chunk=2)


def test_missing_bank_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="originals bank not found"):
        OriginalsBank(tmp_path / "nope")
