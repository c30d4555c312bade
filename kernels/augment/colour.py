"""Bounded colour jitter: brightness, contrast, saturation and hue, each a per-view factor drawn in a range the
user sets (hue and saturation 0 keep a concept's identity colours). Images are in [-1, 1]."""

from __future__ import annotations

import math

import torch

# ITU-R BT.601 luma, and the YIQ transform whose I/Q plane a hue turn rotates
_LUMA = torch.tensor([0.299, 0.587, 0.114])
_RGB_TO_YIQ = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])


def colour_jitter(x: torch.Tensor, brightness: torch.Tensor, contrast: torch.Tensor, saturation: torch.Tensor,
                  hue: torch.Tensor) -> torch.Tensor:
    """``x`` [B, 3, H, W] in [-1, 1] with per-view relative changes [B] (0 = unchanged): brightness scales,
    contrast stretches around the image's mean luma, saturation blends with the luma, hue rotates chroma by
    ``hue`` turns. Clamped to [-1, 1]."""
    v = (x + 1) / 2
    per = lambda t: t.to(v.dtype)[:, None, None, None]  # noqa: E731
    v = v * (1 + per(brightness))
    luma = (v * _LUMA[None, :, None, None]).sum(1, keepdim=True)
    v = (v - luma.mean((-2, -1), keepdim=True)) * (1 + per(contrast)) + luma.mean((-2, -1), keepdim=True)
    luma = (v * _LUMA[None, :, None, None]).sum(1, keepdim=True)
    v = luma + (v - luma) * (1 + per(saturation))
    if bool((hue != 0).any()):
        yiq = torch.einsum("ij,bjhw->bihw", _RGB_TO_YIQ, v)
        a = 2 * math.pi * hue.to(v.dtype)
        c, s = torch.cos(a)[:, None, None], torch.sin(a)[:, None, None]
        i, q = yiq[:, 1], yiq[:, 2]
        yiq = torch.stack([yiq[:, 0], c * i - s * q, s * i + c * q], 1)
        v = torch.einsum("ij,bjhw->bihw", torch.linalg.inv(_RGB_TO_YIQ), yiq)
    return (v.clamp(0, 1) * 2 - 1).to(x.dtype)
