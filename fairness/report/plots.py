"""Matplotlib figures for the report: group frequencies vs target, loss curves, bias summary.

Figures are built on :class:`matplotlib.figure.Figure` directly (no ``pyplot``), so they never
touch global state or need a display, and are safe to make from worker threads. Sizes are
explicit (``figsize`` x ``dpi`` = pixel size) so reports look the same on every machine.
"""

from __future__ import annotations

import math
import os
import textwrap
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch

from fairness.report.grids import class_colors

BEFORE_COLOR = "#9e9e9e"
AFTER_COLOR = "#1f77b4"
TARGET_STYLE = {"color": "black", "linestyle": "--", "linewidth": 1.2}
BAND_COLOR = "#ffd54f"
BAR_WIDTH = 0.38


def _rgb(color: tuple[int, int, int]) -> tuple[float, float, float]:
    return color[0] / 255, color[1] / 255, color[2] / 255


def _safe(text: str) -> str:
    """Escape ``$`` so prompts such as "a $5 bill" are not parsed as mathtext."""
    return text.replace("$", r"\$")


def _short_labels(prompts: Sequence[str]) -> tuple[list[str], str]:
    """Drop the text all prompts share at the start and end (the prompt template).

    "a photo of the face of a {doctor, nurse}, a person" becomes tick labels "doctor" / "nurse"
    and the template goes into the axis label, so 50 occupations stay legible. Cuts snap to
    word boundaries ("doctor" / "actor" keep their common "ctor").
    """
    if len(prompts) < 2:
        return list(prompts), ""
    prefix = os.path.commonprefix(list(prompts))
    while prefix and prefix[-1].isalnum():
        prefix = prefix[:-1]
    rest = [p[len(prefix):] for p in prompts]
    suffix = os.path.commonprefix([r[::-1] for r in rest])[::-1]
    while suffix and suffix[0].isalnum():
        suffix = suffix[1:]
    labels = [r[:len(r) - len(suffix)].strip() for r in rest]
    if not (prefix or suffix) or not all(labels):
        return list(prompts), ""
    return labels, f"{prefix}{{…}}{suffix}"


def _freqs(row: Mapping[str, Mapping[str, float]], key: str, classes: Sequence[str]) -> np.ndarray:
    """Frequencies of ``classes`` in ``row[key]`` (missing class or NaN = 0: nothing to draw)."""
    values = row.get(key) or {}
    return np.nan_to_num(np.array([float(values.get(c, 0.0)) for c in classes]), nan=0.0)


def _save(fig: Figure, out_png: Path) -> Path:
    out = Path(out_png)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, format="png", dpi=fig.dpi)
    return out


