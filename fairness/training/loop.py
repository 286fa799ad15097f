"""The debiasing training loop (single process; Ray Train wraps it unchanged).

Each iteration: draw ``train.prompts_per_step`` prompts and a step count (:mod:`~fairness.training.plan`),
draw noise for their images, get the frozen model's originals from the same noise, generate
the finetuned images *with* gradient in one batch (these same images, and ``train.reference_images``
more drawn without gradient, decide each prompt's OT targets), average the prompts' losses,
backpropagate, skip the update if any gradient is non-finite, step AdamW and the learning-rate schedule, update the EMA. Every ``checkpoint_every`` iterations:
checkpoint, validate on held-out prompts, keep the best.

All randomness of iteration ``s`` is derived from (seed, s), so a resumed run reproduces the
uninterrupted one exactly, and any split of the batch over workers draws the same images.

Faults (see also :mod:`fairness.training.rundir` and docs/bad-inputs.md):

* SIGTERM / SIGINT (single process, main thread): the current iteration finishes, a checkpoint
  of it is written (no validation, so the resumed run stays identical to an uninterrupted one)
  and :class:`TrainingInterrupted` is raised; ``fairness debias`` exits 128 + the signal
  number (143 / 130). A second SIGINT interrupts at once.
* Non-finite loss or gradients: the update is skipped and counted; ``fit`` warns with the count
  at the end, and ``train.max_nonfinite_steps`` consecutive skipped iterations stop the run with
  :class:`NonFiniteLossError` (its weights are those of the last finite step).
"""

from __future__ import annotations

import contextlib
import math
import signal
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Protocol

import numpy as np
import torch
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel
from tqdm.auto import tqdm

from fairness.adapters.io import export_adapter
from fairness.config import DebiasConfig
from fairness.dft.batched import step_seed
from fairness.metrics.bias import target_gap
from fairness.seeding import derive_seed, image_noise
from fairness.training.debiaser import Debiaser
from fairness.training.bank import OriginalsBank, bank_fingerprint
from fairness.training.objective import Collective, OriginalsInfo, Reference, SingleProcess
from fairness.training.plan import PromptDraw, draw_keys, iteration_plan
from fairness.training.prompts import PromptSampler, resolve_prompts
from fairness.training.rundir import RunDir


def merge_logs(logs: list[dict[str, Any]]) -> dict[str, Any]:
    """One log row from the rows of an iteration's prompts: numbers averaged, anything else
    (prompt, set) listed; a one-prompt iteration's row is its prompt's."""
    if len(logs) == 1:
        return logs[0]
    out: dict[str, Any] = {}
    for key in dict.fromkeys(k for row in logs for k in row):
        values = [row[key] for row in logs if key in row]
        numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
        out[key] = float(np.mean(values)) if numeric else values
    return out


class TrainingInterrupted(RuntimeError):
    """Training stopped on a signal after checkpointing the last finished iteration."""

    def __init__(self, signum: int, step: int, checkpoint: Path | None):
        self.signum, self.step, self.checkpoint = signum, step, checkpoint
        name = signal.Signals(signum).name
        super().__init__(f"interrupted by {name} after step {step}; checkpoint {checkpoint} written, rerun the same "
                         "command (same --run-dir) to resume")

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


class NonFiniteLossError(RuntimeError):
    """Too many consecutive iterations skipped for a non-finite loss or gradient: the run diverged."""


class Distributed(Collective, Protocol):
    """A :class:`Collective` that also averages gradients (Ray Train supplies one)."""

    rank: int
    world_size: int

    def average_gradients(self, params: list[torch.nn.Parameter]) -> None: ...


class LocalProcess(SingleProcess):
    rank = 0
    world_size = 1

    def average_gradients(self, params: list[torch.nn.Parameter]) -> None:
        return None


# Called on every worker at each checkpoint: (step, checkpoint folder on the main worker else
# None, metrics). Ray Train's ``report`` must be called by all workers, hence on all of them.
CheckpointHook = Callable[[int, Path | None, dict[str, Any]], None]


