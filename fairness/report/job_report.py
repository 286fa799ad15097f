"""The main job's report: figures and tables from the before/after audits and the training log."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

from fairness.config import DebiasConfig
from fairness.metrics.audit import AuditResult, PromptImages, movements
from fairness.metrics.bias import MOVEMENTS
from fairness.report.grids import before_after_grid
from fairness.report.html import Section, Table, format_text_table, paper_table, write_report
from fairness.report.plots import plot_bias_summary, plot_group_frequencies, plot_loss_curves
from fairness.targets.assignment import binary_tolerance
from fairness.targets.distributions import TargetGroup
from fairness.training.rundir import RunDir


def _grid_kwargs(p: PromptImages, classes: dict[str, list[str]]) -> dict[str, Any]:
    return {"images": p.images, "probs": {a: p.probs[a] for a in classes}, "classes": classes, "boxes": p.boxes,
            "found": p.found, "labels": [str(i) for i in range(len(p.images))]}


def _targets(groups: list[TargetGroup]) -> dict[str, dict[str, float]]:
    """Per targeted attribute, its target marginal ``{class: p}``."""
    out = {}
    for g in groups:
        for attr, classes in zip(g.attributes, g.classes):
            out[attr] = dict(zip(classes, g.marginal(attr).tolist()))
    return out


def tolerance_bands(cfg: DebiasConfig, groups: list[TargetGroup]) -> dict[str, tuple[float, float]]:
    """Per binary attribute targeted on its own, the shares of its second class the DAL leaves alone.

    Joint groups get none: their marginal targets come from OT over the joint classes, which
    has no closed form.
    """
    n = cfg.train.images_per_prompt
    out = {}
    for g in groups:
        if len(g.attributes) == 1 and len(g.classes[0]) == 2:
            attr = g.attributes[0]
            lo, hi = binary_tolerance(n, float(g.probs[1]), cfg.loss.threshold(attr))
            out[attr] = (lo / n, hi / n)
    return out


def _summary_tables(before: Mapping[str, AuditResult], after: Mapping[str, AuditResult]):
    tables = []
    for name, res in after.items():
        attrs = list(res.summary["bias"])
        sem = list(res.summary["semantics"])
        table = paper_table(before[name].summary, res.summary, attrs, sem)
        table.caption = f"{name}: bias (mean ± std over prompts, lower is better) and semantics"
        tables.append(table)
    return tables


def _agreement_tables(before: Mapping[str, AuditResult], after: Mapping[str, AuditResult]) -> list[Table]:
    """Per prompt set, how often the training classifier names the evaluation classifier's class."""
    tables = []
    for name, res in after.items():
        attrs = list(res.summary.get("agreement", {}))
        if attrs:
            rows = [[model, *[summary.get("agreement", {}).get(a) for a in attrs]]
                    for model, summary in (("original", before[name].summary), ("debiased", res.summary))]
            tables.append(Table(columns=["model", *attrs], rows=rows,
                                caption=f"{name}: training vs evaluation classifier, share of objects found on which "
                                        "they name the same class (mean ± std over prompts)"))
    return tables


def _movement_tables(groups: list[TargetGroup], before: Mapping[str, AuditResult],
                     after: Mapping[str, AuditResult]) -> list[Table]:
    """Per prompt set, where debiasing moved each prompt's law of every targeted attribute."""
    laws = {name: law for g in groups for name, law in g.laws().items()}
    tables = []
    for name, res in after.items():
        shares = movements(before[name].rows, res.rows, laws)
        if shares:
            tables.append(Table(columns=["law", *MOVEMENTS], rows=[[law, *[s[m] for m in MOVEMENTS]]
                                                                 for law, s in shares.items()],
                                caption=f"{name}: share of prompts whose law debiasing left on the original's side "
                                        "with at least half its distance to the target (kept), brought within half "
                                        "of it (near), or carried past the target by at least half of it (reversed: "
                                        "the stereotype swapped, which mean bias cannot tell from one kept)"))
    return tables


def paper_table_text(before: Mapping[str, AuditResult], after: Mapping[str, AuditResult]) -> str:
    """The paper-style tables, one per evaluated prompt set, as aligned text."""
    return "\n\n".join(format_text_table(t) for t in _summary_tables(before, after))


def _logged(rows: list[dict], keys: tuple[str, ...]) -> list[str]:
    """The ``keys`` some row carries, in order: older run directories lack the newer keys."""
    return [k for k in keys if any(k in r for r in rows)]