def plot_group_frequencies(rows: Sequence[Mapping[str, object]], attribute: str, classes: Sequence[str],
                           target: Mapping[str, float], out_png: Path,
                           figsize: tuple[float, float] | None = None, dpi: int = 100,
                           band: tuple[float, float] | None = None) -> Path:
    """Per-prompt group frequencies before vs after debiasing, against the target.

    Each row is ``{"prompt": str, "before": {class: freq}, "after": {class: freq}}``. With two
    classes one bar per model shows the share of ``classes[1]`` and a dashed line its target;
    with K classes the bars are stacked (before hatched) and dashed lines mark the target's
    cumulative class boundaries, so a bar whose segment edges sit on the lines is on target.
    ``band`` (two classes only) shades the shares of ``classes[1]`` that the alignment loss
    leaves alone (:func:`fairness.targets.assignment.binary_tolerance`), so a bar inside it is
    as close to the target as the loss asks for.
    """
    if len(classes) < 2:
        raise ValueError(f"need at least two classes for {attribute!r}, got {list(classes)}")
    missing = [c for c in classes if c not in target]
    if missing:
        raise KeyError(f"target for {attribute!r} lacks classes {missing}")
    prompts = [str(r["prompt"]) for r in rows]
    labels, template = _short_labels(prompts)
    n = len(rows)
    figsize = figsize or (min(max(6.0, 0.45 * n + 2.5), 30.0), 4.8)
    legend_cols = max(1, int(figsize[0] / 1.7))
    fig = Figure(figsize=figsize, dpi=dpi, layout="constrained")
    ax = fig.add_subplot()
    x = np.arange(n)
    before = np.array([_freqs(r, "before", classes) for r in rows]).reshape(n, len(classes))
    after = np.array([_freqs(r, "after", classes) for r in rows]).reshape(n, len(classes))
    if band is not None and len(classes) != 2:
        raise ValueError(f"a tolerance band needs two classes, {attribute!r} has {len(classes)}")
    if len(classes) == 2:
        if band is not None:
            ax.axhspan(*band, color=BAND_COLOR, alpha=0.35, linewidth=0,
                       label=f"DAL tolerance {band[0]:.2f}-{band[1]:.2f}")
        ax.bar(x - BAR_WIDTH / 2, before[:, 1], BAR_WIDTH, color=BEFORE_COLOR, label="before")
        ax.bar(x + BAR_WIDTH / 2, after[:, 1], BAR_WIDTH, color=AFTER_COLOR, label="after")
        ax.axhline(float(target[classes[1]]), label=f"target {float(target[classes[1]]):.2f}", **TARGET_STYLE)
        ax.set_ylabel(_safe(f"share of {classes[1]}"))
        fig.legend(loc="outside upper center", ncols=3 if band is None else min(4, legend_cols), frameon=False)
    else:
        colors = [_rgb(c) for c in class_colors({attribute: classes})[attribute]]
        for offset, freqs, hatch in ((-BAR_WIDTH / 2, before, "///"), (BAR_WIDTH / 2, after, None)):
            bottom = np.zeros(n)
            for k in range(len(classes)):
                ax.bar(x + offset, freqs[:, k], BAR_WIDTH, bottom=bottom, color=colors[k], hatch=hatch,
                       edgecolor="white", linewidth=0.5)
                bottom += freqs[:, k]
        for boundary in np.cumsum([float(target[c]) for c in classes])[:-1]:
            ax.axhline(float(boundary), **TARGET_STYLE)
        ax.set_ylabel("group frequency")
        handles = [Patch(color=c, label=_safe(name)) for c, name in zip(colors, classes)]
        handles += [Patch(facecolor="white", edgecolor="grey", hatch="///", label="before (hatched)"),
                    Line2D([], [], label="target boundaries", **TARGET_STYLE)]
        fig.legend(handles=handles, loc="outside upper center", ncols=min(len(handles), legend_cols), frameon=False)
    ax.set_ylim(0, 1)
    ax.set_xlim(-0.6, max(n - 0.4, 0.6))
    ax.set_xticks(x, [_safe(textwrap.shorten(s, 40, placeholder="…")) for s in labels],
                  rotation=45 if n > 4 else 0, ha="right" if n > 4 else "center")
    ax.set_xlabel(_safe(f"prompt: {template}") if template else "prompt")
    ax.set_title(_safe(attribute), loc="left")
    ax.grid(axis="y", alpha=0.3)
    ax.set_axisbelow(True)  # grid lines behind the bars
    return _save(fig, out_png)


def _loss_keys(log_rows: Sequence[Mapping[str, object]]) -> list[str]:
    """Every ``loss/*`` key in order of first appearance, with ``loss/total`` first."""
    keys = list(dict.fromkeys(k for r in log_rows for k in r if k.startswith("loss/")))
    return sorted(keys, key=lambda k: k != "loss/total")


def _series(log_rows: Sequence[Mapping[str, object]], key: str) -> tuple[np.ndarray, np.ndarray, int]:
    """(steps, finite values, number of non-finite values) of one loss; step = row index if absent."""
    steps, values, bad = [], [], 0
    for i, r in enumerate(log_rows):
        if key not in r:
            continue
        try:
            v = float(r[key])  # type: ignore[arg-type]
        except (TypeError, ValueError):
            v = math.nan
        if not math.isfinite(v):
            bad += 1
            continue
        steps.append(float(r.get("step", i)))  # type: ignore[arg-type]
        values.append(v)
    return np.array(steps), np.array(values), bad


