"""Collect finished runs into the README's results table (markdown).

``python -m fairness.report.results runs/main runs/s1-binary ... [--out results.md]`` reads each
run's ``metrics.json`` and ``config.yaml`` and prints one row per (run, evaluated prompt set):
bias of every targeted attribute (and of their joint) before -> after, with the fair sampling
floor in brackets (the bias a perfectly fair generator scores on as many images), the share of each
conditionally targeted class, the share of images with a detected object before -> after (a
debiaser can "hide" the attribute by dropping the object; bias is measured only where there is
one), semantic accuracy before -> after, CLIP-I and DINO analogs.
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fairness.report.results", description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", help="run directories with metrics.json")
    parser.add_argument("--out", default=None)
    parser.add_argument("--movement", action="store_true",
                        help="instead, where debiasing moved each prompt: kept, near the target, or reversed")
    args = parser.parse_args(argv)
    runs = [Path(r) for r in args.runs]
    table = movement_table(runs) if args.movement else markdown_table(runs)
    if args.out:
        Path(args.out).write_text(table + "\n")
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
