"""Pictures people look at instead of reading logs: loss curves and labelled image grids (PIL only)."""

from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageDraw, ImageFont


def _font(size: int = 12):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1
        return ImageFont.load_default()


def smooth(values: list[float], window: int) -> list[float]:
    """Trailing moving average (the first points average what exists so far)."""
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc += v
        if i >= window:
            acc -= values[i - window]
        out.append(acc / min(i + 1, window))
    return out


def loss_curve(losses: list[float], title: str = "training loss", size: tuple[int, int] = (640, 360),
               extra: dict[str, list[float]] | None = None) -> Image.Image:
    """Raw loss (light) and its moving average (dark) per step, with axes and min/max labels."""
    w, h = size
    im = Image.new("RGB", size, "white")
    d = ImageDraw.Draw(im)
    font = _font(12)
    left, right, top, bottom = 56, 16, 28, 36
    d.text((left, 6), title, fill="black", font=font)
    series = {"loss": losses, **(extra or {})}
    finite = [v for s in series.values() for v in s if math.isfinite(v)]
    if not finite:
        d.text((left, h // 2), "no finite values", fill="red", font=font)
        return im
    lo, hi = min(finite), max(finite)
    if hi - lo < 1e-12:
        hi = lo + 1.0
    n = max(len(s) for s in series.values())
    d.rectangle([left, top, w - right, h - bottom], outline="black")

    def xy(i, v):
        x = left + (w - left - right) * (i / max(1, n - 1))
        y = top + (h - top - bottom) * (1 - (v - lo) / (hi - lo))
        return x, y

    colours = [((170, 190, 230), (20, 60, 160)), ((240, 190, 160), (190, 70, 20)), ((180, 220, 180), (30, 120, 40))]
    for k, (name, s) in enumerate(series.items()):
        light, dark = colours[k % len(colours)]
        pts = [xy(i, v) for i, v in enumerate(s) if math.isfinite(v)]
        if len(pts) > 1:
            d.line(pts, fill=light, width=1)
            sm = smooth(s, max(1, len(s) // 20))
            d.line([xy(i, v) for i, v in enumerate(sm)], fill=dark, width=2)
        d.text((w - right - 120, top + 4 + 14 * k), f"- {name}", fill=dark, font=font)
    d.text((4, top - 6), f"{hi:.3g}", fill="black", font=font)
    d.text((4, h - bottom - 8), f"{lo:.3g}", fill="black", font=font)
    d.text((left, h - bottom + 6), "0", fill="black", font=font)
    d.text((w - right - 40, h - bottom + 6), f"{n} steps", fill="black", font=font)
    return im


def image_grid(rows: list[list[Image.Image]], row_labels: list[str] | None = None,
               col_labels: list[str] | None = None, cell: int = 128, label_width: int = 110) -> Image.Image:
    """A grid of images (each scaled to ``cell`` px, nearest neighbour so small images stay crisp)."""
    n_cols = max(len(r) for r in rows)
    lw = label_width if row_labels else 0
    th = 30 if col_labels else 0
    im = Image.new("RGB", (lw + n_cols * cell, th + len(rows) * cell), "white")
    d = ImageDraw.Draw(im)
    font = _font(11)
    for c, text in enumerate(col_labels or []):
        _wrapped(d, (lw + c * cell + 3, 2), text, cell - 6, font)
    for r, row in enumerate(rows):
        if row_labels:  # as many lines as the row holds, centred on it
            _wrapped(d, (3, th + r * cell + cell // 2), row_labels[r], lw - 6, font, max_lines=(cell - 4) // 13,
                     centre=True)
        for c, tile in enumerate(row):
            im.paste(tile.convert("RGB").resize((cell, cell), Image.NEAREST), (lw + c * cell, th + r * cell))
    return im


def _wrapped(d: ImageDraw.ImageDraw, xy, text: str, width: int, font, max_lines: int = 3,
             centre: bool = False) -> None:
    """``text`` wrapped to ``width`` px, at most ``max_lines`` lines (the last ends in "…" when cut); ``centre``:
    ``xy``'s y is the middle of the block instead of its top."""
    words, lines, line = text.split(), [], ""
    for wd in words:
        trial = f"{line} {wd}".strip()
        if d.textlength(trial, font=font) > width and line:
            lines.append(line)
            line = wd
        else:
            line = trial
    lines.append(line)
    if len(lines) > max_lines:
        lines = lines[:max_lines]
        lines[-1] += " …"
    x, y = xy
    if centre:
        y -= len(lines) * 13 // 2
    d.multiline_text((x, y), "\n".join(lines), fill="black", font=font, spacing=1)


def to_uint8(images: np.ndarray) -> list[Image.Image]:
    return [Image.fromarray(a) for a in images]
