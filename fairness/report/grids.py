"""Annotated image grids in the paper's figure style.

Every image is upscaled (nearest neighbour, so 32 px toy images stay crisp and readable), gets
its face box drawn, and has one vertical bar per attribute on its left: the bar's colour is the
predicted class and its height the classifier's confidence. A reader can then see at a glance
both *what* the evaluator decided and *how sure* it was, which is what makes a before/after pair
convincing. Drawing is plain PIL: a grid of hundreds of images renders in milliseconds, and the
geometry lives in :class:`GridLayout` so tests can look at exact pixels.
"""

from __future__ import annotations

import colorsys
import dataclasses
import functools
import math
from pathlib import Path
from typing import Any, Mapping, NamedTuple, Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont, features

Color = tuple[int, int, int]

BACKGROUND: Color = (255, 255, 255)
TRACK: Color = (225, 225, 225)  # the empty part of a bar: confidence reads as filled / total
BOX: Color = (0, 255, 0)  # pure lime: absent from the class palette, visible on faces
NO_FACE_BG: Color = (0, 0, 0)
NO_FACE_FG: Color = (255, 255, 255)
TEXT: Color = (0, 0, 0)

# Qualitative colours (tab20 order, greys and the box's green family left out) so that the
# classes of all attributes of one model get distinct colours in a fixed, documented order.
PALETTE: tuple[Color, ...] = (
    (31, 119, 180), (255, 127, 14), (148, 103, 189), (214, 39, 40), (140, 86, 75),
    (227, 119, 194), (188, 189, 34), (23, 190, 207), (174, 199, 232), (255, 187, 120),
    (197, 176, 213), (255, 152, 150), (196, 156, 148), (247, 182, 210), (219, 219, 141),
    (158, 218, 229),
)

PAD = 6  # margin around and between cells
BAR_GAP = 2  # between two attribute bars
BAR_TO_IMAGE = 3  # between the last bar and the image
FONT_SIZE = 12
SWATCH = 10


class LegendEntry(NamedTuple):
    """One piece of legend text at ``(x, y)``; ``color`` set means a swatch precedes it."""

    x: int
    y: int
    text: str
    color: Color | None


def class_colors(classes: Mapping[str, Sequence[str]]) -> dict[str, list[Color]]:
    """Fixed colour per (attribute, class): palette entries taken in attribute order.

    Consecutive offsets mean e.g. gender and race never share a colour in one figure, and the
    same class list always gets the same colours, so figures from different runs compare.
    """
    out: dict[str, list[Color]] = {}
    offset = 0
    for attr, names in classes.items():
        out[attr] = [_palette(offset + k) for k in range(len(names))]
        offset += len(names)
    return out


def _palette(i: int) -> Color:
    """Palette colour ``i``; past the table, golden-ratio hues keep colours distinct."""
    if i < len(PALETTE):
        return PALETTE[i]
    hue = (i * 0.618033988749895) % 1.0
    r, g, b = colorsys.hsv_to_rgb(hue, 0.65, 0.85)
    return (round(r * 255), round(g * 255), round(b * 255))


@functools.lru_cache(maxsize=8)
def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    """Pillow's bundled font (scalable when FreeType is available); no system fonts needed."""
    if features.check("freetype2"):
        return ImageFont.load_default(size)
    return ImageFont.load_default()


def _text_size(text: str, size: int = FONT_SIZE) -> tuple[int, int]:
    x0, y0, x1, y1 = _font(size).getbbox(text)
    return int(math.ceil(x1)), int(math.ceil(y1))


