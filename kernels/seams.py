"""The two interfaces the trainer talks to (DESIGN.md "The engine's seams").

The trainer never knows whether it runs on diffusers modules or inside ComfyUI: a back end provides a
``Denoiser`` and a ``TextEncoder``. Adapters are placed on the modules these name, by module path under
their ``root`` modules; kohya prefixes say how those paths are written in LoRA files.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
from torch import nn

from .noise_schedule import NoiseSchedule

FAMILIES = ("sd1", "sd2", "sdxl")


@dataclass
class Conditioning:
    """Text conditioning: ``context`` [B, L, D] for cross-attention; ``pooled`` [B, P] (SDXL) or None."""

    context: torch.Tensor
    pooled: torch.Tensor | None = None

    def select(self, index: torch.Tensor) -> "Conditioning":
        return Conditioning(self.context[index], None if self.pooled is None else self.pooled[index])

    @staticmethod
    def cat(parts: list["Conditioning"]) -> "Conditioning":
        pooled = None if parts[0].pooled is None else torch.cat([p.pooled for p in parts])
        return Conditioning(torch.cat([p.context for p in parts]), pooled)


@dataclass
class AdapterRoot:
    """A module tree adapters may be placed in: its kohya key prefix and the paths of its adaptable layers."""

    prefix: str
    module: nn.Module
    paths: list[str]


class Denoiser(Protocol):
    family: str
    schedule: NoiseSchedule

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor: ...
    def target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor: ...
    def predict(self, x_t: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor: ...
    def encode_images(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Pixels [N,3,H,W] in [-1,1] → (mean, std) of the scaled latent distribution."""
        ...
    def adapter_roots(self, targets: tuple[str, ...]) -> list[AdapterRoot]: ...
    def set_gradient_checkpointing(self, on: bool) -> None: ...


class TextEncoder(Protocol):
    family: str

    def encode(self, prompts: list[str]) -> Conditioning: ...
    def adapter_roots(self, targets: tuple[str, ...]) -> list[AdapterRoot]: ...
    def set_gradient_checkpointing(self, on: bool) -> None: ...
