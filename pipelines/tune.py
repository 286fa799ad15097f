"""Ray Tune: search the loss weights, the confidence threshold C and the learning rate.

Objective (minimised): the validation score that also picks each job's exported checkpoint,
measured on validation prompts with the *training* perception bundle (``Trainer.validate``;
floors and penalty in the base config's ``train.selection``, see
:class:`fairness.config.SelectionConfig`): the target gap, charged where semantic similarity or
the share of faces/objects kept fall below their floors. Lowest bias among configs that keep
the images *and* what bias is measured on.
ASHA stops weak trials at checkpoints; each trial counts with its best checkpoint (the one its
job would export), and the best config is the best of the trials that ran the whole budget. The
base config's own values run as one more trial (``include_base``), so the search returns the
base unless a sampled config scores better on validation. The results table (CSV) and the best
config (YAML, a complete debias config) land in the run directory.
"""

from __future__ import annotations

import argparse
import copy
import csv
import uuid
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field

from fairness.config import DebiasConfig, get_dotted, load_config, set_dotted


_VAL_KEYS = ("val_target_gap", "val_semantic_sim", "val_objects_kept")


class TuneSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    base: str = Field(description="debias config the trials start from")
    num_samples: int = Field(8, ge=1, description="sampled configs (the base trial comes on top)")
    include_base: bool = Field(True, description="also run the base config's values of the searched keys")
    max_concurrent: int = Field(2, ge=1)
    iterations: int = Field(60, ge=1, description="training iterations per trial")
    checkpoint_every: int = Field(20, ge=1, description="report (and ASHA rung) interval")
    grace_period: int = Field(1, ge=1, description="reports before ASHA may stop a trial")
    reduction_factor: float = Field(2, gt=1)
    cpus_per_trial: float = Field(1, gt=0)
    gpus_per_trial: float = Field(0, ge=0)
    seed: int = 0
    search: dict[str, dict[str, list[float]]] = Field(
        description="dotted config key -> {uniform|loguniform|choice: [...]}")


def _space(search: dict[str, dict[str, list[float]]]) -> dict[str, Any]:
    from ray import tune

    kinds = {"uniform": lambda a: tune.uniform(*a), "loguniform": lambda a: tune.loguniform(*a), "choice": tune.choice}
    space = {}
    for key, spec in search.items():
        (kind, args), = spec.items()
        if kind not in kinds:
            raise ValueError(f"search.{key}: unknown distribution {kind!r} (use {sorted(kinds)})")
        space[key] = kinds[kind](args)
    return space


def apply_overrides(base: dict[str, Any], params: dict[str, Any]) -> DebiasConfig:
    data = copy.deepcopy(base)  # keeps key order, so best_config.yaml diffs cleanly against the base
    for dotted, value in params.items():
        set_dotted(data, dotted, value)
    return DebiasConfig.model_validate(data)


def _trial(params: dict[str, Any]) -> None:
    from ray import tune

    from fairness.training.loop import Trainer

    cfg = apply_overrides(params.pop("__base"), params)
    trial_dir = Path(tune.get_context().get_trial_dir() or ".") / "run"

    def report(step: int, path: Path | None, metrics: dict[str, Any]) -> None:
        tune.report({"step": step, **{k: metrics.get(k, float("nan")) for k in _VAL_KEYS},
                     "objective": metrics.get("val_score", float("nan"))})

    Trainer(cfg, trial_dir, on_checkpoint=report, progress=False).fit()


