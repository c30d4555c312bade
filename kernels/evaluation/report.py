"""The scores as a picture: one row per metric computed, with what it measures and which way is better."""

from __future__ import annotations

from PIL import Image, ImageDraw

from ..core.plots import _font

#: key → (label, what it measures)
ROWS = {
    "clip_i": ("CLIP-I", "subject fidelity, higher is better"),
    "clip_i_masked": ("CLIP-I masked", "subject fidelity on the subject alone"),
    "dino": ("DINO", "subject fidelity, the more subject-sensitive"),
    "dino_masked": ("DINO masked", "subject fidelity on the subject alone"),
    "clip_t": ("CLIP-T", "prompt fidelity, higher is better"),
    "clip_t_masked": ("CLIP-T masked", "prompt fidelity of the subject alone"),
    "pres": ("PRES", "class-prior drift, lower is better"),
    "div": ("DIV*", "diversity, higher is better (*feature stand-in for LPIPS)"),
}


def metrics_table(scores: dict, width: int = 560, row: int = 24) -> Image.Image:
    """A white table of the metrics in ``scores`` (the dict :func:`.scoring.score` returns) with a header line
    giving the image counts and which sets were masked."""
    rows = [(label, f"{scores[key]:.4f}", what) for key, (label, what) in ROWS.items() if key in scores]
    counts = scores.get("counts", {})
    masked = [k for k, v in scores.get("masked", {}).items() if v]
    header = ", ".join(f"{n} {k.replace('_', ' ')}" for k, n in counts.items())
    header += f"; masked: {', '.join(masked) if masked else 'none'}"
    im = Image.new("RGB", (width, row * (len(rows) + 2) + 8), "white")
    d = ImageDraw.Draw(im)
    font, bold = _font(13), _font(14)
    d.text((8, 6), header, fill=(60, 60, 60), font=font)
    y = 6 + row
    d.text((8, y), "metric", fill="black", font=bold)
    d.text((140, y), "score", fill="black", font=bold)
    d.text((220, y), "measures", fill="black", font=bold)
    for i, (label, value, what) in enumerate(rows):
        y = 6 + row * (i + 2)
        if i % 2 == 0:
            d.rectangle([0, y - 3, width, y + row - 4], fill=(240, 244, 250))
        d.text((8, y), label, fill="black", font=font)
        d.text((140, y), value, fill=(20, 60, 160), font=font)
        d.text((220, y), what, fill=(60, 60, 60), font=font)
    return im