@dataclasses.dataclass(frozen=True)
class GridLayout:
    """Pixel geometry of an annotated grid (all boxes are ``x0, y0, x1, y1``, end-exclusive)."""

    n: int
    ncols: int
    image_h: int
    image_w: int
    n_bars: int
    bar_w: int
    label_h: int
    legend_top: int
    legend: tuple[LegendEntry, ...]
    size: tuple[int, int]  # (width, height) of the whole grid

    @property
    def bars_w(self) -> int:
        return self.n_bars * self.bar_w + max(self.n_bars - 1, 0) * BAR_GAP

    @property
    def cell_w(self) -> int:
        return self.bars_w + (BAR_TO_IMAGE if self.n_bars else 0) + self.image_w

    @property
    def cell_h(self) -> int:
        return self.label_h + self.image_h

    def cell_origin(self, i: int) -> tuple[int, int]:
        row, col = divmod(i, self.ncols)
        return PAD + col * (self.cell_w + PAD), PAD + row * (self.cell_h + PAD)

    def image_box(self, i: int) -> tuple[int, int, int, int]:
        x, y = self.cell_origin(i)
        x0, y0 = x + self.cell_w - self.image_w, y + self.label_h
        return x0, y0, x0 + self.image_w, y0 + self.image_h

    def bar_slot(self, i: int, j: int) -> tuple[int, int, int, int]:
        """Full-height slot of attribute ``j``'s bar next to image ``i`` (bar grows upwards)."""
        x, _ = self.cell_origin(i)
        _, y0, _, y1 = self.image_box(i)
        x0 = x + j * (self.bar_w + BAR_GAP)
        return x0, y0, x0 + self.bar_w, y1


def grid_layout(n: int, image_hw: tuple[int, int], classes: Mapping[str, Sequence[str]], ncols: int = 8,
                has_labels: bool = False, upscale: int = 4) -> GridLayout:
    """Geometry for ``n`` images of ``image_hw`` pixels (before upscaling)."""
    if n <= 0:
        raise ValueError("an image grid needs at least one image")
    if ncols <= 0 or upscale <= 0:
        raise ValueError(f"ncols and upscale must be positive, got {ncols} and {upscale}")
    ncols = min(ncols, n)
    nrows = math.ceil(n / ncols)
    h, w = image_hw[0] * upscale, image_hw[1] * upscale
    label_h = _text_size("0")[1] + 4 if has_labels else 0
    geometry = GridLayout(n=n, ncols=ncols, image_h=h, image_w=w, n_bars=len(classes),
                          bar_w=max(4, 2 * upscale), label_h=label_h, legend_top=0, legend=(), size=(0, 0))
    width = PAD + ncols * (geometry.cell_w + PAD)
    legend_top = PAD + nrows * (geometry.cell_h + PAD)
    legend, legend_h = _legend(classes, legend_top, width)
    return dataclasses.replace(geometry, legend_top=legend_top, legend=legend, size=(width, legend_top + legend_h))