def write_job_report(run_dir: Path, cfg: DebiasConfig, groups: list[TargetGroup],
                     before: Mapping[str, AuditResult], after: Mapping[str, AuditResult]) -> Path:
    run = RunDir(run_dir)
    figs = run.root / "figures"
    figs.mkdir(exist_ok=True)
    targets = _targets(groups)
    bands = tolerance_bands(cfg, groups)
    sections = [Section(
        title="Summary",
        text=(f"Config {cfg.name!r}: {cfg.adapter.kind} adapter, {cfg.dft.mode} DFT, "
              f"{cfg.train.iterations} iterations of {cfg.train.images_per_prompt} images. "
              f"Bias is the paper's metric (mean over class pairs of |freq_i - freq_j|), measured with the "
              f"evaluation classifier on {cfg.audit_images_per_prompt} images per prompt from the same noise "
              f"before and after. The agreement tables say how often the training classifier, the one the "
              f"loss pushes, names the same class: low before debiasing, the two read the generator's images "
              f"differently, so a target met for one is not met for the other; lower after it, the adapter "
              f"draws objects the two read differently, and on a targeted attribute it may have moved the "
              f"training classifier rather than the attribute."),
        images=[plot_bias_summary({k: {"before": before[n].summary["bias"][k]["mean"], "after": v["mean"]}
                                   for k, v in after[n].summary["bias"].items()}, figs / f"bias_{n}.png")
                for n in after],
        tables=_summary_tables(before, after) + _movement_tables(groups, before, after)
               + _agreement_tables(before, after),
    )]
    for name, res in after.items():
        images = []
        for attr, target in targets.items():
            classes = res.attributes[attr]
            rows = [{"prompt": b["prompt"],
                     "before": dict(zip(classes, b["freq"][attr])), "after": dict(zip(classes, a["freq"][attr]))}
                    for b, a in zip(before[name].rows, res.rows)]
            images.append(plot_group_frequencies(rows, attr, classes, target, figs / f"freq_{name}_{attr}.png",
                                                 band=bands.get(attr)))
        text = "Dashed lines: the target distribution."
        if bands:
            text += (f" Shaded: the shares for which a training batch of {cfg.train.images_per_prompt} images gets no "
                     "alignment gradient, the tolerance the loss allows per prompt ("
                     + "; ".join(f"{a}: {lo:.2f}-{hi:.2f} at confidence threshold {cfg.loss.threshold(a)}"
                                 for a, (lo, hi) in bands.items()) + ").")
        sections.append(Section(title=f"Group frequencies per prompt: {name}", text=text, images=images))
        grids = []
        for i, (orig, deb) in enumerate(zip(res.originals, res.images)):
            classes = {a: res.attributes[a] for a in targets}
            grids.append(before_after_grid(_grid_kwargs(orig, classes), _grid_kwargs(deb, classes),
                                           figs / f"grid_{name}_{i}.png", titles=(f"original: {orig.prompt}", "debiased")))
        if grids:
            sections.append(Section(
                title=f"Images before and after: {name}",
                text="Same number = same initial noise. Bars: predicted class per attribute (height = confidence); "
                     "boxes: the detected region.", images=grids))
    log = run.read_rows(run.log_path)
    if log:
        face_keys = _logged(log, ("faces", "faces_lost"))
        attributes = [a for g in groups for a in g.attributes]
        pressure_keys = _logged(log, tuple(f"{kind}/{a}" for a in attributes for kind in ("confident", "pushed")))
        sections.append(Section(
            title="Training losses",
            text="faces: share of each training batch with a detected face/object. faces_lost: share whose "
                 "original had one and which has none; such images leave the alignment loss, so a rising "
                 "curve means the adapter erases rather than edits (loss.lost_face_weight). "
                 "confident/<attribute>: share of the batch whose target reaches the confidence threshold, "
                 "the images the alignment loss counts; pushed/<attribute>: those of them whose target "
                 "differs from the class the training classifier sees, the images it is moving. A batch "
                 "inside the tolerance band gets none pushed.",
            images=[plot_loss_curves(log, figs / "losses.png")]
            + ([plot_loss_curves(log, figs / "faces.png", keys=face_keys)] if face_keys else [])
            + ([plot_loss_curves(log, figs / "alignment.png", keys=pressure_keys)] if pressure_keys else [])))
    val = run.read_rows(run.val_path)
    val_keys = _logged(val, ("val_score", "val_target_gap", "val_semantic_sim", "val_objects_kept"))
    if val_keys:
        sections.append(Section(
            title="Validation (training perception, validation prompts)",
            text="Target gap: mean total variation of the joint and marginal laws from the target (lower is "
                 "better). Semantic similarity and objects kept are measured against the original images. Score: "
                 "the gap plus a penalty where similarity or objects kept fall below their floors "
                 "(train.selection); the exported adapter is the checkpoint where it is lowest unless "
                 "train.select_best is 'last'.",
            images=[plot_loss_curves(val, figs / "validation.png", keys=val_keys)]))
    return write_report(run.root / "report.html", f"fairness report: {cfg.name}", sections)
