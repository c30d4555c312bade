"""IMAGE / MASK handling of the trainer node and its loss-curve picture.

Policy for training images of any size: scale the shorter side to the training resolution, then centre-crop a
square (the same policy as the command line, ``kernels.images.resize_center_crop``). A mask is cropped the same
way as its image; a mask whose size differs from its image is first resized to the image's size (bilinear),
and the node says so in the log and in its UI text (``notes``).
"""

from __future__ import annotations

import logging

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

from ..kernels.errors import UserInputError

log = logging.getLogger(__name__)


def resize_center_crop(x: torch.Tensor, resolution: int, mode: str = "bicubic") -> torch.Tensor:
    """[N,C,H,W] → [N,C,R,R]: shorter side scaled to R, then the centre square."""
    h, w = x.shape[-2:]
    scale = resolution / min(h, w)
    nh, nw = max(resolution, round(h * scale)), max(resolution, round(w * scale))
    if (nh, nw) != (h, w):
        kw = {"antialias": True} if mode in ("bilinear", "bicubic") and scale < 1 else {}
        x = F.interpolate(x, size=(nh, nw), mode=mode, **({"align_corners": False} if mode != "area" else {}), **kw)
    top, left = (nh - resolution) // 2, (nw - resolution) // 2
    return x[..., top:top + resolution, left:left + resolution]


def images_to_training(images: list[torch.Tensor], resolution: int, notes: list[str] | None = None) -> torch.Tensor:
    """ComfyUI IMAGE batches ([B,H,W,C] in 0..1, any sizes) → one tensor [N,3,R,R] in [-1,1]. Each batch whose
    size is not R×R adds a line to ``notes`` saying how it was scaled and cropped."""
    out = []
    for batch in images:
        if batch is None:
            continue
        if batch.ndim == 3:
            batch = batch.unsqueeze(0)
        if batch.ndim != 4 or batch.shape[-1] not in (1, 3, 4):
            raise UserInputError(f"expected IMAGE batches [B,H,W,3], got shape {tuple(batch.shape)}")
        x = batch[..., :3].movedim(-1, 1).float()
        h, w = x.shape[-2:]
        if notes is not None and (h, w) != (resolution, resolution):
            action = "centre-cropped" if min(h, w) == resolution else f"scaled (shorter side to {resolution}) and centre-cropped"
            notes.append(f"{x.shape[0]} image(s) of {w}x{h} {action} to {resolution}x{resolution}")
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        out.append(resize_center_crop(x, resolution).clamp(0, 1) * 2 - 1)
    if not out:
        raise UserInputError("no images were given")
    return torch.cat(out)


def masks_to_training(masks: list[torch.Tensor], images: list[torch.Tensor], resolution: int,
                      notes: list[str] | None = None) -> torch.Tensor:
    """MASK inputs ([B,H,W] or [H,W], 0..1) → [N,1,R,R], one per training image.

    One mask may serve all images, or give one per image. A mask whose size differs from its image is resized to
    the image first (a warning in the log and a line in ``notes`` say so); then both get the same crop.
    """
    sizes = [tuple(b.shape[-3:-1]) if b.ndim == 4 else tuple(b.shape[:2]) for b in images for _ in range(b.shape[0] if b.ndim == 4 else 1)]
    flat = []
    for m in masks:
        if m is None:
            continue
        m = m.float()
        if m.ndim == 2:
            m = m.unsqueeze(0)
        if m.ndim != 3:
            raise UserInputError(f"expected MASK [B,H,W], got shape {tuple(m.shape)}")
        flat += list(m)
    if len(flat) == 1:
        flat = flat * len(sizes)
    if len(flat) != len(sizes):
        raise UserInputError(f"got {len(flat)} masks for {len(sizes)} images: give one mask, or one per image")
    out = []
    for i, (m, size) in enumerate(zip(flat, sizes)):
        m = m[None, None]
        if tuple(m.shape[-2:]) != size:
            msg = (f"mask {i} is {m.shape[-1]}x{m.shape[-2]} but its image is {size[1]}x{size[0]}: "
                   "resizing the mask to the image")
            log.warning(msg)
            if notes is not None:
                notes.append(msg)
            m = F.interpolate(m, size=size, mode="bilinear", align_corners=False)
        out.append(resize_center_crop(m, resolution, mode="bilinear").clamp(0, 1))
    return torch.cat(out)


def loss_curve_image(losses: list[float], width: int = 512, height: int = 256, title: str = "") -> torch.Tensor:
    """A loss-per-step chart (raw and moving average) as a ComfyUI IMAGE [1,H,W,3]."""
    im = Image.new("RGB", (width, height), (255, 255, 255))
    d = ImageDraw.Draw(im)
    left, right, top, bottom = 48, width - 12, 24, height - 28
    d.rectangle([left, top, right, bottom], outline=(180, 180, 180))
    vals = np.asarray([v for v in losses if np.isfinite(v)], dtype=np.float64)
    d.text((left, 6), title or f"loss over {len(losses)} steps", fill=(0, 0, 0))
    if len(vals):
        lo, hi = float(vals.min()), float(vals.max())
        hi = hi if hi > lo else lo + 1e-8
        d.text((4, top), f"{hi:.3g}", fill=(80, 80, 80))
        d.text((4, bottom - 10), f"{lo:.3g}", fill=(80, 80, 80))
        d.text((left, bottom + 8), "step 1", fill=(80, 80, 80))
        d.text((right - 60, bottom + 8), f"step {len(vals)}", fill=(80, 80, 80))

        def pts(series):
            n = max(len(series) - 1, 1)
            return [(left + (right - left) * i / n, bottom - (bottom - top) * (v - lo) / (hi - lo)) for i, v in enumerate(series)]

        if len(vals) > 1:
            d.line(pts(vals), fill=(160, 190, 230), width=1)
            k = max(1, len(vals) // 20)
            smooth = np.convolve(vals, np.ones(k) / k, mode="valid")
            if len(smooth) > 1:
                d.line(pts(smooth), fill=(20, 70, 160), width=2)
        else:
            x, y = pts(vals)[0]
            d.ellipse([x - 3, y - 3, x + 3, y + 3], fill=(20, 70, 160))
    arr = np.asarray(im, dtype=np.float32) / 255.0
    return torch.from_numpy(arr)[None]
