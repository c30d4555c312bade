"""Training losses: DreamBooth prior preservation, min-SNR-γ weighting, offset noise."""

from __future__ import annotations

import torch


def min_snr_weights(snr: torch.Tensor, gamma: float, prediction_type: str) -> torch.Tensor:
    """Per-sample loss weights of Min-SNR-γ (Hang et al. 2023, arXiv 2303.09556, eq. 10 / §3.4).

    The ε-loss weight is min(SNR, γ)/SNR; for v-prediction min(SNR, γ)/(SNR+1); for x_0-prediction min(SNR, γ).
    """
    clipped = torch.clamp(snr, max=gamma)
    if prediction_type == "epsilon":
        return clipped / snr
    if prediction_type == "v_prediction":
        return clipped / (snr + 1)
    return clipped


def offset_noise(shape, generator: torch.Generator, offset: float, dtype=torch.float32) -> torch.Tensor:
    """Gaussian noise plus ``offset`` × a per-channel constant (Guttenberg 2023, "diffusion with offset
    noise"); lets the model learn very dark / bright images."""
    noise = torch.randn(shape, generator=generator, dtype=dtype)
    if offset:
        noise = noise + offset * torch.randn(shape[:2] + (1,) * (len(shape) - 2), generator=generator, dtype=dtype)
    return noise


def per_sample_mse(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean squared error per sample, optionally over a (broadcastable) loss mask only."""
    err = (pred.float() - target.float()) ** 2
    if mask is None:
        return err.flatten(1).mean(1)
    mask = mask.to(err.dtype).expand_as(err)
    return (err * mask).flatten(1).sum(1) / mask.flatten(1).sum(1).clamp_min(1.0)


def prior_preservation_loss(per_sample: torch.Tensor, is_prior: torch.Tensor, prior_weight: float,
                            weights: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """DreamBooth's class-specific prior-preservation loss (Ruiz et al. 2023, arXiv 2208.12242, eq. 2):
    E[w‖x̂(α x + σ ε, c) − x‖²] + λ E[w'‖x̂(α x_pr + σ ε', c_pr) − x_pr‖²].

    Args:
        per_sample: loss of each sample in the batch, shape [B].
        is_prior: bool [B], True for class (prior) samples.
        prior_weight: λ.
        weights: optional per-sample weights (e.g. min-SNR).
    Returns:
        (total, instance term, prior term); a term with no samples is 0.
    """
    if weights is not None:
        per_sample = per_sample * weights
    zero = per_sample.new_zeros(())
    inst = per_sample[~is_prior].mean() if (~is_prior).any() else zero
    prior = per_sample[is_prior].mean() if is_prior.any() else zero
    return inst + prior_weight * prior, inst, prior
