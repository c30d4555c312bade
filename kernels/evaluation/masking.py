"""The subject alone, as the masked scores see it (CatVersion arXiv 2311.14631 reports masked CLIP-I): the image
composited on a neutral background and cropped to the mask's bounding box, made square around the subject."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..core.errors import UserInputError

#: a pixel belongs to the subject's bounding box when its mask value exceeds this
THRESHOLD = 0.5


def subject_crop(image: torch.Tensor, mask: torch.Tensor, background: Sequence[float]) -> torch.Tensor:
    """``image`` [H,W,3] in 0..1 and ``mask`` [H,W] (1 = subject, soft edges allowed) → [S,S,3]: the image blended
    onto ``background`` (an RGB colour in 0..1, the feature model's mean, so it normalises to zero) by the mask,
    cut to the square of side S = the longer side of the mask's bounding box, centred on the box; what the square
    holds beyond the image is background."""
    if image.shape[:2] != mask.shape:
        raise UserInputError(f"a mask of {mask.shape[1]}x{mask.shape[0]} does not fit an image of "
                             f"{image.shape[1]}x{image.shape[0]}")
    m = mask.to(image.dtype).clamp(0, 1)
    bg = torch.as_tensor(background, dtype=image.dtype).view(1, 1, 3)
    blended = image * m[..., None] + bg * (1 - m[..., None])
    ys, xs = torch.nonzero(m > THRESHOLD, as_tuple=True)
    if ys.numel() == 0:
        raise UserInputError("the mask is empty (no pixel above 0.5): it marks no subject")
    top, bottom, left, right = int(ys.min()), int(ys.max()) + 1, int(xs.min()), int(xs.max()) + 1
    side = max(bottom - top, right - left)
    y0, x0 = (top + bottom - side) // 2, (left + right - side) // 2
    h, w = m.shape
    canvas = bg.expand(side, side, 3).clone()
    sy, sx = max(y0, 0), max(x0, 0)
    ey, ex = min(y0 + side, h), min(x0 + side, w)
    canvas[sy - y0:ey - y0, sx - x0:ex - x0] = blended[sy:ey, sx:ex]
    return canvas
