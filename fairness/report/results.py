"""Collect finished runs into the README's results table (markdown).

``python -m fairness.report.results runs/main runs/s1-binary ... [--out results.md]`` reads each
run's ``metrics.json`` and ``config.yaml`` and prints one row per (run, evaluated prompt set):
bias of every targeted attribute (and of their joint) before -> after, with the fair sampling
floor in brackets (the bias a perfectly fair generator scores on as many images), the share of each
conditionally targeted class, the share of images with a detected object before -> after (a
debiaser can "hide" the attribute by dropping the object; bias is measured only where there is
one), semantic accuracy before -> after, CLIP-I and DINO analogs.

``--seeds`` reads the runs as one config under several seeds (``fairness job ... --set seed=S``)
and prints the README's table of that scenario: per prompt set, the mean over the seeds of
each targeted bias before -> after with every seed's value after in brackets, semantic
accuracy, CLIP-I and the share of prompts reversed past the target. One seed cannot tell an
effect from its noise; the spread between seeds shows it.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import yaml

from fairness.metrics.audit import movements
from fairness.metrics.bias import MOVEMENTS, mean_bias_floor
from fairness.targets.distributions import TargetSpec


def _targeted(run: Path, attributes: dict[str, list[str]]) -> tuple[dict[str, Any], list[tuple[str, str, float]]]:
    """Target law of every bias name to report (each targeted attribute, and their joint), and
    (attribute, class, target share) for non-uniform marginals."""
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    laws, shares = {}, []
    for g in TargetSpec.from_dict(cfg["target"]).compile(attributes):
        laws.update(g.laws())
        for attr, classes in zip(g.attributes, g.classes):
            m = g.marginal(attr)
            if abs(m.max() - m.min()) > 1e-9:
                shares.append((attr, classes[int(m.argmin())], float(m.min())))
    return laws, shares


def _share(summary_rows: list[dict[str, Any]], attributes: dict[str, list[str]], attr: str, cls: str) -> float:
    idx = attributes[attr].index(cls)
    vals = [r["freq"][attr][idx] for r in summary_rows if r["faces"]]
    return sum(vals) / len(vals) if vals else float("nan")


def rows_for_run(run: Path) -> list[list[str]]:
    metrics = json.loads((run / "metrics.json").read_text())
    out = []
    for set_name, data in metrics["sets"].items():
        before, after = data["before"], data["after"]
        attributes = after["attributes"]
        laws, shares = _targeted(run, attributes)
        faces = [r["faces"] for r in after["prompts"]]
        bias = ", ".join(f"{n} {before['summary']['bias'][n]['mean']:.3f} → {after['summary']['bias'][n]['mean']:.3f} "
                         f"({mean_bias_floor(faces, len(after['prompts'][0]['freq'][n])):.2f})" for n in laws)
        share = ", ".join(f"{a}={c}: {_share(before['prompts'], attributes, a, c):.1%} → "
                          f"{_share(after['prompts'], attributes, a, c):.1%} (target {t:.0%})" for a, c, t in shares)
        sem_b, sem_a = before["summary"]["semantics"], after["summary"]["semantics"]
        acc = "accuracy_shape"
        fmt = lambda d, k: f"{d[k]['mean']:.3f}" if k in d else "-"  # noqa: E731
        objects = f"{before['summary']['faces']['mean']:.0%} → {after['summary']['faces']['mean']:.0%}"
        out.append([metrics.get("config", run.name), set_name, bias + (f"; {share}" if share else ""), objects,
                    f"{fmt(sem_b, acc)} → {fmt(sem_a, acc)}", fmt(sem_a, "clip_i"), fmt(sem_a, "dino")])
    return out


def markdown_table(runs: list[Path]) -> str:
    header = ["run", "prompts", "bias before → after (eval classifier)", "objects found", "semantic acc. before → after",
              "CLIP-I", "DINO"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for run in runs:
        lines += ["| " + " | ".join(r) + " |" for r in rows_for_run(run)]
    return "\n".join(lines)


def movement_table(runs: list[Path]) -> str:
    """Per run, prompt set and targeted law: the share of prompts debiasing left near the
    original, brought near the target, or reversed past it (``fairness.metrics.audit.movements``)."""
    lines = ["| run | prompts | law | kept | near target | reversed |", "|---|---|---|---|---|---|"]
    for run in runs:
        metrics = json.loads((run / "metrics.json").read_text())
        for set_name, data in metrics["sets"].items():
            laws, _ = _targeted(run, data["after"]["attributes"])
            for law, shares in movements(data["before"]["prompts"], data["after"]["prompts"], laws).items():
                lines.append(f"| {run.name} | {set_name} | {law} | "
                             + " | ".join(f"{shares[m]:.0%}" for m in MOVEMENTS) + " |")
    return "\n".join(lines)


class SeedsMismatch(ValueError):
    """The runs given to :func:`seeds_table` are not one config under distinct seeds."""


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def _semantics(data: list[dict[str, Any]], when: str, key: str) -> str:
    """The mean over seeds of one semantic metric, "-" where a world has no such metric."""
    vals = [d[when]["summary"]["semantics"].get(key, {}).get("mean") for d in data]
    return "-" if None in vals else f"{_mean(vals):.3f}"


def seeds_table(runs: list[Path]) -> str:
    """Markdown: one row per prompt set, the mean over ``runs`` (one config, distinct seeds)."""
    metrics = [json.loads((r / "metrics.json").read_text()) for r in runs]
    configs = [yaml.safe_load((r / "config.yaml").read_text()) for r in runs]
    names, seeds = {m.get("config") for m in metrics}, [c.get("seed") for c in configs]
    if len(names) > 1:
        raise SeedsMismatch(f"the runs ran different configs {sorted(map(str, names))}: give one config's seeds")
    if len(set(seeds)) < len(seeds):
        raise SeedsMismatch(f"the runs share a seed ({seeds}): each seed once")
    sets = list(metrics[0]["sets"])
    for run, m in zip(runs[1:], metrics[1:]):
        if list(m["sets"]) != sets:
            raise SeedsMismatch(f"{run}: its prompt sets {list(m['sets'])} differ from {runs[0]}'s {sets}")
    lines = ["| prompts | bias before → after, mean (each seed after) [fair floor] | semantic acc. | CLIP-I | reversed |",
             "|---|---|---|---|---|"]
    for set_name in sets:
        data = [m["sets"][set_name] for m in metrics]
        attributes = data[0]["after"]["attributes"]
        laws, shares = _targeted(runs[0], attributes)
        moved = [movements(d["before"]["prompts"], d["after"]["prompts"], laws) for d in data]
        biases, reversed_ = [], []
        for n in laws:
            b = _mean([d["before"]["summary"]["bias"][n]["mean"] for d in data])
            a = [d["after"]["summary"]["bias"][n]["mean"] for d in data]
            floor = mean_bias_floor([r["faces"] for r in data[0]["after"]["prompts"]],
                                    len(data[0]["after"]["prompts"][0]["freq"][n]))
            each = f" ({', '.join(f'{x:.3f}' for x in a)})" if len(a) > 1 else ""
            biases.append(f"{n} {b:.3f} → {_mean(a):.3f}{each} [{floor:.2f}]")
            reversed_.append(f"{n} {_mean([m[n]['reversed'] for m in moved]):.0%}")
        for attr, cls, target in shares:  # a non-uniform marginal: its minority class's share
            before = _mean([_share(d["before"]["prompts"], attributes, attr, cls) for d in data])
            after = [_share(d["after"]["prompts"], attributes, attr, cls) for d in data]
            each = f" ({', '.join(f'{x:.1%}' for x in after)})" if len(after) > 1 else ""
            biases.append(f"{attr}={cls} {before:.1%} → {_mean(after):.1%}{each} (target {target:.0%})")
        lines.append(f"| {set_name} ({len(data[0]['after']['prompts'])}) | {'; '.join(biases)} | "
                     f"{_semantics(data, 'before', 'accuracy_shape')} → {_semantics(data, 'after', 'accuracy_shape')} | "
                     f"{_semantics(data, 'after', 'clip_i')} | {', '.join(reversed_)} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fairness.report.results", description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", help="run directories with metrics.json")
    parser.add_argument("--out", default=None)
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--movement", action="store_true",
                      help="instead, where debiasing moved each prompt: kept, near the target, or reversed")
    mode.add_argument("--seeds", action="store_true",
                      help="instead, the runs are one config under several seeds: one table, their mean")
    args = parser.parse_args(argv)
    runs = [Path(r) for r in args.runs]
    if args.seeds:
        try:
            table = seeds_table(runs)
        except SeedsMismatch as e:
            parser.error(str(e))
    else:
        table = movement_table(runs) if args.movement else markdown_table(runs)
    if args.out:
        Path(args.out).write_text(table + "\n")
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
