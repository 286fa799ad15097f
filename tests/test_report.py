"""Report: grids, plots and the HTML file are checked on their actual pixels and markup."""

from __future__ import annotations

import base64
import io
import math
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fairness.report import (
    Section,
    Table,
    annotated_grid,
    before_after_grid,
    class_colors,
    format_cell,
    format_text_table,
    grid_layout,
    paper_table,
    plot_bias_summary,
    plot_group_frequencies,
    plot_loss_curves,
    render_grid,
    write_report,
)
from fairness.report.grids import BACKGROUND, BOX, NO_FACE_BG, TRACK
from fairness.config import DebiasConfig
from fairness.report.job_report import tolerance_bands
from fairness.report.plots import AFTER_COLOR, BAND_COLOR, BEFORE_COLOR
from fairness.targets.distributions import TargetSpec

pytestmark = pytest.mark.timeout(60)

CLASSES = {"gender": ["female", "male"], "race": ["white", "black", "asian", "indian"]}
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
GREY = 128  # flat test images: any box / mark pixel differs from them


def _hex(color: str) -> tuple[int, int, int]:
    return int(color[1:3], 16), int(color[3:5], 16), int(color[5:7], 16)


def _png(path: Path) -> np.ndarray:
    assert path.read_bytes()[:8] == PNG_MAGIC
    with Image.open(path) as im:
        assert im.format == "PNG"
        return np.asarray(im.convert("RGB")).astype(np.int32)


def _near(pixels: np.ndarray, color: tuple[int, int, int], tol: int = 12) -> np.ndarray:
    return np.abs(pixels - np.array(color)).max(-1) <= tol


def _grid_inputs(n: int = 5) -> dict:
    probs = {"gender": np.full((n, 2), 0.5), "race": np.full((n, 4), 0.25)}
    probs["gender"][0] = [0.2, 0.8]  # image 0: male, 80 % sure
    probs["race"][0] = [0.1, 0.05, 0.75, 0.1]  # image 0: asian, 75 % sure
    found = np.ones(n, dtype=bool)
    found[2] = False
    return {
        "images": torch.full((n, 3, 32, 32), GREY / 255),
        "probs": probs,
        "classes": CLASSES,
        "boxes": np.tile([8.0, 6.0, 24.0, 26.0], (n, 1)),
        "found": found,
        "ncols": 3,
        "labels": [str(i) for i in range(n)],
        "upscale": 4,
    }


def test_class_colors_are_fixed_and_distinct():
    colors = class_colors(CLASSES)
    flat = colors["gender"] + colors["race"]
    assert len(set(flat)) == 6 and BOX not in flat
    assert class_colors(CLASSES) == colors
    assert len(set(class_colors({"joint": [str(i) for i in range(40)]})["joint"])) == 40


