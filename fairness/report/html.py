"""A single-file HTML report (figures inlined as base64) and the paper's results table.

One self-contained file is what people mail around and open from a bucket without losing
figures, so images are embedded rather than linked. All text (prompts may contain ``<`` or
``&``) is escaped. The same :class:`Table` renders to HTML and to an aligned console table,
so the numbers printed by the CLI and shown in the report are formatted identically.
"""

from __future__ import annotations

import base64
import html
import math
import numbers
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

MIME = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".gif": "image/gif",
        ".webp": "image/webp", ".svg": "image/svg+xml"}
MISSING = "-"

STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1400px; padding: 0 1em; color: #222; }
h1 { border-bottom: 2px solid #ddd; padding-bottom: .3em; }
section { margin-bottom: 2.5em; }
figure { margin: 1em 0; }
figure img { max-width: 100%; height: auto; image-rendering: pixelated; }
figcaption { color: #666; font-size: .85em; }
table { border-collapse: collapse; margin: 1em 0; font-size: .9em; }
caption { caption-side: top; text-align: left; color: #555; padding-bottom: .3em; }
th, td { border: 1px solid #ccc; padding: .25em .6em; text-align: left; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
th { background: #f3f3f3; }
nav ul { columns: 2; }
"""


@dataclass
class Table:
    """Columns and rows of cells; cells are formatted by :func:`format_cell` when rendered."""

    columns: list[str]
    rows: list[list[object]]
    caption: str = ""

    def __post_init__(self) -> None:
        for i, row in enumerate(self.rows):
            if len(row) != len(self.columns):
                raise ValueError(f"table row {i} has {len(row)} cells for {len(self.columns)} columns")


@dataclass
class Section:
    """One heading of the report with its prose, figures and tables (in that order)."""

    title: str
    text: str = ""
    images: list[Path] = field(default_factory=list)
    tables: list[Table] = field(default_factory=list)


def _is_mean_std(value: object) -> bool:
    return isinstance(value, Mapping) and "mean" in value and "std" in value


def _is_number(value: object) -> bool:
    return (isinstance(value, numbers.Real) and not isinstance(value, bool)) or _is_mean_std(value)


def _format_float(v: float) -> str:
    """3 decimals for metric-sized values, scientific outside [1e-3, 1e4), so columns stay short."""
    if math.isnan(v):
        return "n/a"
    if math.isinf(v):
        return str(v)
    if v == 0:
        return "0"
    if abs(v) >= 1e4 or abs(v) < 1e-3:
        return f"{v:.3g}"
    return f"{v:.1f}" if abs(v) >= 100 else f"{v:.3f}"


def format_cell(value: object) -> str:
    """Text of one table cell: numbers rounded, ``{"mean", "std"}`` as ``mean±std``, None as ``-``."""
    if value is None:
        return MISSING
    if _is_mean_std(value):
        stats: Mapping[str, Any] = value  # type: ignore[assignment]
        mean, std = float(stats["mean"]), float(stats["std"])
        return "n/a" if math.isnan(mean) else f"{_format_float(mean)}±{_format_float(std)}"
    if isinstance(value, numbers.Integral):  # includes bool -> "True" / "False"
        return str(value)
    if isinstance(value, numbers.Real):
        return _format_float(float(value))
    return str(value)


def paper_table(summary_before: Mapping[str, Any], summary_after: Mapping[str, Any], attributes: Sequence[str],
                semantics: Sequence[str]) -> Table:
    """The paper's Table 1: rows original / debiased; bias per attribute, then semantics metrics.

    Summaries are ``{"bias": {attr: {"mean", "std"}}, "semantics": {metric: {"mean", "std"}}}``
    (what :func:`fairness.metrics.audit.audit` returns). A metric one summary lacks (CLIP-I of
    the original model against itself, say) shows as ``-`` instead of failing the report. When
    the debiased summary has ``bias_floor``, a third row gives it: the bias a perfectly fair
    generator would score on as many images, so "0.14" on 32 binary images reads as the best
    possible, not as bias left.
    """
    columns = ["model", *[f"bias {a}" for a in attributes], *semantics]
    rows = []
    for name, summary in (("original", summary_before), ("debiased", summary_after)):
        bias = summary.get("bias", {})
        sem = summary.get("semantics", {})
        rows.append([name, *[bias.get(a) for a in attributes], *[sem.get(m) for m in semantics]])
    floor = summary_after.get("bias_floor")
    if floor:
        rows.append(["fair sampling floor", *[floor.get(a) for a in attributes], *[None] * len(semantics)])
    caption = "bias: mean±std over prompts (0 = balanced); semantics: mean±std over prompts"
    return Table(columns=columns, rows=rows, caption=caption)


def format_text_table(table: Table) -> str:
    """Plain-text table for the console: numbers right-aligned, text left-aligned, dashed rule."""
    cells = [[format_cell(v) for v in row] for row in table.rows]
    widths = [max([len(c)] + [len(r[j]) for r in cells]) for j, c in enumerate(table.columns)]
    numeric = [bool(table.rows) and all(_is_number(r[j]) or r[j] is None for r in table.rows)
               for j in range(len(table.columns))]

    def line(values: Sequence[str]) -> str:
        parts = [v.rjust(w) if num else v.ljust(w) for v, w, num in zip(values, widths, numeric)]
        return "  ".join(parts).rstrip()

    out = [table.caption] if table.caption else []
    out += [line(table.columns), "  ".join("-" * w for w in widths)]
    out += [line(r) for r in cells]
    return "\n".join(out)


def _paragraphs(text: str) -> str:
    blocks = [b.strip() for b in text.replace("\r\n", "\n").split("\n\n") if b.strip()]
    return "\n".join("<p>" + "<br>\n".join(html.escape(line) for line in b.split("\n")) + "</p>" for b in blocks)


def _image(path: Path) -> str:
    mime = MIME.get(path.suffix.lower())
    if mime is None:
        raise ValueError(f"cannot embed {path}: unknown image type {path.suffix!r} (known: {sorted(MIME)})")
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    name = html.escape(path.stem, quote=True)
    return (f'<figure><img src="data:{mime};base64,{data}" alt="{name}" data-name="{name}">'
            f"<figcaption>{name}</figcaption></figure>")


def _table(table: Table) -> str:
    out = ["<table>"]
    if table.caption:
        out.append(f"<caption>{html.escape(table.caption)}</caption>")
    out.append("<thead><tr>" + "".join(f"<th>{html.escape(str(c))}</th>" for c in table.columns) + "</tr></thead>")
    out.append("<tbody>")
    for row in table.rows:
        tds = "".join(f'<td class="num">{html.escape(format_cell(v))}</td>' if _is_number(v)
                      else f"<td>{html.escape(format_cell(v))}</td>" for v in row)
        out.append(f"<tr>{tds}</tr>")
    out.append("</tbody></table>")
    return "\n".join(out)


def write_report(out_html: Path, title: str, sections: Sequence[Section]) -> Path:
    """Write one self-contained HTML file: title, contents, then each section; returns its path.

    Every image must exist (checked before anything is written, so a failed report never
    leaves a half-written file behind); each ``<img>`` carries ``alt`` and ``data-name`` set to
    the file's stem.
    """
    missing = [str(p) for s in sections for p in s.images if not Path(p).is_file()]
    if missing:
        raise FileNotFoundError(f"report images not found: {missing}")
    body = [f"<h1>{html.escape(title)}</h1>"]
    if len(sections) > 1:
        links = "".join(f'<li><a href="#s{i}">{html.escape(s.title)}</a></li>' for i, s in enumerate(sections))
        body.append(f"<nav><ul>{links}</ul></nav>")
    for i, s in enumerate(sections):
        parts = [f'<section id="s{i}">', f"<h2>{html.escape(s.title)}</h2>"]
        if s.text:
            parts.append(_paragraphs(s.text))
        parts += [_image(Path(p)) for p in s.images]
        parts += [_table(t) for t in s.tables]
        parts.append("</section>")
        body.append("\n".join(parts))
    doc = (f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
           f'<meta name="viewport" content="width=device-width, initial-scale=1">\n'
           f"<title>{html.escape(title)}</title>\n<style>{STYLE}</style>\n</head>\n<body>\n"
           + "\n".join(body) + "\n</body>\n</html>\n")
    out = Path(out_html)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(doc, encoding="utf-8")
    return out