class EMA:
    """Exponential moving average of the trainable parameters: diffusers' ``EMAModel``, as the
    official code uses it (decay 0.996 and EMAModel's default warm-up).

    The decay of update s (0-based) is ``min(decay, (1 + s) / (10 + s))``, and 0 at the first
    update: the average starts from the first trained weights, not from the initial ones. A
    constant 0.996 from step 0 would still hold 0.996^200 = 45% of the initial (untrained)
    adapter in the EMA at the first checkpoint (step 200), which is what validation and export
    would then measure.
    """

    def __init__(self, params: list[torch.nn.Parameter], decay: float):
        self.params = params
        self.model = EMAModel(params, decay=decay)

    @property
    def shadow(self) -> list[torch.Tensor]:
        return self.model.shadow_params

    def update(self) -> None:
        self.model.step(self.params)

    def state_dict(self) -> dict[str, Any]:
        state = self.model.state_dict()  # holds references: copy the averages
        return {**state, "shadow_params": [s.detach().clone() for s in state["shadow_params"]]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state)
        self.model.shadow_params = [s.to(p.device) for s, p in zip(self.model.shadow_params, self.params)]

    @contextlib.contextmanager
    def applied(self) -> Iterator[None]:
        """Temporarily load the EMA weights into the model."""
        self.model.store(self.params)
        self.model.copy_to(self.params)
        try:
            yield
        finally:
            self.model.restore(self.params)


@dataclass
class TrainResult:
    run_dir: Path
    steps: int
    skipped: int
    best_step: int | None
    best_score: float | None
    adapter_dir: Path


