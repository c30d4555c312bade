"""How much of the training images a model's VAE keeps: the ceiling of any method on that model.

A latent diffusion model can only draw what its autoencoder can decode (Rombach et al. 2022 §3.1), so before
blaming a method users should know what an encode → decode round trip of their own photos loses. Three numbers
over the subject (the mask, when given) or the whole image: PSNR; *fine detail kept*, the share of the images'
high-frequency part (image − 3×3 box blur) the round trip reproduces, 1 − ‖d − d̂‖² / ‖d‖²; and the colour error,
mean absolute difference per channel of the subject's mean colour, as a fraction of the value range.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _detail(x: torch.Tensor) -> torch.Tensor:
    return x - F.avg_pool2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), 3, stride=1)


def round_trip_report(original: torch.Tensor, reconstructed: torch.Tensor, masks: torch.Tensor | None = None) -> dict:
    """``original``/``reconstructed``: [N, 3, H, W] in [-1, 1]; ``masks``: [N, 1, H, W] (1 = subject) or None.
    Returns ``psnr_db``, ``detail_kept`` (≤ 1; 1 = every fine detail reproduced) and ``colour_error`` (0–1)."""
    if original.shape != reconstructed.shape:
        raise ValueError(f"round trip changed the image shape: {tuple(original.shape)} → {tuple(reconstructed.shape)}")
    x, y = original.float(), reconstructed.float().clamp(-1, 1)
    w = torch.ones_like(x[:, :1]) if masks is None else masks.to(x.dtype).expand(-1, 1, -1, -1)
    if masks is not None and masks.shape[-2:] != x.shape[-2:]:
        raise ValueError(f"masks are {tuple(masks.shape[-2:])}, images {tuple(x.shape[-2:])}")
    area = w.sum().clamp_min(1.0) * 3
    mse = ((x - y) ** 2 * w).sum() / area
    dx, dy = _detail(x), _detail(y)
    kept = 1 - ((dx - dy) ** 2 * w).sum() / ((dx ** 2) * w).sum().clamp_min(1e-12)
    per_image = w.sum(dim=(2, 3)).clamp_min(1.0)
    colour = ((x * w).sum(dim=(2, 3)) / per_image - (y * w).sum(dim=(2, 3)) / per_image).abs() / 2
    return {"psnr_db": float(10 * torch.log10(4 / mse.clamp_min(1e-12))), "detail_kept": float(kept),
            "colour_error": float(colour.mean()), "images": int(x.shape[0]), "masked": masks is not None}


def describe(report: dict) -> str:
    """One line for people: ``VAE round trip of the instance images: PSNR 27.1 dB, fine detail kept 81 %, …``."""
    where = "subject" if report["masked"] else "images"
    return (f"VAE round trip of the {report['images']} instance images ({where}): PSNR {report['psnr_db']:.1f} dB, "
            f"fine detail kept {100 * report['detail_kept']:.0f} %, colour error {100 * report['colour_error']:.1f} % "
            "— what this model's VAE loses, no method can learn")
