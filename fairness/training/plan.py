"""What iteration ``s`` of a run trains on: its prompts, its sampler step count and the noise
seed of each prompt's images, all derived from (seed, s).

The trainer and the originals bank (``pipelines/bank.py``) both read the plan from here, so the
bank holds exactly the originals that training would otherwise generate.
"""

from __future__ import annotations

from dataclasses import dataclass

from fairness.config import DebiasConfig
from fairness.seeding import derive_seed, numpy_rng
from fairness.training.prompts import PromptSampler


@dataclass(frozen=True)
class PromptDraw:
    """One prompt of an iteration and where its images come from."""

    set_name: str
    prompt: str
    num_steps: int
    noise_seed: int


def draw_keys(step: int, k: int) -> tuple[int, ...]:
    """The seed keys of draw ``k`` of iteration ``step``: the first draw keeps a one-prompt
    run's keys, so its prompt, noise and OT targets are those of a one-prompt run."""
    return (step,) if k == 0 else (step, k)


def iteration_plan(cfg: DebiasConfig, sampler: PromptSampler, step: int) -> list[PromptDraw]:
    """The ``train.prompts_per_step`` draws of iteration ``step``.

    The prompts of one iteration share a sampler step count. The first draw's keys are those of
    a one-prompt run, so adding prompts per step keeps the first prompt and its noise."""
    lo, hi = (cfg.dft.steps, cfg.dft.steps) if isinstance(cfg.dft.steps, int) else cfg.dft.steps
    num_steps = int(numpy_rng(cfg.seed, "num-steps", step).integers(lo, hi + 1))
    draws = []
    for k in range(cfg.train.prompts_per_step):
        keys = draw_keys(step, k)
        set_name, prompt = sampler.draw(*keys)
        draws.append(PromptDraw(set_name, prompt, num_steps, derive_seed(cfg.seed, "iter", *keys)))
    return draws
