"""The comparison's tables (CSV, markdown, console) and its one-file HTML page.

One table per prompt set, one row per (law, method): bias per attribute and joint attribute
(the paper's metric), the distance of each targeted attribute from the law (bias alone cannot
score a 75/25 target), semantics, objects found, seconds per image and the one-time training
cost. The page adds per-prompt frequency plots of every method against the original and the
law, and every method's annotated grid of the same noise side by side.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import TYPE_CHECKING, Any

from PIL import Image, ImageDraw

from fairness.report.grids import BACKGROUND, PAD, TEXT, render_grid
from fairness.report.html import (
    Section,
    Table,
    format_cell,
    format_text_table,
    write_report,
)
from fairness.report.plots import plot_group_frequencies

if TYPE_CHECKING:
    from fairness.baselines.compare import CompareResult, MethodRun


def _columns(runs: list[MethodRun]) -> tuple[list[str], list[str], list[str]]:
    first = runs[0].audit.summary
    groups = list(first["bias"])
    semantics = sorted({m for r in runs for m in r.audit.summary["semantics"]})
    targeted = sorted({a for r in runs for a in r.target_gap})
    return groups, semantics, targeted


def comparison_table(result: CompareResult, prompt_set: str) -> Table:
    """The table of one prompt set (mean±std over prompts where the audit gives one)."""
    runs = [r for r in result.runs if r.prompt_set == prompt_set]
    groups, semantics, targeted = _columns(runs)
    columns = (["law", "method", *[f"bias {g}" for g in groups], *[f"gap {a}" for a in targeted], *semantics,
                "objects found", "s/image", "training s"])
    rows = []
    for r in runs:
        s = r.audit.summary
        rows.append([r.law, r.method, *[s["bias"][g] for g in groups], *[r.target_gap.get(a) for a in targeted],
                     *[s["semantics"].get(m) for m in semantics], s["faces"], r.seconds_per_image,
                     r.training_seconds])
    caption = (f"{prompt_set}: bias (mean±std over prompts, 0 = balanced) and gap (total variation of each prompt's "
               "frequencies from the law; lower is better), semantics against the original model's images from "
               "the same noise, share of images with an object, inference seconds per image, one-time training "
               "seconds ('-': not recorded)")
    return Table(columns=columns, rows=rows, caption=caption)


def markdown(table: Table) -> str:
    lines = ["| " + " | ".join(table.columns) + " |", "|" + "---|" * len(table.columns)]
    lines += ["| " + " | ".join(format_cell(v) for v in row) + " |" for row in table.rows]
    return "\n".join(lines)


def _plain(value: Any) -> Any:
    return value["mean"] if isinstance(value, dict) and "mean" in value else value


def write_tables(result: CompareResult, out: Path) -> dict[str, Path]:
    """Per prompt set ``compare_<set>.csv`` (means) and ``compare_<set>.md``; prints nothing."""
    paths = {}
    for name in dict.fromkeys(r.prompt_set for r in result.runs):
        table = comparison_table(result, name)
        paths[f"csv_{name}"] = out / f"compare_{name}.csv"
        with paths[f"csv_{name}"].open("w", newline="") as f:
            w = csv.writer(f)
            w.writerow(table.columns)
            w.writerows([[_plain(v) for v in row] for row in table.rows])
        paths[f"md_{name}"] = out / f"compare_{name}.md"
        paths[f"md_{name}"].write_text(markdown(table) + "\n")
    return paths


def tables_text(result: CompareResult) -> str:
    return "\n\n".join(format_text_table(comparison_table(result, n))
                       for n in dict.fromkeys(r.prompt_set for r in result.runs))


def side_by_side(grids: list[Image.Image], titles: list[str]) -> Image.Image:
    """Grids in one row, each under its title (the same noise in the same cells)."""
    draw_probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    title_h = draw_probe.textbbox((0, 0), "Ag")[3] + 2 * PAD
    width = sum(g.width for g in grids) + 3 * PAD * (len(grids) - 1)
    canvas = Image.new("RGB", (width, title_h + max(g.height for g in grids)), BACKGROUND)
    draw, x = ImageDraw.Draw(canvas), 0
    for grid, title in zip(grids, titles):
        canvas.paste(grid, (x, title_h))
        draw.text((x + PAD, PAD), title, fill=TEXT)
        x += grid.width + 3 * PAD
    return canvas


def _grid(run: MethodRun, index: int, classes: dict[str, list[str]], n: int) -> Image.Image:
    p = run.audit.images[index]
    return render_grid(p.images[:n], {a: p.probs[a][:n] for a in classes}, classes, p.boxes[:n], p.found[:n],
                       ncols=min(n, 4), labels=[str(i) for i in range(min(n, len(p.images)))])


def write_compare_report(result: CompareResult, out: Path) -> Path:
    """``compare.html``: the tables, frequency plots per law and method, grids side by side."""
    figs = out / "figures"
    figs.mkdir(parents=True, exist_ok=True)
    sets = list(dict.fromkeys(r.prompt_set for r in result.runs))
    skipped = "; ".join(f"{s['method']} under {s['law']}: {s['why']}" for s in result.skipped)
    sections = [Section(
        title="Summary",
        text=(f"Comparison {result.config.name!r}: every method audited with the evaluation classifier on "
              f"{result.config.images_per_prompt} images per prompt, from the same initial noise, under the laws "
              f"{', '.join(result.laws)}." + (f" Not run: {skipped}." if skipped else "")),
        tables=[comparison_table(result, n) for n in sets])]
    for set_name in sets:
        runs = [r for r in result.runs if r.prompt_set == set_name]
        original = next(r for r in runs if r.method == "original")
        for law, marginals in result.laws.items():
            images = []
            for r in (r for r in runs if r.law == law and r.method != "original"):
                for attr, target in marginals.items():
                    classes = result.attributes[attr]
                    rows = [{"prompt": b["prompt"], "before": dict(zip(classes, b["freq"][attr])),
                             "after": dict(zip(classes, a["freq"][attr]))}
                            for b, a in zip(original.audit.rows, r.audit.rows)]
                    images.append(plot_group_frequencies(rows, attr, classes, dict(zip(classes, target.tolist())),
                                                         figs / f"freq_{set_name}_{law}_{r.method}_{attr}.png"))
            sections.append(Section(title=f"Frequencies: {set_name}, law {law}",
                                    text="Per prompt: 'before' is the original model, 'after' the method named in "
                                         "the file name; dashed lines: the law.", images=images))
            shown = [r for r in runs if r.law == law]
            classes = {a: result.attributes[a] for a in marginals}
            grids = []
            for i in range(min(len(r.audit.images) for r in shown)):
                canvas = side_by_side([_grid(r, i, classes, result.config.grid_images) for r in shown],
                                      [r.method for r in shown])
                path = figs / f"grid_{set_name}_{law}_{i}.png"
                canvas.save(path)
                grids.append(path)
            sections.append(Section(title=f"Images: {set_name}, law {law}",
                                    text="Same number = same initial noise in every method. Bars: the evaluation "
                                         "classifier's class per attribute (height = confidence). Prompts: "
                                         + "; ".join(p.prompt for p in shown[0].audit.images), images=grids))
    return write_report(out / "compare.html", f"fairness comparison: {result.config.name}", sections)
