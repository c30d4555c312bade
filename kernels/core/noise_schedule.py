"""Discrete DDPM noise schedule: forward noising, training targets and SNR.

Ho et al. 2020 (arXiv 2006.11239) eq. 4: x_t = sqrt(ᾱ_t) x_0 + sqrt(1-ᾱ_t) ε. Targets: ε (SD1.x), v = sqrt(ᾱ_t) ε
- sqrt(1-ᾱ_t) x_0 (Salimans & Ho 2022, arXiv 2202.00512 §4; SD2.x 768-v), or x_0 itself ("sample").
Both back ends build one of these: diffusers from ``scheduler.alphas_cumprod``, ComfyUI from
``model_sampling.sigmas`` (ᾱ = 1 / (1 + σ²)).
"""

from __future__ import annotations

import torch

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


class NoiseSchedule:
    def __init__(self, alphas_cumprod: torch.Tensor, prediction_type: str = "epsilon"):
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")
        self.alphas_cumprod = alphas_cumprod.detach().to(torch.float64).cpu()
        self.prediction_type = prediction_type

    @classmethod
    def from_sigmas(cls, sigmas: torch.Tensor, prediction_type: str = "epsilon") -> "NoiseSchedule":
        """From k-diffusion style σ_t (ComfyUI's ``model_sampling.sigmas``): ᾱ_t = 1 / (1 + σ_t²)."""
        return cls(1.0 / (1.0 + sigmas.to(torch.float64) ** 2), prediction_type)

    @property
    def num_timesteps(self) -> int:
        return self.alphas_cumprod.shape[0]

    def _coef(self, t: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        a = self.alphas_cumprod[t.cpu().long()].to(device=like.device, dtype=like.dtype)
        a = a.view(-1, *([1] * (like.ndim - 1)))
        return a.sqrt(), (1 - a).sqrt()

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x_t = sqrt(ᾱ_t) x_0 + sqrt(1-ᾱ_t) ε (DDPM eq. 4)."""
        sa, s1a = self._coef(t, x0)
        return sa * x0 + s1a * noise

    def target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """What the denoiser output is trained towards, by prediction type."""
        if self.prediction_type == "epsilon":
            return noise
        if self.prediction_type == "v_prediction":
            sa, s1a = self._coef(t, x0)
            return sa * noise - s1a * x0
        return x0

    def snr(self, t: torch.Tensor) -> torch.Tensor:
        """Signal-to-noise ratio ᾱ_t / (1 - ᾱ_t), float32 per sample."""
        a = self.alphas_cumprod[t.cpu().long()]
        return (a / (1 - a)).to(torch.float32)
