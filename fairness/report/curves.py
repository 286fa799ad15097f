"""Do two training setups give the same curves, within the noise between seeds?

``python -m fairness.report.curves --a exact RUN RUN ... --b fast RUN RUN ... [--window 20]
[--out PREFIX]`` reads each run folder's ``log.jsonl`` and ``val.jsonl`` and compares the two
groups point by point: each training-loss key averaged over windows of ``window`` iterations,
and each validation metric at every validation step. At each point it takes the two groups'
means and the *seed spread*: the larger of the two groups' max - min over their runs. The
groups agree at a point when the gap between their means is no larger than that spread, i.e.
when swapping one setup for the other moves the curve no more than changing the seed does.

One seed per group cannot tell a setup's effect from its noise, so each group needs at least
two runs. It is how the fast step-subsampled gradient is checked against the exact one on the
demo (``docs/performance.md``), and it works for any two configs (a learning rate, a batch).
Writes ``PREFIX.md`` (the tables), ``PREFIX.json`` and ``PREFIX.png`` (every run's curves).
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
from matplotlib.figure import Figure

from fairness.training.rundir import RunDir

LOSS_KEYS = ("loss/total", "loss/align", "loss/img")
VAL_KEYS = ("val_target_gap", "val_semantic_sim", "val_objects_kept")
GROUP_COLORS = ("#d62728", "#1f77b4")


@dataclass(frozen=True)
class Point:
    key: str
    step: int  # the window's last iteration, or the validation step
    mean_a: float
    mean_b: float
    spread: float  # the larger group's max - min over its seeds

    @property
    def gap(self) -> float:
        return abs(self.mean_a - self.mean_b)

    @property
    def within_noise(self) -> bool:
        return self.gap <= self.spread


def _rows(run: Path, which: str) -> list[dict]:
    rd = RunDir(run)
    rows = rd.read_rows(rd.log_path if which == "log" else rd.val_path)
    if not rows:
        raise FileNotFoundError(f"{run}: no {which} rows (is it a run folder of `fairness train` or `fairness job`?)")
    return rows


def windowed(rows: Sequence[Mapping], key: str, window: int) -> dict[int, float]:
    """Mean of ``key`` over iterations (end - window, end], keyed by ``end``; non-finite and
    skipped iterations left out, an incomplete last window dropped."""
    by_step = {int(r["step"]): float(r[key]) for r in rows
               if key in r and not r.get("skipped") and np.isfinite(float(r[key]))}
    last = max((int(r["step"]) for r in rows), default=0)
    out = {}
    for end in range(window, last + 1, window):
        vals = [v for s, v in by_step.items() if end - window < s <= end]
        if vals:
            out[end] = float(np.mean(vals))
    return out


def validation(rows: Sequence[Mapping], key: str) -> dict[int, float]:
    return {int(r["step"]): float(r[key]) for r in rows if key in r}


Series = dict[str, list[dict[int, float]]]


def series(runs: Sequence[Path], window: int) -> Series:
    """key -> one {step: value} per run."""
    out: Series = {}
    logs = [_rows(r, "log") for r in runs]
    vals = [_rows(r, "val") for r in runs]
    for key in LOSS_KEYS:
        if all(any(key in row for row in log) for log in logs):
            out[key] = [windowed(log, key, window) for log in logs]
    for key in VAL_KEYS:
        if all(any(key in row for row in val) for val in vals):
            out[key] = [validation(val, key) for val in vals]
    return out


def load_groups(a: Sequence[Path], b: Sequence[Path], window: int = 20) -> tuple[Series, Series]:
    """Both groups' series; each group needs two runs or more."""
    for name, group in (("--a", a), ("--b", b)):
        if len(group) < 2:
            raise ValueError(f"{name} has {len(group)} run(s): the noise between seeds needs at least 2 per group")
    return series(a, window), series(b, window)


