"""Drawing augmented training views: the policy the training loop calls every step.

One call turns a batch of photos (with their subject masks and captions) into views: colour jitter, then one affine
warp (mirror, scale, rotation, shift) shared by the photo, its mask and its valid region, then, where a subject mask
exists, a new background; the caption gets the scale tag of the view and the shuffle/dropout of its tags. Every
random number comes from the generator passed in, in a fixed order and amount, so a view is a pure function of the
generator's seed: the loop seeds it with (seed, step, micro-batch), and resume stays bit-identical.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .backgrounds import check_backgrounds, pick_backgrounds
from .caption_ops import caption_views
from .colour import colour_jitter
from .geometry import Geometry, draw_shift, mask_centres, warp
from .settings import AugmentSettings


@dataclass
class Views:
    """``pixels`` [B, 3, H, W] in [-1, 1]; ``masks`` [B, 1, H, W] the subject masks carried along (None without
    masks); ``valid`` [B, 1, H, W]: 1 where the view shows the photo or a chosen background, 0 on the empty (mid-grey)
    canvas around a shrunk or rotated photo (leave it out of the loss); ``captions``; ``scales`` [B] (1 = not rescaled);
    ``rescaled`` [B] bool; ``replaced`` [B] bool: the background was replaced."""

    pixels: torch.Tensor
    masks: torch.Tensor | None
    valid: torch.Tensor
    captions: list[str]
    scales: torch.Tensor
    rescaled: torch.Tensor
    replaced: torch.Tensor


def _symmetric(u: torch.Tensor, bound: float) -> torch.Tensor:
    return (u * 2 - 1) * bound


class Augmenter:
    """Draws views under ``settings``; ``backgrounds`` [K, 3, H, W] in [-1, 1] are the user's backgrounds (None:
    generated textures)."""

    def __init__(self, settings: AugmentSettings, backgrounds: torch.Tensor | None = None):
        self.settings = settings
        self.backgrounds = backgrounds
        check_backgrounds(backgrounds)

    def __call__(self, pixels: torch.Tensor, masks: torch.Tensor | None, captions: list[str],
                 gen: torch.Generator) -> Views:
        s = self.settings
        b = pixels.shape[0]
        size = tuple(pixels.shape[-2:])
        # every draw, always, in this order (views do not depend on which parts are switched on)
        u_flip, u_rescale, u_scale, u_angle = (torch.rand(b, generator=gen) for _ in range(4))
        u_shift = torch.rand(b, 2, generator=gen)
        u_colour = torch.rand(b, 4, generator=gen)
        u_bg = torch.rand(b, generator=gen)
        replacing = masks is not None and bool(s.background)
        backgrounds = pick_backgrounds(self.backgrounds, b, size, gen, render=replacing)

        x = pixels.float()
        if s.brightness or s.contrast or s.saturation or s.hue:
            x = colour_jitter(x, _symmetric(u_colour[:, 0], s.brightness), _symmetric(u_colour[:, 1], s.contrast),
                              _symmetric(u_colour[:, 2], s.saturation), _symmetric(u_colour[:, 3], s.hue))
        rescaled = u_rescale < s.rescale
        scale = torch.where(rescaled, s.scale_min + u_scale * (s.scale_max - s.scale_min), torch.ones(b))
        geometry = Geometry(scale=scale, angle=_symmetric(u_angle, math.radians(s.rotate)), shift=torch.zeros(b, 2),
                            flip=u_flip < s.flip)
        geometry.shift = draw_shift(geometry, None if masks is None else mask_centres(masks), u_shift)
        moved = bool(rescaled.any() or s.rotate or geometry.flip.any())
        valid = torch.ones(b, 1, *size)
        out_masks = None if masks is None else masks.float()
        if moved:
            x = warp(x, geometry)
            valid = warp(valid, geometry).clamp(0, 1)
            out_masks = None if masks is None else warp(out_masks, geometry).clamp(0, 1)
        replaced = torch.zeros(b, dtype=torch.bool)
        if replacing:
            replaced = u_bg < s.background
            keep = torch.where(replaced[:, None, None, None], out_masks, torch.ones_like(valid))
            x = keep * x + (1 - keep) * backgrounds
            valid = torch.where(replaced[:, None, None, None], torch.ones_like(valid), valid)
        out_captions = caption_views(captions, scale, rescaled, s, gen)
        return Views(x.clamp(-1, 1).to(pixels.dtype), out_masks, valid, out_captions, scale, rescaled, replaced)