def _smooth(values: np.ndarray) -> np.ndarray:
    """Centred running mean over ~5 % of the points: the trend of a noisy per-step loss."""
    window = max(3, len(values) // 20) | 1
    padded = np.pad(values, window // 2, mode="edge")
    return np.convolve(padded, np.ones(window) / window, mode="valid")


def _draw_loss(ax: Axes, steps: np.ndarray, values: np.ndarray) -> None:
    if len(values) > 25:
        ax.plot(steps, values, color=AFTER_COLOR, alpha=0.3, linewidth=0.8)
        ax.plot(steps, _smooth(values), color=AFTER_COLOR, linewidth=1.6)
    else:
        ax.plot(steps, values, color=AFTER_COLOR, marker="o", markersize=3, linewidth=1.2)


def plot_loss_curves(log_rows: Sequence[Mapping[str, object]], out_png: Path, dpi: int = 100,
                     keys: Sequence[str] | None = None) -> Path:
    """One subplot per ``loss/*`` key (or per key of ``keys``, e.g. the validation metrics)
    against ``step``: losses have very different scales.

    Rows missing a key are skipped for that key; NaN / inf values are left out and counted in
    the subplot title, because a NaN-skipped step is worth seeing, not hiding.
    """
    keys = list(keys) if keys is not None else _loss_keys(log_rows)
    ncols = min(3, max(len(keys), 1))
    nrows = max(math.ceil(len(keys) / ncols), 1)
    fig = Figure(figsize=(4.2 * ncols, 3.0 * nrows), dpi=dpi, layout="constrained")
    if not keys:
        ax = fig.add_subplot()
        ax.text(0.5, 0.5, "no loss values logged", ha="center", va="center", transform=ax.transAxes)
        ax.set_axis_off()
        return _save(fig, out_png)
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax, key in zip(axes, keys):
        steps, values, bad = _series(log_rows, key)
        ax.set_title(_safe(key + (f" ({bad} non-finite)" if bad else "")), fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if len(values):
            _draw_loss(ax, steps, values)
        else:
            ax.text(0.5, 0.5, "no finite values", ha="center", va="center", transform=ax.transAxes)
    for ax in axes[len(keys):]:
        ax.set_axis_off()
    return _save(fig, out_png)


def plot_bias_summary(summary: Mapping[str, Mapping[str, float]], out_png: Path, dpi: int = 100) -> Path:
    """Bias per attribute (or joint), before vs after, as grouped bars labelled with values.

    ``summary`` is ``{attr: {"before": x, "after": y}}``; a NaN (no faces) draws no bar and is
    labelled "n/a" rather than silently shown as a perfect 0.
    """
    names = list(summary)
    n = len(names)
    fig = Figure(figsize=(max(4.0, 1.3 * n + 2.0), 3.8), dpi=dpi, layout="constrained")
    ax = fig.add_subplot()
    x = np.arange(n)
    for offset, key, color in ((-BAR_WIDTH / 2, "before", BEFORE_COLOR), (BAR_WIDTH / 2, "after", AFTER_COLOR)):
        values = np.array([float(summary[a].get(key, math.nan)) for a in names])
        bars = ax.bar(x + offset, np.nan_to_num(values, nan=0.0), BAR_WIDTH, color=color, label=key)
        ax.bar_label(bars, labels=["n/a" if math.isnan(v) else f"{v:.2f}" for v in values], fontsize=8, padding=2)
    ax.set_xticks(x, [_safe(a) for a in names])
    ax.set_ylabel("bias (0 = balanced)")
    ax.set_ylim(0, max(1.0, ax.get_ylim()[1]))
    ax.legend(frameon=False)
    ax.grid(axis="y", alpha=0.3)
    ax.set_axisbelow(True)  # grid lines behind the bars
    return _save(fig, out_png)

