"""New backgrounds for a subject: the user's own background images, or generated textures (smooth colour fields,
gradients, soft stripes) when none are given. Putting the masked subject onto them breaks the link between the
subject and the one setting its few photos share (background replacement, as in Break-A-Scene / MuDI practice)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..core.errors import UserInputError
from ..core.images import resize_center_crop_tensor

TEXTURES = ("smooth", "gradient", "stripes")


def check_backgrounds(backgrounds: torch.Tensor | None) -> None:
    """Refuse an empty background set (None means generated textures)."""
    if backgrounds is not None and backgrounds.shape[0] == 0:
        raise UserInputError("the background set is empty: give at least one background image, or none to use "
                             "generated textures")


def generated_backgrounds(n: int, size: tuple[int, int], gen: torch.Generator, render: bool = True
                          ) -> torch.Tensor | None:
    """``n`` textures [n, 3, H, W] in [-1, 1], each of a kind drawn from :data:`TEXTURES` (a fixed number of draws
    per texture, so the result is a pure function of the generator's state). ``render=False`` makes the same draws
    and returns None (the caller does not need the pictures)."""
    h, w = size
    kinds = torch.randint(0, len(TEXTURES), (n,), generator=gen)
    colours = torch.rand(n, 2, 3, generator=gen) * 2 - 1
    fields = torch.rand(n, 3, 4, 4, generator=gen) * 2 - 1
    angle = torch.rand(n, generator=gen) * math.pi
    period = 6 + torch.rand(n, generator=gen) * 18  # pixels
    if not render:
        return None
    ys, xs = torch.meshgrid(torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32), indexing="ij")
    out = []
    for i in range(n):
        along = (xs * torch.cos(angle[i]) + ys * torch.sin(angle[i]))
        if TEXTURES[int(kinds[i])] == "smooth":
            bg = F.interpolate(fields[i:i + 1], size=(h, w), mode="bicubic", align_corners=False)[0] * 0.7
        elif TEXTURES[int(kinds[i])] == "gradient":
            t = (along - along.min()) / (along.max() - along.min()).clamp_min(1e-6)
            bg = colours[i, 0, :, None, None] * (1 - t) + colours[i, 1, :, None, None] * t
        else:
            t = 0.5 + 0.5 * torch.sin(2 * math.pi * along / period[i])
            bg = colours[i, 0, :, None, None] * (1 - t) + colours[i, 1, :, None, None] * t
        out.append(bg.clamp(-1, 1))
    return torch.stack(out) if out else torch.zeros(0, 3, h, w)


def pick_backgrounds(backgrounds: torch.Tensor | None, n: int, size: tuple[int, int],
                     gen: torch.Generator, render: bool = True) -> torch.Tensor | None:
    """``n`` backgrounds [n, 3, H, W]: drawn (with a random mirror) from the user's ``backgrounds`` [K, 3, H', W']
    in [-1, 1], resized to ``size``, or generated when ``backgrounds`` is None. Both branches, and ``render=False``
    (the same draws, no pictures, returns None), draw the same amount."""
    check_backgrounds(backgrounds)
    pick = torch.rand(n, generator=gen)
    mirror = torch.rand(n, generator=gen) < 0.5
    textures = generated_backgrounds(n, size, gen, render=render and backgrounds is None)
    if not render or backgrounds is None:
        return textures
    idx = (pick * backgrounds.shape[0]).long().clamp_max(backgrounds.shape[0] - 1)
    chosen = backgrounds[idx].float()
    if chosen.shape[-2:] != size:
        chosen = resize_center_crop_tensor(chosen, size[0]) if size[0] == size[1] \
            else F.interpolate(chosen, size=size, mode="bilinear", antialias=True, align_corners=False)
    return torch.where(mirror[:, None, None, None], chosen.flip(-1), chosen)
