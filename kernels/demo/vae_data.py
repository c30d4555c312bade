"""Training data for the demo model's VAE beyond the world's own renders (issue 13).

The world draws nine colours and flat objects; a VAE trained on that alone maps every other colour to a world
colour and blurs patterns of a few pixels, so a user's concept (or a bundled concept's checker pattern) cannot
survive its latent space. Two augmentations widen what the VAE sees without changing what the UNet learns:
:func:`hue_shift` turns the whole scene into arbitrary hues and saturations, and :func:`paste_patches` adds
patches of random colour, flat or patterned (stripes, checkers, dots, periods down to 2 pixels).
"""

from __future__ import annotations

import math

import torch


def hue_shift(x: torch.Tensor, g: torch.Generator, p: float = 0.5) -> torch.Tensor:
    """Rotate the hue of a fraction ``p`` of the images (pixels in [-1, 1], [B, 3, H, W]) by a random angle about
    the grey axis and scale their saturation by 0.6–1.6; the rest pass unchanged."""
    b = x.shape[0]
    pick = torch.rand(b, generator=g) < p
    if not pick.any():
        return x
    angle = torch.rand(b, generator=g) * 2 * math.pi
    sat = 0.6 + torch.rand(b, generator=g)
    k = torch.full((3,), 1 / math.sqrt(3))
    kx = torch.tensor([[0, -k[2], k[1]], [k[2], 0, -k[0]], [-k[1], k[0], 0]])
    eye = torch.eye(3)
    rot = (eye + torch.sin(angle)[:, None, None] * kx
           + (1 - torch.cos(angle))[:, None, None] * (kx @ kx))  # Rodrigues
    grey = torch.full((3, 3), 1 / 3)
    m = grey + sat[:, None, None] * (rot - grey)  # rotate, then scale the distance from grey
    y = ((x + 1) / 2).flatten(2)
    y = (torch.einsum("bij,bjn->bin", m, y).clamp(0, 1) * 2 - 1).view_as(x)
    return torch.where(pick[:, None, None, None], y, x)


def _pattern(h: int, w: int, g: torch.Generator) -> torch.Tensor:
    """A [h, w] 0/1 field: flat, stripes, checker or dots, with a random period of 2–8 pixels and angle."""
    kind = int(torch.randint(0, 4, (1,), generator=g))
    if kind == 0:
        return torch.zeros(h, w)
    yy, xx = torch.meshgrid(torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32), indexing="ij")
    period = 2 + 6 * float(torch.rand(1, generator=g))
    a = float(torch.rand(1, generator=g)) * math.pi
    u = (xx * math.cos(a) + yy * math.sin(a)) / period
    v = (-xx * math.sin(a) + yy * math.cos(a)) / period
    if kind == 1:
        return (torch.floor(u) % 2).float()
    if kind == 2:
        return ((torch.floor(u) + torch.floor(v)) % 2).float()
    return (((u - torch.floor(u) - 0.5) ** 2 + (v - torch.floor(v) - 0.5) ** 2) < 0.09).float()


def paste_patches(x: torch.Tensor, g: torch.Generator, p: float = 0.5, most: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """Paste 1–``most`` patches (rectangle or ellipse, 4–24 pixels, flat or two-colour pattern, random RGB
    colours) into a fraction ``p`` of the images. Returns the images and the pasted area (bool [B, 1, H, W])."""
    b, _, h, w = x.shape
    x = x.clone()
    area = torch.zeros(b, 1, h, w, dtype=torch.bool)
    for i in range(b):
        if float(torch.rand(1, generator=g)) >= p:
            continue
        for _ in range(int(torch.randint(1, most + 1, (1,), generator=g))):
            ph, pw = (int(v) for v in torch.randint(4, min(24, h, w) + 1, (2,), generator=g))
            y0 = int(torch.randint(0, h - ph + 1, (1,), generator=g))
            x0 = int(torch.randint(0, w - pw + 1, (1,), generator=g))
            shape = torch.ones(ph, pw, dtype=torch.bool)
            if float(torch.rand(1, generator=g)) < 0.5:
                yy, xx = torch.meshgrid(torch.linspace(-1, 1, ph), torch.linspace(-1, 1, pw), indexing="ij")
                shape = yy ** 2 + xx ** 2 <= 1
            c1, c2 = torch.rand(2, 3, generator=g) * 2 - 1
            sel = _pattern(ph, pw, g)
            fill = c1[:, None, None] * (1 - sel) + c2[:, None, None] * sel
            region = x[i, :, y0:y0 + ph, x0:x0 + pw]
            region[:, shape] = fill[:, shape]
            area[i, 0, y0:y0 + ph, x0:x0 + pw] |= shape
    return x, area
