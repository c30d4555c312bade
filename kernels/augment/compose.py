"""Multi-concept composition: the masked subjects of several concepts side by side on one background, with the
combined caption and one mask per concept (MuDI's Seg-Mix, Jang et al. 2024 §4.1; SVDiff's Cut-Mix, Han et al.
2023 §3.3). Training on such views teaches a model that holds several concepts to keep them apart."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..core.errors import UserInputError
from .backgrounds import pick_backgrounds


@dataclass
class Subject:
    """One concept's photo ``pixels`` [3, H, W] in [-1, 1], its subject ``mask`` [1, H, W] in [0, 1] and its noun
    phrase without article (``"sks toy"``)."""

    pixels: torch.Tensor
    mask: torch.Tensor
    phrase: str


def _bbox(mask: torch.Tensor, threshold: float = 0.5) -> tuple[int, int, int, int]:
    ys, xs = torch.nonzero(mask[0] > threshold, as_tuple=True)
    if ys.numel() == 0:
        raise UserInputError("a subject mask is empty: composition needs each subject's mask")
    return int(ys.min()), int(ys.max()) + 1, int(xs.min()), int(xs.max()) + 1


def _article(phrase: str) -> str:
    return ("an " if phrase[:1].lower() in "aeiou" else "a ") + phrase


def compose_subjects(subjects: list[Subject], size: int, gen: torch.Generator, backgrounds: torch.Tensor | None = None,
                     template: str = "a photo of {}", fill: tuple[float, float] = (0.7, 0.95)
                     ) -> tuple[torch.Tensor, torch.Tensor, str]:
    """One composed view: (pixels [3, size, size], masks [k, 1, size, size], caption). The frame is cut into k
    columns in a random order; each subject (cropped to its mask's box) is scaled to fill a random ``fill`` share of
    its column (keeping its aspect, at most 90 % of the height), placed at a random height, and pasted by its mask
    onto a background (``backgrounds`` or a generated texture). The caption is ``template`` with the concepts joined
    by "and" in left-to-right order: ``"a photo of a sks toy and a zxq ball"``."""
    k = len(subjects)
    if k < 2:
        raise UserInputError(f"composition needs at least two subjects, got {k}")
    if "{}" not in template:
        raise UserInputError(f"composition template {template!r} has no '{{}}' where the subjects go")
    order = torch.randperm(k, generator=gen).tolist()
    u = torch.rand(k, 3, generator=gen)
    canvas = pick_backgrounds(backgrounds, 1, (size, size), gen)[0]
    masks = torch.zeros(k, 1, size, size)
    column = size / k
    for slot, which in enumerate(order):
        sub = subjects[which]
        y0, y1, x0, x1 = _bbox(sub.mask)
        crop, crop_mask = sub.pixels[:, y0:y1, x0:x1].float(), sub.mask[:, y0:y1, x0:x1].float()
        h, w = crop.shape[-2:]
        share = fill[0] + float(u[slot, 0]) * (fill[1] - fill[0])
        factor = min(column * share / w, 0.9 * size / h)
        nh, nw = max(1, round(h * factor)), max(1, round(w * factor))
        crop = F.interpolate(crop[None], size=(nh, nw), mode="bilinear", antialias=True, align_corners=False)[0]
        crop_mask = F.interpolate(crop_mask[None], size=(nh, nw), mode="bilinear", antialias=True,
                                  align_corners=False)[0].clamp(0, 1)
        left = int(slot * column + float(u[slot, 1]) * max(0.0, column - nw))
        top = int(float(u[slot, 2]) * (size - nh))
        region = canvas[:, top:top + nh, left:left + nw]
        canvas[:, top:top + nh, left:left + nw] = crop_mask * crop + (1 - crop_mask) * region
        masks[which, :, top:top + nh, left:left + nw] = crop_mask
    caption = template.format(" and ".join(_article(subjects[i].phrase) for i in order))
    return canvas.clamp(-1, 1), masks, caption