def compare(sa: Series, sb: Series) -> list[Point]:
    """Every point (key, step) that all runs of both groups have."""
    points = []
    for key in (k for k in sa if k in sb):
        runs = sa[key] + sb[key]
        for step in sorted(set.intersection(*(set(r) for r in runs))):
            va = np.array([r[step] for r in sa[key]])
            vb = np.array([r[step] for r in sb[key]])
            spread = max(float(va.max() - va.min()), float(vb.max() - vb.min()))
            points.append(Point(key, step, float(va.mean()), float(vb.mean()), spread))
    if not points:
        raise ValueError("the two groups share no logged key at a common step")
    return points


def markdown(points: Sequence[Point], name_a: str, name_b: str) -> str:
    lines = []
    for key in dict.fromkeys(p.key for p in points):
        pts = [p for p in points if p.key == key]
        lines += [f"**{key}**: {sum(p.within_noise for p in pts)} of {len(pts)} points within the seed spread", "",
                  f"| step | {name_a} | {name_b} | gap | seed spread | within noise |", "|---|---|---|---|---|---|"]
        lines += [f"| {p.step} | {p.mean_a:.4f} | {p.mean_b:.4f} | {p.gap:.4f} | {p.spread:.4f} | "
                  f"{'yes' if p.within_noise else 'no'} |" for p in pts]
        lines.append("")
    total = sum(p.within_noise for p in points)
    lines.append(f"All: {total} of {len(points)} points within the seed spread.")
    return "\n".join(lines) + "\n"


def plot(sa: Series, sb: Series, name_a: str, name_b: str, out_png: Path) -> Path:
    """One panel per key, every run's curve, one colour per group."""
    keys = [k for k in sa if k in sb]
    ncols = min(3, len(keys))
    nrows = -(-len(keys) // ncols)
    fig = Figure(figsize=(4.2 * ncols, 3.2 * nrows), dpi=100, layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax in axes[len(keys):]:
        ax.set_axis_off()
    for ax, key in zip(axes, keys):
        for group, name, color in ((sa, name_a, GROUP_COLORS[0]), (sb, name_b, GROUP_COLORS[1])):
            for i, run in enumerate(group[key]):
                steps = sorted(run)
                ax.plot(steps, [run[s] for s in steps], color=color, marker="o", markersize=3,
                        linestyle=("-", "--", ":", "-.")[i % 4], label=f"{name} #{i}")
        ax.set_title(key, fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png)
    return out_png


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m fairness.report.curves", description=__doc__.split("\n\n")[0])
    ap.add_argument("--a", nargs="+", required=True, metavar=("NAME", "RUN"), help="a name, then its run folders")
    ap.add_argument("--b", nargs="+", required=True, metavar=("NAME", "RUN"), help="a name, then its run folders")
    ap.add_argument("--window", type=int, default=20, help="iterations per training-loss point (default 20)")
    ap.add_argument("--out", type=Path, help="write PREFIX.md, PREFIX.json and PREFIX.png")
    args = ap.parse_args(argv)
    (name_a, *runs_a), (name_b, *runs_b) = args.a, args.b
    runs_a, runs_b = [Path(r) for r in runs_a], [Path(r) for r in runs_b]
    try:
        sa, sb = load_groups(runs_a, runs_b, args.window)
        points = compare(sa, sb)
    except (ValueError, FileNotFoundError) as e:
        ap.error(str(e))
    text = markdown(points, name_a, name_b)
    print(text, end="")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.with_suffix(".md").write_text(text)
        args.out.with_suffix(".json").write_text(json.dumps(
            {"a": {"name": name_a, "runs": [str(r) for r in runs_a]}, "b": {"name": name_b, "runs": [str(r) for r in runs_b]},
             "window": args.window,
             "points": [{**asdict(p), "gap": p.gap, "within_noise": p.within_noise} for p in points]}, indent=2))
        plot(sa, sb, name_a, name_b, args.out.with_suffix(".png"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
