"""IMAGE / MASK handling of the trainer node and its loss-curve picture.

Policy for training images of any size: scale the shorter side to the training resolution, then centre-crop a
square (the project's one policy, ``kernels.core.images.scaled_crop_box``). A mask is cropped the same
way as its image; a mask whose size differs from its image is first resized to the image's size (bilinear),
and the node says so in the log and in its UI text (``notes``).
"""

from __future__ import annotations

import logging

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ...kernels.core.errors import UserInputError
from ...kernels.core.images import resize_center_crop_tensor as resize_center_crop
from ...kernels.core.plots import loss_curve

log = logging.getLogger(__name__)


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


def pil_to_image(im: Image.Image) -> torch.Tensor:
    """A PIL picture as a ComfyUI IMAGE [1,H,W,3] in 0..1."""
    return torch.from_numpy(np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0)[None]


def loss_curve_image(losses: list[float], title: str = "") -> torch.Tensor:
    """The engine's loss-per-step chart (raw and moving average) as a ComfyUI IMAGE."""
    return pil_to_image(loss_curve(losses, title=title or f"loss over {len(losses)} steps", size=(512, 256)))