def test_annotated_grid_pixels(tmp_path):
    kw = _grid_inputs()
    out = annotated_grid(out_png=tmp_path / "grid.png", **kw)
    px = _png(out)
    layout = grid_layout(5, (32, 32), CLASSES, ncols=3, has_labels=True, upscale=4)
    assert px.shape == (layout.size[1], layout.size[0], 3)
    assert layout.ncols == 3 and layout.image_w == layout.image_h == 128
    colors = class_colors(CLASSES)

    # Image 0: upscaled pixels, a box on its edges, bars of the predicted colour and height.
    x0, y0, x1, y1 = layout.image_box(0)
    assert (x1 - x0, y1 - y0) == (128, 128)
    assert (px[y0 + 2, x0 + 2] == GREY).all() and (px[y0 + 60, x0 + 60] == GREY).all()
    for x, y in [(x0 + 32, y0 + 60), (x0 + 95, y0 + 60), (x0 + 60, y0 + 24), (x0 + 60, y0 + 103)]:
        assert tuple(px[y, x]) == BOX, (x, y)
    assert tuple(px[y0 + 60, x0 + 31]) != BOX and tuple(px[y0 + 60, x0 + 96]) != BOX
    for j, (attr, k, conf) in enumerate([("gender", 1, 0.8), ("race", 2, 0.75)]):
        bx0, by0, bx1, by1 = layout.bar_slot(0, j)
        column = px[by0:by1, (bx0 + bx1) // 2]
        filled = round(conf * (by1 - by0))
        assert (column[-filled:] == colors[attr][k]).all()
        assert (column[:-filled] == TRACK).all()

    # Image 2 has no face: no bars, no box, a "no face" tag in its corner.
    x0, y0, x1, y1 = layout.image_box(2)
    for j in range(2):
        bx0, by0, bx1, by1 = layout.bar_slot(2, j)
        assert (px[by0:by1, bx0:bx1] == BACKGROUND).all()
    assert not _near(px[y0:y1, x0:x1], BOX, 0).any()
    assert (px[y1 - 2, x0 + 1] == NO_FACE_BG).all()
    assert (px[y0 + 2, x0 + 2] == GREY).all()

    # Number labels above images; legend swatches of every class below the grid.
    lx0, ly0, _, _ = layout.image_box(1)
    assert (px[ly0 - layout.label_h:ly0, lx0:lx0 + 12] < 100).any()
    legend = px[layout.legend_top:]
    for color in colors["gender"] + colors["race"]:
        assert (legend == color).all(-1).sum() >= 50, color

    # numpy input renders identically; no labels means no label strip.
    as_np = render_grid(**{**kw, "images": kw["images"].numpy()})
    assert (np.asarray(as_np).astype(np.int32) == px).all()
    assert grid_layout(5, (32, 32), CLASSES, has_labels=False).label_h == 0


def test_annotated_grid_rejects_mismatched_inputs(tmp_path):
    kw = _grid_inputs()
    with pytest.raises(ValueError, match="probs"):
        annotated_grid(out_png=tmp_path / "x.png", **{**kw, "probs": {**kw["probs"], "race": np.zeros((5, 3))}})
    with pytest.raises(ValueError, match="labels"):
        annotated_grid(out_png=tmp_path / "x.png", **{**kw, "labels": ["0"]})


def test_before_after_grid_places_both_grids(tmp_path):
    before = _grid_inputs()
    after = {**_grid_inputs(), "images": torch.full((5, 3, 32, 32), 0.9)}
    out = before_after_grid(before, after, tmp_path / "ba.png")
    px = _png(out)
    left, right = np.asarray(render_grid(**before)), np.asarray(render_grid(**after))
    h = left.shape[0]
    assert px.shape[1] > left.shape[1] + right.shape[1]
    assert (px[-h:, :left.shape[1]] == left).all()
    assert (px[-h:, -right.shape[1]:] == right).all()
    assert (px[: px.shape[0] - h] < 100).any()  # the titles
    with pytest.raises(ValueError, match="same noise"):
        before_after_grid(before, {**after, "labels": list("abcde")}, tmp_path / "bad.png")


def _dashed_rows(px: np.ndarray) -> list[int]:
    """Centres of row bands that are partly (not wholly) dark: dashed lines, not solid spines."""
    dark = (px < 60).all(-1).sum(1)
    rows = np.flatnonzero((dark > 0.35 * dark.max()) & (dark < 0.9 * dark.max()))
    bands = np.split(rows, np.flatnonzero(np.diff(rows) > 1) + 1) if len(rows) else []
    return [int(b.mean()) for b in bands]


def _bar_height(px: np.ndarray, color: tuple[int, int, int]) -> tuple[int, int]:
    """(height, top row) of the tallest contiguous run of ``color`` in any column (the bar)."""
    mask = _near(px, color)
    rows = np.flatnonzero(mask[:, int(mask.sum(0).argmax())])
    runs = np.split(rows, np.flatnonzero(np.diff(rows) > 1) + 1)
    bar = max(runs, key=len)
    return len(bar), int(bar.min())


def test_group_frequencies_binary_bars_and_target(tmp_path):
    rows = [{"prompt": "a photo of a <doctor> & co", "before": {"female": 0.2, "male": 0.8},
             "after": {"female": 0.5, "male": 0.5}}]
    out = plot_group_frequencies(rows, "gender", ["female", "male"], {"female": 0.5, "male": 0.5},
                                 tmp_path / "f.png", figsize=(4, 4), dpi=100)
    px = _png(out)
    assert px.shape == (400, 400, 3)
    h_before, _ = _bar_height(px, _hex(BEFORE_COLOR))
    h_after, top_after = _bar_height(px, _hex(AFTER_COLOR))
    assert h_before / h_after == pytest.approx(0.8 / 0.5, rel=0.04)
    lines = _dashed_rows(px)
    assert len(lines) == 1 and abs(lines[0] - top_after) <= 3


def test_group_frequencies_shade_the_tolerance_band(tmp_path):
    rows = [{"prompt": "a photo of a doctor", "before": {"female": 0.2, "male": 0.8},
             "after": {"female": 0.5, "male": 0.5}}]
    out = plot_group_frequencies(rows, "gender", ["female", "male"], {"female": 0.5, "male": 0.5},
                                 tmp_path / "f.png", figsize=(4, 4), dpi=100, band=(0.375, 0.625))
    px = _png(out)
    shaded = tuple(round(255 - 0.35 * (255 - c)) for c in _hex(BAND_COLOR))  # alpha 0.35 over white
    beside_bars = np.flatnonzero(_near(px, _hex(AFTER_COLOR)).any(0)).max() + 5  # inside the axes, not the legend
    shaded_rows = np.flatnonzero(_near(px[:, beside_bars], shaded))  # grid lines show through: take the extent
    h_band, top_band = shaded_rows.max() - shaded_rows.min() + 1, shaded_rows.min()
    h_after, top_after = _bar_height(px, _hex(AFTER_COLOR))
    assert h_band / h_after == pytest.approx(0.25 / 0.5, rel=0.06)  # the band is 0.25 of the axis tall
    assert top_band < top_after < top_band + h_band  # and straddles the 0.5 target
    with pytest.raises(ValueError, match="two classes"):
        plot_group_frequencies(rows, "race", CLASSES["race"], dict.fromkeys(CLASSES["race"], 0.25),
                               tmp_path / "g.png", band=(0.2, 0.3))


def test_tolerance_bands_for_binary_attributes_targeted_alone():
    cfg = DebiasConfig.model_validate({
        "prompts": {"train": [{"prompts": ["a doctor"]}]}, "target": {"marginals": {"gender": "uniform"}},
        "train": {"images_per_prompt": 16}, "loss": {"confidence_threshold": {"gender": 0.8, "race": 0.6}}})
    marginals = TargetSpec.from_dict({"marginals": {"gender": "uniform", "race": "uniform"}}).compile(CLASSES)
    assert tolerance_bands(cfg, marginals) == {"gender": (6 / 16, 10 / 16)}
    joint = TargetSpec.from_dict({"joint": {"attributes": ["gender", "race"], "probs": "uniform"}}).compile(CLASSES)
    assert tolerance_bands(cfg, joint) == {}


def test_group_frequencies_stacked_with_target_boundaries(tmp_path):
    names = CLASSES["race"]
    rows = [{"prompt": f"a photo of a {o}, a person", "before": {"white": 0.7, "black": 0.1, "asian": 0.1, "indian": 0.1},
             "after": dict.fromkeys(names, 0.25)} for o in ("doctor", "nurse", "$5 tailor")]
    rows.append({"prompt": "a photo of a janitor, a person", "before": {"white": math.nan}, "after": {}})
    target = {"white": 0.4, "black": 0.2, "asian": 0.2, "indian": 0.2}
    out = plot_group_frequencies(rows, "race", names, target, tmp_path / "f.png", figsize=(6, 4), dpi=100)
    px = _png(out)
    assert px.shape == (400, 600, 3)
    for color in class_colors({"race": names})["race"]:
        assert _near(px, color, 2).sum() > 500
    lines = _dashed_rows(px)
    assert len(lines) == 3
    gaps = np.diff(sorted(lines))  # boundaries at 0.6, 0.8, 0.4 of the axis -> equal gaps 0.2
    assert abs(gaps[0] - gaps[1]) <= 2
    with pytest.raises(KeyError, match="lacks"):
        plot_group_frequencies(rows, "race", names, {"white": 1.0}, tmp_path / "g.png")


def test_loss_curves_one_panel_per_loss_key(tmp_path):
    log = [{"step": i, "loss/total": 1 / (i + 1), "loss/align": math.nan if i % 7 == 0 else 0.5, "lr": 1e-4}
           for i in range(40)]
    log[3]["loss/img"] = 0.2
    log[5]["loss/face"] = "nan"
    px = _png(plot_loss_curves(log, tmp_path / "l.png", dpi=60))
    assert px.shape == (360, 756, 3)  # 4 loss keys -> 3 x 2 panels of 4.2 x 3 in
    assert _near(px, _hex(AFTER_COLOR), 2).sum() > 200
    assert _png(plot_loss_curves(log[6:10], tmp_path / "l2.png", dpi=50)).shape == (150, 420, 3)  # 2 keys
    empty = _png(plot_loss_curves([{"step": 0, "lr": 1.0}], tmp_path / "l0.png", dpi=50))
    assert empty.shape == (150, 210, 3)
    chosen = _png(plot_loss_curves(log, tmp_path / "l3.png", dpi=50, keys=["lr"]))  # any keys, e.g. validation
    assert chosen.shape == (150, 210, 3) and _near(chosen, _hex(AFTER_COLOR), 2).sum() > 50


def test_bias_summary_bars(tmp_path):
    summary = {"gender": {"before": 0.6, "after": 0.2}, "race": {"before": 0.3, "after": math.nan}}
    px = _png(plot_bias_summary(summary, tmp_path / "b.png", dpi=100))
    assert px.shape == (380, 460, 3)
    h_before, _ = _bar_height(px, _hex(BEFORE_COLOR))
    h_after, _ = _bar_height(px, _hex(AFTER_COLOR))
    assert h_before / h_after == pytest.approx(3.0, rel=0.05)


class _Doc(HTMLParser):
    """Collects what the tests look at and checks that every non-void tag is closed in order."""

    VOID = {"meta", "img", "br", "hr", "link", "input"}

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.stack: list[str] = []
        self.starts: list[str] = []
        self.text: dict[str, list[str]] = {"title": [], "h1": [], "h2": [], "p": [], "td": [], "th": [], "caption": []}
        self.images: list[dict[str, str | None]] = []
        self.tables: list[list[list[str]]] = []

    def handle_starttag(self, tag, attrs):
        self.starts.append(tag)
        if tag == "img":
            self.images.append(dict(attrs))
        if tag == "table":
            self.tables.append([])
        if tag == "tr":
            self.tables[-1].append([])
        if tag not in self.VOID:
            self.stack.append(tag)
            if tag in self.text:
                self.text[tag].append("")

    def handle_endtag(self, tag):
        assert self.stack and self.stack[-1] == tag, f"</{tag}> closes {self.stack[-1:]}"
        self.stack.pop()
        if tag in ("td", "th"):
            self.tables[-1][-1].append(self.text[tag][-1])

    def handle_data(self, data):
        for tag in reversed(self.stack):
            if tag in self.text:
                self.text[tag][-1] += data
                break


def test_write_report_is_valid_self_contained_html(tmp_path):
    grid = annotated_grid(out_png=tmp_path / "grid_doctor.png", **_grid_inputs())
    bias_png = plot_bias_summary({"gender": {"before": 0.6, "after": 0.2}}, tmp_path / "bias.png", dpi=40)
    prompt = 'a photo of a <b>nurse</b> & "co"'
    freq = Table(["prompt", "images", "share male", "bias"], [[prompt, 64, 0.53125, None], ["x", 8, math.nan, 1e-5]],
                 caption="per prompt <freq>")
    sections = [
        Section("Group frequencies & <targets>", text=f"first paragraph {prompt}\n\nsecond", images=[grid, bias_png],
                tables=[freq]),
        Section("Losses", tables=[Table(["a", "b"], [])]),
        Section("Empty section"),
    ]
    out = write_report(tmp_path / "sub" / "report.html", "Debias <run> & co", sections)
    raw = out.read_text(encoding="utf-8")
    assert raw.startswith("<!DOCTYPE html>") and "<b>nurse" not in raw and "& co" not in raw
    doc = _Doc()
    doc.feed(raw)
    doc.close()
    assert doc.stack == []
    assert doc.text["title"] == ["Debias <run> & co"] and doc.text["h1"] == ["Debias <run> & co"]
    assert doc.text["h2"] == [s.title for s in sections]
    assert "b" not in doc.starts
    assert any(prompt in p for p in doc.text["p"])

    assert [im["data-name"] for im in doc.images] == ["grid_doctor", "bias"]
    for im, path in zip(doc.images, [grid, bias_png]):
        assert im["alt"]
        prefix, data = im["src"].split(",", 1)
        assert prefix == "data:image/png;base64"
        blob = base64.b64decode(data)
        assert blob[:8] == PNG_MAGIC and blob == path.read_bytes()
        assert Image.open(io.BytesIO(blob)).size == Image.open(path).size

    first, second = doc.tables
    assert first[0] == freq.columns and len(first) == 1 + len(freq.rows)
    assert all(len(r) == 4 for r in first)
    assert first[1] == [prompt, "64", "0.531", "-"] and first[2] == ["x", "8", "n/a", "1e-05"]
    assert doc.text["caption"] == ["per prompt <freq>"]
    assert second == [["a", "b"]]


def test_write_report_checks_images_before_writing(tmp_path):
    out = tmp_path / "r.html"
    with pytest.raises(FileNotFoundError, match="missing.png"):
        write_report(out, "t", [Section("s", images=[tmp_path / "missing.png"])])
    assert not out.exists()
    with pytest.raises(ValueError, match="2 cells for 3 columns"):
        Table(["a", "b", "c"], [[1, 2]])


SUMMARY_BEFORE = {"bias": {"gender": {"mean": 0.67, "std": 0.12, "n": 50}, "race": {"mean": 0.42, "std": 0.1}},
                  "semantics": {"clip_t": {"mean": 0.39, "std": 0.02}}}
SUMMARY_AFTER = {"bias": {"gender": {"mean": 0.16, "std": 0.09}, "race": {"mean": math.nan, "std": math.nan}},
                 "semantics": {"clip_t": {"mean": 0.39, "std": 0.02}, "clip_i": {"mean": 0.67, "std": 0.1}}}


def test_paper_table_and_text_table():
    table = paper_table(SUMMARY_BEFORE, SUMMARY_AFTER, ["gender", "race"], ["clip_t", "clip_i"])
    assert table.columns == ["model", "bias gender", "bias race", "clip_t", "clip_i"]
    cells = [[format_cell(v) for v in r] for r in table.rows]
    assert cells == [["original", "0.670±0.120", "0.420±0.100", "0.390±0.020", "-"],
                     ["debiased", "0.160±0.090", "n/a", "0.390±0.020", "0.670±0.100"]]
    text = format_text_table(table)
    lines = text.splitlines()
    assert lines[0] == table.caption and len(lines) == 5 and set(lines[2]) == {"-", " "}
    header, rows = lines[1], lines[3:]
    assert rows[0].startswith("original ") and rows[1].startswith("debiased ")
    for column, values in zip(table.columns[1:], zip(*[r[1:] for r in cells])):
        end = header.index(column) + len(column)  # numeric columns are right-aligned
        for line, value in zip(rows, values):
            assert line[:end].endswith(value), (column, line)
    floored = paper_table(SUMMARY_BEFORE, {**SUMMARY_AFTER, "bias_floor": {"gender": 0.142, "race": 0.1}},
                          ["gender", "race"], ["clip_t"])
    assert [format_cell(v) for v in floored.rows[-1]] == ["fair sampling floor", "0.142", "0.100", "-"]


def test_format_cell():
    assert [format_cell(v) for v in (None, math.nan, 3, 0.5, 12345.6, 0.0, True, np.float32(0.25), np.int64(7),
                                     math.inf, "a<b")] == \
        ["-", "n/a", "3", "0.500", "1.23e+04", "0", "True", "0.250", "7", "inf", "a<b"]