class Trainer:
    def __init__(
        self,
        cfg: DebiasConfig,
        run_dir: str | Path,
        collective: Distributed | None = None,
        bank: OriginalsBank | None = None,
        on_checkpoint: CheckpointHook | None = None,
        progress: bool = True,
        debiaser: Debiaser | None = None,
    ):
        self.cfg = cfg
        self.run = RunDir(run_dir)
        self.collective = collective or LocalProcess()
        self.bank = bank or (OriginalsBank(cfg.train.originals_bank) if cfg.train.originals_bank else None)
        self.on_checkpoint = on_checkpoint
        self.progress = progress
        n, w = cfg.train.images_per_prompt, self.collective.world_size
        if n % w:
            raise ValueError(f"images_per_prompt ({n}) must be divisible by the number of workers ({w})")
        # Prompts first: a bad prompt file fails before any model loads.
        self.sampler = PromptSampler(cfg.prompts.train, cfg.seed)
        self.val_prompts = [p for ps in cfg.prompts.val for p in resolve_prompts(ps)][: cfg.train.val_prompts]
        self.model = debiaser or Debiaser(cfg)
        if self.bank is not None:
            self.bank.check(bank_fingerprint(cfg), self.model.objective.attributes)
        self.params = self.model.adapter.parameters()
        self.optimizer = torch.optim.AdamW(self.params, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
        self.lr_schedule = get_scheduler(cfg.train.lr_scheduler, self.optimizer, num_warmup_steps=cfg.train.lr_warmup_steps,
                                         num_training_steps=cfg.train.iterations)
        self.ema = EMA(self.params, cfg.train.ema_decay) if cfg.train.ema_decay else None
        self.scaler = torch.amp.GradScaler("cuda", enabled=cfg.model.dtype == "float16" and self.model.device.type == "cuda")
        self.step = 0
        self.skipped = 0
        self.nonfinite_streak = 0  # consecutive skipped iterations that count towards divergence
        self._stop_signal: int | None = None
        self.best_score: float | None = None
        self.best_step: int | None = None
        self.best_state: dict[str, torch.Tensor] | None = None
        self._val_cache: dict[str, tuple[list[torch.Tensor], int]] = {}

    # -- state ---------------------------------------------------------------------------
    @property
    def is_main(self) -> bool:
        return self.collective.rank == 0

    def state_dict(self) -> dict[str, Any]:
        return {
            "step": self.step, "skipped": self.skipped, "best_score": self.best_score, "best_step": self.best_step,
            "best_state": self.best_state, "adapter": self.model.adapter.state_dict(), "optimizer": self.optimizer.state_dict(),
            "lr_scheduler": self.lr_schedule.state_dict(),
            "ema": self.ema.state_dict() if self.ema else None,
            "scaler": self.scaler.state_dict(), "nonfinite_streak": self.nonfinite_streak,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.adapter.load_state_dict(state["adapter"])
        self.optimizer.load_state_dict(state["optimizer"])
        if "lr_scheduler" in state:  # checkpoints from before schedules ran at a constant rate
            self.lr_schedule.load_state_dict(state["lr_scheduler"])
        ema = state.get("ema")
        if isinstance(ema, list):  # checkpoints from before EMAModel stored the averages alone
            ema = {"shadow_params": ema, "optimization_step": state["step"] - state["skipped"]}
        if self.ema and ema is not None:
            self.ema.load_state_dict(ema)
        self.scaler.load_state_dict(state["scaler"])
        self.step, self.skipped = state["step"], state["skipped"]
        self.best_score, self.best_step = state["best_score"], state["best_step"]
        self.best_state = state.get("best_state")
        self.nonfinite_streak = state.get("nonfinite_streak", 0)

    def resume(self, checkpoint: Path | None = None) -> bool:
        """Continue from ``checkpoint`` or the run directory's latest usable one (a truncated
        or corrupt one is skipped with a warning); False if none."""
        if checkpoint is not None:
            state = RunDir.load_checkpoint(checkpoint)
        else:
            state = next((st for _, st in self.run.usable_checkpoints()), None)
            if state is None:
                return False
        self.load_state_dict(state)
        if self.is_main:
            self.run.truncate_logs(self.step)
        return True

    # -- one iteration -------------------------------------------------------------------
    def local_indices(self) -> list[int]:
        n, w, r = self.cfg.train.images_per_prompt, self.collective.world_size, self.collective.rank
        per = n // w
        return list(range(r * per, (r + 1) * per))

    def iteration_plan(self, step: int) -> list[PromptDraw]:
        """The prompts of iteration ``step``, with their sampler steps and noise seeds."""
        return iteration_plan(self.cfg, self.sampler, step)

    def originals(self, draws: list[PromptDraw], indices: list[int], noise: torch.Tensor) -> list[OriginalsInfo]:
        """The frozen model's side of each draw's images (``noise``: the draws' noise, one after
        the other): from the bank where it has them, else generated in one batch."""
        n, out = len(indices), {}
        for k, d in enumerate(draws):
            if self.bank is not None and self.bank.has(d.prompt, d.noise_seed, indices, d.num_steps):
                out[k] = self.bank.lookup(d.prompt, d.noise_seed, indices, d.num_steps).to(self.model.device)
        missing = [k for k in range(len(draws)) if k not in out]
        if missing:
            prompts = [draws[k].prompt for k in missing for _ in indices]
            batch = torch.cat([noise[k * n:(k + 1) * n] for k in missing])
            info = self.model.objective.describe_originals(self.model.sample_original(prompts, batch, draws[0].num_steps))
            out.update({k: info.rows(slice(j * n, (j + 1) * n)) for j, k in enumerate(missing)})
        return [out[k] for k in range(len(draws))]

    @torch.no_grad()
    def references(self, draws: list[PromptDraw]) -> list[Reference | None]:
        """Each draw's ``train.reference_images`` no-grad images (noise indices after the
        backpropagated ones, so never the same image), drawn whole on every worker so that all
        of them solve the same OT."""
        m, first = self.cfg.train.reference_images, self.cfg.train.images_per_prompt
        if not m:
            return [None] * len(draws)
        idx = range(first, first + m)
        noise = torch.cat([image_noise(d.noise_seed, d.prompt, idx, self.model.latent_shape) for d in draws])
        images = self.model.sample([d.prompt for d in draws for _ in idx], noise, draws[0].num_steps, "none")
        return [self.model.objective.reference(images[k * m:(k + 1) * m]) for k in range(len(draws))]

    def loss_for(self, step: int) -> tuple[torch.Tensor, dict[str, Any]]:
        """The loss of iteration ``step`` on this worker's share of its images (with graph).

        All the iteration's prompts are generated in one batch; each prompt's images get their
        own OT targets, and the prompts' losses are averaged."""
        draws, idx = self.iteration_plan(step), self.local_indices()
        n = len(idx)
        noise = torch.cat([image_noise(d.noise_seed, d.prompt, idx, self.model.latent_shape) for d in draws])
        originals = self.originals(draws, idx, noise)
        with step_seed(derive_seed(self.cfg.seed, "dft-steps", step)):  # the same on every worker
            images = self.model.sample([d.prompt for d in draws for _ in idx], noise, draws[0].num_steps,
                                       self.cfg.dft.mode)
        references = self.references(draws)
        losses, logs = [], []
        for k, (d, orig) in enumerate(zip(draws, originals)):
            seed = derive_seed(self.cfg.seed, "ot", *draw_keys(step, k))
            out = self.model.objective(images[k * n:(k + 1) * n], orig, seed=seed, collective=self.collective,
                                       reference=references[k])
            losses.append(out.total)
            logs.append({"prompt": d.prompt, "set": d.set_name, "sampler_steps": d.num_steps, **out.logs})
        return torch.stack(losses).mean(), merge_logs(logs)

    def train_step(self) -> dict[str, Any]:
        step = self.step + 1
        t0 = time.perf_counter()
        self.optimizer.zero_grad(set_to_none=True)
        loss, logs = self.loss_for(step)
        self.scaler.scale(loss).backward()
        loss_value = float(loss.detach())
        for p in self.params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        self.collective.average_gradients(self.params)
        self.scaler.unscale_(self.optimizer)
        lr = self.optimizer.param_groups[0]["lr"]  # this iteration's, before the schedule moves on
        grad_norm = torch.sqrt(sum((p.grad.double() ** 2).sum() for p in self.params))
        finite = bool(torch.isfinite(grad_norm)) and math.isfinite(loss_value)
        if finite:
            if self.cfg.train.grad_clip:
                torch.nn.utils.clip_grad_norm_(self.params, self.cfg.train.grad_clip)
            self.scaler.step(self.optimizer)
            if self.ema:
                self.ema.update()
        else:
            self.skipped += 1
        self.lr_schedule.step()  # the schedule follows iterations, skipped ones included
        # A skipped step counts towards divergence, except under fp16 loss scaling while the
        # scaler can still lower its scale (its overflow skips are routine). Both tests read
        # state every worker shares (averaged gradients, scaler), so all workers stop together.
        routine = self.scaler.is_enabled() and self.scaler.get_scale() >= 1.0
        self.nonfinite_streak = self.nonfinite_streak + 1 if not finite and not routine else 0
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.step = step
        row = {"step": step, "grad_norm": float(grad_norm), "skipped": not finite, "skipped_total": self.skipped,
               "seconds": time.perf_counter() - t0, "lr": lr, **logs}
        if self.is_main:
            self.run.append(self.run.log_path, row)
        limit = self.cfg.train.max_nonfinite_steps
        if limit and self.nonfinite_streak >= limit:
            last = self.run.latest_checkpoint() if self.is_main else None
            raise NonFiniteLossError(
                f"the loss or gradients were non-finite (NaN/inf) for {self.nonfinite_streak} consecutive iterations "
                f"(steps {step - self.nonfinite_streak + 1}-{step}; train.max_nonfinite_steps={limit}): the run "
                f"diverged. {self.skipped} iteration(s) skipped in all; latest checkpoint: {last}. "
                "Lower train.lr, set train.grad_clip, or train in float32")
        return row

    # -- validation, checkpoints, export -------------------------------------------------
    def weights_for_export(self):
        return self.ema.applied() if self.ema else contextlib.nullcontext()

    @torch.no_grad()
    def validate(self) -> dict[str, Any]:
        """Validation on held-out prompts with the *training* perception (the evaluation
        classifier stays unseen), mean over prompts:

        - ``val_target_gap``: distance of the generated attribute laws from each target group's
          (:func:`~fairness.metrics.bias.target_gap`: joint and marginal total variation;
          lower is better);
        - ``val_semantic_sim``: cosine similarity, under the semantic encoders, between
          debiased and original images from the same noise;
        - ``val_objects_kept``: images with a face/object, debiased over original, pooled over
          prompts. Bias is only measured where one is found, so an adapter that removes them
          looks fair.

        ``val_score`` (:meth:`~fairness.config.SelectionConfig.score`) combines the three; it
        picks the exported checkpoint and ranks Tune trials. The originals' side is the same at
        every check and is computed once."""
        if not self.val_prompts:
            return {}
        obj, n = self.model.objective, self.cfg.train.val_images_per_prompt
        sizes = {a: len(c) for a, c in self.model.bundle.attributes.items()}
        gaps, sims, found_total, original_total = [], [], 0, 0
        with self.weights_for_export():
            for prompt in self.val_prompts:
                noise = image_noise(derive_seed(self.cfg.seed, "val"), prompt, range(n), self.model.latent_shape)
                original_features, original_found = self._val_originals(prompt, noise)
                images = self.model.sample([prompt] * n, noise, self.cfg.dft.eval_steps, "none")
                regions, _, logits = obj.classify(images)
                found = regions.found.cpu().numpy()
                classes = {a: np.where(found, logits[a].argmax(-1).cpu().numpy(), -1) for a in obj.attributes}
                gaps += [target_gap(classes, sizes, g) for g in self.model.groups]
                found_total, original_total = found_total + int(found.sum()), original_total + original_found
                for enc, ref in zip(obj.encoders, original_features):
                    sims.append(float(torch.nn.functional.cosine_similarity(enc(images), ref, dim=-1).mean()))
        gaps = [g for g in gaps if g == g]
        nan = float("nan")
        metrics = {"val_target_gap": float(np.mean(gaps)) if gaps else nan,
                   "val_semantic_sim": float(np.mean(sims)) if sims else nan,
                   "val_objects_kept": found_total / original_total if original_total else nan}
        return {"step": self.step, **metrics, "val_score": self.cfg.train.selection.score(metrics)}

    def _val_originals(self, prompt: str, noise: torch.Tensor) -> tuple[list[torch.Tensor], int]:
        """The frozen model's images for a validation prompt, as semantic features and the
        number with a face/object (cached: the adapter does not change them). Called inside
        :meth:`validate`, which already runs without gradients."""
        if prompt not in self._val_cache:
            originals = self.model.sample_original([prompt] * len(noise), noise, self.cfg.dft.eval_steps)
            obj = self.model.objective
            found = int(obj.classify(originals)[0].found.sum())
            self._val_cache[prompt] = ([enc(originals) for enc in obj.encoders], found)
        return self._val_cache[prompt]

    def export_state(self) -> dict[str, torch.Tensor]:
        """The adapter weights that would be exported now (EMA weights when enabled)."""
        with self.weights_for_export():
            return self.model.adapter.state_dict()

    def checkpoint(self) -> None:
        val = self.validate()
        score = val.get("val_score")
        if self.is_main and val:
            self.run.append(self.run.val_path, val)
        # Every worker validates the same images, so all keep the same best state.
        if score is not None and score == score and (self.best_score is None or score < self.best_score):
            self.best_score, self.best_step = score, self.step
            self.best_state = self.export_state()
        path = self.run.save_checkpoint(self.step, self.state_dict()) if self.is_main else None
        if self.on_checkpoint:
            self.on_checkpoint(self.step, path, {"step": self.step, **val})

    @contextlib.contextmanager
    def _stop_on_signals(self) -> Iterator[None]:
        """While training, SIGTERM / SIGINT ask the loop to stop after the current iteration.
        Only in the main thread of a single process: Ray Train runs workers in threads, and a
        checkpoint there is collective (every worker must join it)."""
        if self.collective.world_size > 1 or threading.current_thread() is not threading.main_thread():
            yield
            return

        def ask_to_stop(signum, frame):
            if self._stop_signal is not None and signum == signal.SIGINT:
                raise KeyboardInterrupt  # a second Ctrl-C: stop now
            self._stop_signal = signum

        previous = {s: signal.signal(s, ask_to_stop) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            yield
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)

    def fit(self, resume: bool = True, stop_after: int | None = None) -> TrainResult:
        """Train to ``train.iterations`` (or ``stop_after`` more iterations, for tests)."""
        if self.is_main:
            self.run.config_path.write_text(self.cfg.to_yaml())
        if resume:
            self.resume()
        total = self.cfg.train.iterations
        end = total if stop_after is None else min(total, self.step + stop_after)
        skipped_before = self.skipped
        bar = tqdm(total=total, initial=self.step, desc=f"debias {self.cfg.name}", disable=not (self.progress and self.is_main))
        self._stop_signal = None
        with self._stop_on_signals():
            while self.step < end:
                row = self.train_step()
                bar.update(1)
                bar.set_postfix({k: f"{row[k]:.3f}" for k in ("loss/total", "loss/align") if k in row})
                if self.step % self.cfg.train.checkpoint_every == 0 or self.step == total:
                    self.checkpoint()
                elif self._stop_signal is not None:
                    self.run.save_checkpoint(self.step, self.state_dict())
                if self._stop_signal is not None:
                    bar.close()
                    raise TrainingInterrupted(self._stop_signal, self.step, self.run.checkpoint_dir(self.step))
        bar.close()
        if self.skipped > skipped_before:
            warnings.warn(f"{self.skipped} of {self.step} iterations were skipped: non-finite loss or gradients "
                          "(see 'skipped' in log.jsonl)", RuntimeWarning, stacklevel=2)
        adapter_dir = self.run.root / "adapter"
        if self.step == total:
            # From here on the live model *is* the exported adapter (what audits then measure).
            use_best = self.cfg.train.select_best == "val_score" and self.best_state is not None
            self.model.adapter.load_state_dict(self.best_state if use_best else self.export_state())
            if self.is_main:
                chosen = {"chosen_step": self.best_step if use_best else self.step, "selection": "best_val" if use_best else "last"}
                export_adapter(self.model.adapter, adapter_dir, extra={"run": self.cfg.name, **chosen})
        return TrainResult(self.run.root, self.step, self.skipped, self.best_step, self.best_score, adapter_dir)
