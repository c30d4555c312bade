"""Geometric transforms of a view: scale, rotation, shift and mirror as one affine warp, applied identically to the
photo, its subject mask and its valid region (the part of the frame the photo covers).

A view at scale s shows the photo s times as large as the frame: s < 1 shrinks it onto a canvas at a random place
(Custom Diffusion §3.2), s > 1 enlarges it and shows a random crop. Coordinates are normalised to [-1, 1]
(``align_corners=False``), so a warp does not depend on the source's resolution: shrinking samples a
pre-downscaled (antialiased) copy of the source.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

#: the subject's centre stays within this part of the frame when a view enlarges the photo
CENTRE_LIMIT = 0.7


@dataclass
class Geometry:
    """One affine transform per view: ``scale`` [B], ``angle`` [B] (radians, counter-clockwise), ``shift`` [B, 2]
    (x, y in normalised frame coordinates), ``flip`` [B] bool (mirror before the rest)."""

    scale: torch.Tensor
    angle: torch.Tensor
    shift: torch.Tensor
    flip: torch.Tensor

    def forward_matrix(self) -> torch.Tensor:
        """[B, 2, 2]: photo coordinates → frame coordinates (before the shift): s · R(angle) · diag(±1, 1)."""
        c, s = torch.cos(self.angle), torch.sin(self.angle)
        rot = torch.stack([torch.stack([c, -s], -1), torch.stack([s, c], -1)], -2)
        mirror = torch.ones(self.scale.shape[0], 2)
        mirror[self.flip, 0] = -1.0
        return self.scale[:, None, None] * rot * mirror[:, None, :]

    def theta(self) -> torch.Tensor:
        """[B, 2, 3] for ``F.affine_grid``: frame coordinates → photo coordinates (the inverse transform)."""
        inv = torch.linalg.inv(self.forward_matrix())
        return torch.cat([inv, -(inv @ self.shift[:, :, None])], dim=2)


def draw_shift(geometry_without_shift: Geometry, centres: torch.Tensor | None, u: torch.Tensor) -> torch.Tensor:
    """Shifts [B, 2] from uniforms ``u`` [B, 2]: anywhere the shrunk photo stays inside the frame (s < 1) or the
    frame stays inside the enlarged photo (s > 1); when enlarging, also keeping the subject's centre (``centres``
    [B, 2] in photo coordinates, from its mask) within :data:`CENTRE_LIMIT` of the frame's middle where possible."""
    s = geometry_without_shift.scale[:, None]
    room = (1.0 - s).abs()
    lo, hi = -room, room.clone()
    if centres is not None:
        at = (geometry_without_shift.forward_matrix() @ centres[:, :, None])[:, :, 0]  # subject centre, unshifted
        enlarge = (s > 1.0).expand_as(lo)
        lo = torch.where(enlarge, torch.maximum(lo, -CENTRE_LIMIT - at), lo)
        hi = torch.where(enlarge, torch.minimum(hi, CENTRE_LIMIT - at), hi)
        empty = lo > hi  # cannot have both: keep the subject as central as the crop allows
        nearest = torch.clamp(-at, -room, room)
        lo, hi = torch.where(empty, nearest, lo), torch.where(empty, nearest, hi)
    return lo + u * (hi - lo)


def mask_centres(masks: torch.Tensor) -> torch.Tensor:
    """Centroids [B, 2] (x, y, normalised coordinates) of soft masks [B, 1, H, W]; the middle for empty masks."""
    h, w = masks.shape[-2:]
    ys = (torch.arange(h, dtype=torch.float32) + 0.5) / h * 2 - 1
    xs = (torch.arange(w, dtype=torch.float32) + 0.5) / w * 2 - 1
    m = masks[:, 0].float()
    total = m.sum((-2, -1)).clamp_min(1e-6)
    cx = (m * xs[None, None, :]).sum((-2, -1)) / total
    cy = (m * ys[None, :, None]).sum((-2, -1)) / total
    return torch.stack([cx, cy], -1)


def warp(x: torch.Tensor, geometry: Geometry, mode: str = "bilinear") -> torch.Tensor:
    """``x`` [B, C, H, W] seen through each view's transform; outside the photo is 0. A view that shrinks samples an
    antialiased copy downscaled to about its size in the frame (no aliasing of fine patterns)."""
    b, _, h, w = x.shape
    grid = F.affine_grid(geometry.theta(), [b, 1, h, w], align_corners=False)
    out = []
    for i in range(b):
        src = x[i:i + 1]
        s = float(geometry.scale[i])
        if s < 0.95 and mode == "bilinear":
            size = (max(1, math.ceil(h * s)), max(1, math.ceil(w * s)))
            src = F.interpolate(src, size=size, mode="bilinear", antialias=True, align_corners=False)
        out.append(F.grid_sample(src, grid[i:i + 1], mode=mode, padding_mode="zeros", align_corners=False))
    return torch.cat(out)