def run_tune(settings: TuneSettings, run_dir: str | Path) -> dict[str, Any]:
    """Run the search; writes ``results.csv`` and ``best_config.yaml`` into ``run_dir``.

    A ``run_dir`` that already holds a search resumes it under the settings it started with:
    an interrupted search goes on, a finished one is only summarised again.
    """
    import ray
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    run = Path(run_dir).resolve()
    run.mkdir(parents=True, exist_ok=True)
    base_cfg = load_config(settings.base, {"train.iterations": settings.iterations,
                                           "train.checkpoint_every": settings.checkpoint_every})
    base = base_cfg.model_dump(mode="json")
    for key in settings.search:  # fail before starting Ray on a typo'd key
        apply_overrides(base, {key: next(iter(settings.search[key].values()))[0]})
    # The base's own point comes first; one extra sample keeps the sampled candidates of a seed.
    base_point = {key: get_dotted(base, key) for key in settings.search}
    points = [base_point] if settings.include_base else []
    if not ray.is_initialized():
        ray.init(include_dashboard=False)
    space = {**_space(settings.search), "__base": base}
    trainable = tune.with_resources(_trial, {"cpu": settings.cpus_per_trial, "gpu": settings.gpus_per_trial})
    storage = run / "ray"
    previous = max((p for p in storage.glob("*") if tune.Tuner.can_restore(p)), key=lambda p: p.stat().st_mtime,
                   default=None)
    if previous:  # a search this run directory already holds: resume it (finished trials are not rerun)
        tuner = tune.Tuner.restore(str(previous), trainable, param_space=space, resume_errored=True)
    else:
        tuner = tune.Tuner(
            trainable, param_space=space,
            tune_config=tune.TuneConfig(
                metric="objective", mode="min", num_samples=settings.num_samples + len(points),
                scheduler=ASHAScheduler(max_t=max(1, settings.iterations // settings.checkpoint_every),
                                        grace_period=settings.grace_period, reduction_factor=settings.reduction_factor),
                search_alg=tune.search.BasicVariantGenerator(  # it, not TuneConfig, bounds its concurrency
                    points_to_evaluate=points, max_concurrent=settings.max_concurrent, random_state=settings.seed),
            ),
            run_config=tune.RunConfig(name=f"tune-{uuid.uuid4().hex[:8]}", storage_path=str(storage)),
        )
    grid = tuner.fit()
    rows = []
    for res in grid:
        history = res.metrics_dataframe
        if history is None or "objective" not in history or history["objective"].isna().all():
            continue
        # A trial counts with its best checkpoint, the one its job would export (select_best).
        best = history.loc[history["objective"].idxmin()]
        params = {k: v for k, v in res.config.items() if not k.startswith("__")}
        rows.append({"trial_id": res.metrics["trial_id"], "trial": "base" if params == base_point else "sampled",
                     **params,
                     **{k: float(best[k]) for k in ("objective", *_VAL_KEYS)},
                     "best_step": int(best["step"]), "steps_run": int(history["step"].max())})
    if not rows:
        raise RuntimeError("no Tune trial reported a result")
    # Trials that ran the whole budget come first, best objective first. ASHA stopped the others
    # at a rung, and their scores are not comparable: on the toy world the objective can worsen
    # with training (objects get lost), so a trial stopped after 20 iterations, barely changed,
    # would otherwise outrank every trial that trained.
    rows.sort(key=lambda r: (-r["steps_run"], r["objective"], r["trial_id"]))  # id: ties in a stable order
    with (run / "results.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    best_params = {k: v for k, v in rows[0].items() if k in settings.search}
    best_cfg = apply_overrides(load_config(settings.base).model_dump(mode="json"), best_params)
    best_cfg = best_cfg.model_copy(update={"name": f"{best_cfg.name}-tuned"})
    (run / "best_config.yaml").write_text(best_cfg.to_yaml())
    return {"best": rows[0], "trials": len(rows), "results": str(run / "results.csv"),
            "best_config": str(run / "best_config.yaml")}


def main(argv: list[str], prog: str = "fairness tune") -> int:
    parser = argparse.ArgumentParser(prog=prog, description="Search loss weights, C and lr with Ray Tune (ASHA).")
    parser.add_argument("--config", required=True, help="tune YAML (see pipelines/configs/toyworld/tune.yaml)")
    parser.add_argument("--run-dir", default=None)
    args = parser.parse_args(argv)
    data = yaml.safe_load(Path(args.config).read_text())
    settings = TuneSettings.model_validate(data)
    out = run_tune(settings, args.run_dir or Path("runs") / f"tune-{Path(args.config).stem}")
    print(yaml.safe_dump(out, sort_keys=False))
    return 0