def _legend(classes: Mapping[str, Sequence[str]], top: int, width: int) -> tuple[tuple[LegendEntry, ...], int]:
    """Flow layout, one line per attribute ("gender: [■] female [■] male"), wrapping when long."""
    colors = class_colors(classes)
    line_h = max(_text_size("Ag")[1], SWATCH) + 4
    entries: list[LegendEntry] = []
    y = top
    for attr, names in classes.items():
        x = PAD
        head = f"{attr}:"
        entries.append(LegendEntry(x, y, head, None))
        x += _text_size(head)[0] + 6
        for name, color in zip(names, colors[attr]):
            item_w = SWATCH + 3 + _text_size(name)[0]
            if x + item_w > width - PAD and x > PAD + _text_size(head)[0] + 6:
                x, y = PAD + _text_size(head)[0] + 6, y + line_h
            entries.append(LegendEntry(x, y, name, color))
            x += item_w + 10
        y += line_h
    return tuple(entries), (y - top + PAD // 2 if classes else 0)


def _to_uint8(images: torch.Tensor | np.ndarray) -> np.ndarray:
    """``(B, 3, H, W)`` in [0, 1] -> ``(B, H, W, 3)`` uint8."""
    arr = images.detach().float().cpu().numpy() if isinstance(images, torch.Tensor) else np.asarray(images, dtype=np.float64)
    if arr.ndim != 4 or arr.shape[1] != 3:
        raise ValueError(f"images must be (B, 3, H, W), got shape {tuple(arr.shape)}")
    return (np.clip(np.nan_to_num(arr), 0.0, 1.0) * 255).round().astype(np.uint8).transpose(0, 2, 3, 1)


def _check(n: int, probs: Mapping[str, np.ndarray], classes: Mapping[str, Sequence[str]], boxes: np.ndarray,
           found: np.ndarray, labels: Sequence[str] | None) -> None:
    for attr, names in classes.items():
        if attr not in probs:
            raise KeyError(f"no probabilities for attribute {attr!r}; have {sorted(probs)}")
        if np.shape(probs[attr]) != (n, len(names)):
            raise ValueError(f"probs[{attr!r}] must be ({n}, {len(names)}), got {np.shape(probs[attr])}")
    if np.shape(boxes) != (n, 4) or np.shape(found) != (n,):
        raise ValueError(f"boxes must be ({n}, 4) and found ({n},), got {np.shape(boxes)} and {np.shape(found)}")
    if labels is not None and len(labels) != n:
        raise ValueError(f"{len(labels)} labels for {n} images")


def render_grid(images: torch.Tensor | np.ndarray, probs: Mapping[str, np.ndarray],
                classes: Mapping[str, Sequence[str]], boxes: np.ndarray, found: np.ndarray, ncols: int = 8,
                labels: Sequence[str] | None = None, upscale: int = 4) -> Image.Image:
    """The annotated grid as a PIL image (see :func:`annotated_grid`)."""
    pixels = _to_uint8(images)
    n = len(pixels)
    boxes, found = np.asarray(boxes, dtype=np.float64), np.asarray(found, dtype=bool)
    _check(n, probs, classes, boxes, found, labels)
    layout = grid_layout(n, pixels.shape[1:3], classes, ncols, labels is not None, upscale)
    colors = class_colors(classes)
    canvas = Image.new("RGB", layout.size, BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    font = _font(FONT_SIZE)
    for i in range(n):
        x0, y0, x1, y1 = layout.image_box(i)
        tile = Image.fromarray(pixels[i]).resize((layout.image_w, layout.image_h), Image.Resampling.NEAREST)
        canvas.paste(tile, (x0, y0))
        if labels is not None:
            draw.text((x0, y0 - layout.label_h + 1), str(labels[i]), fill=TEXT, font=font)
        if not found[i]:
            _no_face_mark(draw, (x0, y0, x1, y1))
            continue
        _draw_box(draw, boxes[i] * upscale, (x0, y0, x1, y1), width=max(1, upscale // 2))
        for j, attr in enumerate(classes):
            p = np.nan_to_num(np.asarray(probs[attr][i], dtype=np.float64))
            k = int(p.argmax())
            _draw_bar(draw, layout.bar_slot(i, j), float(np.clip(p[k], 0.0, 1.0)), colors[attr][k])
    for entry in layout.legend:
        x = entry.x
        if entry.color is not None:
            top = entry.y + (_text_size("Ag")[1] - SWATCH) // 2 + 1
            draw.rectangle([x, top, x + SWATCH - 1, top + SWATCH - 1], fill=entry.color)
            x += SWATCH + 3
        draw.text((x, entry.y), entry.text, fill=TEXT, font=font)
    return canvas


def _draw_bar(draw: ImageDraw.ImageDraw, slot: tuple[int, int, int, int], confidence: float, color: Color) -> None:
    x0, y0, x1, y1 = slot
    draw.rectangle([x0, y0, x1 - 1, y1 - 1], fill=TRACK)
    filled = round(confidence * (y1 - y0))
    if filled > 0:
        draw.rectangle([x0, y1 - filled, x1 - 1, y1 - 1], fill=color)


def _draw_box(draw: ImageDraw.ImageDraw, box: np.ndarray, image: tuple[int, int, int, int], width: int) -> None:
    """Region box (upscaled pixel edges), clipped to the image so it never bleeds into neighbours."""
    x0, y0, x1, y1 = image
    bx0, by0 = min(max(x0 + round(box[0]), x0), x1 - 1), min(max(y0 + round(box[1]), y0), y1 - 1)
    bx1, by1 = min(max(x0 + round(box[2]) - 1, bx0), x1 - 1), min(max(y0 + round(box[3]) - 1, by0), y1 - 1)
    draw.rectangle([bx0, by0, bx1, by1], outline=BOX, width=width)


def _no_face_mark(draw: ImageDraw.ImageDraw, image: tuple[int, int, int, int]) -> None:
    """Small "no face" tag in the image's bottom-left corner, clipped to the image."""
    x0, y0, x1, y1 = image
    size = FONT_SIZE if _text_size("no face")[0] + 4 <= x1 - x0 else 8
    tw, th = _text_size("no face", size)
    top = max(y0, y1 - th - 4)
    draw.rectangle([x0, top, min(x0 + tw + 3, x1 - 1), y1 - 1], fill=NO_FACE_BG)
    draw.text((x0 + 2, top + 1), "no face", fill=NO_FACE_FG, font=_font(size))


def annotated_grid(images: torch.Tensor | np.ndarray, probs: Mapping[str, np.ndarray],
                   classes: Mapping[str, Sequence[str]], boxes: np.ndarray, found: np.ndarray, out_png: Path,
                   ncols: int = 8, labels: Sequence[str] | None = None, upscale: int = 4) -> Path:
    """Write the paper-style grid of ``images`` to ``out_png`` and return its path.

    ``probs[attr]`` is ``(B, K)`` class probabilities for ``classes[attr]``; ``boxes`` are
    ``x0, y0, x1, y1`` in pixels of the original (not upscaled) images, used where ``found``.
    ``labels`` (e.g. noise indices) are printed above the images, so two grids made from the
    same noise can be compared image by image.
    """
    canvas = render_grid(images, probs, classes, boxes, found, ncols, labels, upscale)
    return _save(canvas, out_png)


def before_after_grid(before_kwargs: Mapping[str, Any], after_kwargs: Mapping[str, Any], out_png: Path,
                      titles: tuple[str, str] = ("original", "debiased")) -> Path:
    """Two :func:`render_grid` grids side by side under ``titles`` (same noise, same order).

    Each kwargs mapping holds :func:`annotated_grid`'s arguments except ``out_png``. The grids
    must show the same number of images, and the same labels when both have labels, because a
    side-by-side figure is only honest when image ``i`` on the left and right share noise.
    """
    n_before, n_after = len(before_kwargs["images"]), len(after_kwargs["images"])
    if n_before != n_after:
        raise ValueError(f"before/after grids must show the same images, got {n_before} and {n_after}")
    lb, la = before_kwargs.get("labels"), after_kwargs.get("labels")
    if lb is not None and la is not None and list(lb) != list(la):
        raise ValueError("before/after labels differ: the two grids must use the same noise in the same order")
    grids = [render_grid(**before_kwargs), render_grid(**after_kwargs)]
    title_size = FONT_SIZE + 4
    title_h = _text_size("Ag", title_size)[1] + 2 * PAD
    gap = 3 * PAD
    width = grids[0].width + gap + grids[1].width
    canvas = Image.new("RGB", (width, title_h + max(g.height for g in grids)), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    x = 0
    for grid, title in zip(grids, titles):
        canvas.paste(grid, (x, title_h))
        tw = _text_size(title, title_size)[0]
        draw.text((x + (grid.width - tw) // 2, PAD), title, fill=TEXT, font=_font(title_size))
        x += grid.width + gap
    line_x = grids[0].width + gap // 2
    draw.line([(line_x, PAD), (line_x, canvas.height - PAD)], fill=TRACK, width=1)
    return _save(canvas, out_png)


def _save(canvas: Image.Image, out_png: Path) -> Path:
    out = Path(out_png)
    out.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(out, format="PNG")
    return out
