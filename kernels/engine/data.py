"""Training data and the randomness of each step.

All randomness of optimizer step s comes from a generator seeded with (seed, s, micro-batch), so a run
interrupted at any step and resumed from its checkpoint ends bit-identical to an uninterrupted one on the CPU.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..augment.backgrounds import check_backgrounds
from ..core.errors import UserInputError


@dataclass
class TrainData:
    """Instance images [N,3,R,R] in [-1,1], optional instance masks [N,1,R,R] in [0,1] (loss mask, and where
    augmentation may replace the background), optional class (prior) images [M,3,R,R], optional backgrounds
    [K,3,R,R] in [-1,1] for augmentation (None: generated textures)."""

    instance: torch.Tensor
    class_images: torch.Tensor | None = None
    masks: torch.Tensor | None = None
    backgrounds: torch.Tensor | None = None

    def __post_init__(self):
        if self.instance.ndim != 4 or self.instance.shape[0] == 0:
            raise UserInputError("no instance images to train on")
        if self.masks is not None and self.masks.shape[-2:] != self.instance.shape[-2:]:
            raise UserInputError(f"masks are {tuple(self.masks.shape[-2:])} but images are {tuple(self.instance.shape[-2:])}")
        if self.masks is not None and self.masks.shape[0] != self.instance.shape[0]:
            raise UserInputError(f"{self.masks.shape[0]} masks for {self.instance.shape[0]} images: one mask per image")
        check_backgrounds(self.backgrounds)


def step_generator(seed: int, step: int, micro: int = 0) -> torch.Generator:
    """The generator of one micro-batch: a pure function of (seed, step, micro)."""
    return torch.Generator().manual_seed((seed * 1_000_003 + step * 9_176 + micro) % (2**63))


def epoch_indices(n: int, count: int, start: int, seed: int) -> torch.Tensor:
    """Indices ``start … start+count-1`` of an endless sequence of seeded permutations of range(n)
    (every image is seen once per epoch)."""
    out = []
    for pos in range(start, start + count):
        epoch, i = divmod(pos, n)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 7_919 + epoch))
        out.append(int(perm[i]))
    return torch.tensor(out)


def augment_generator(seed: int, step: int, micro: int = 0) -> torch.Generator:
    """The generator of one micro-batch's augmentation draws (separate from :func:`step_generator`, so switching
    augmentation on changes nothing else a step draws)."""
    return step_generator(seed + 104_729, step, micro)


def encode(denoiser, pixels: torch.Tensor, batch: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, std) of the latent distributions of ``pixels``, in batches, on the CPU."""
    with torch.no_grad():
        parts = [denoiser.encode_images(pixels[i:i + batch]) for i in range(0, pixels.shape[0], batch)]
    return torch.cat([p[0] for p in parts]).cpu(), torch.cat([p[1] for p in parts]).cpu()


class LatentCache:
    """VAE latent distributions of the training images (+ their mirror images when flipping), encoded once."""

    def __init__(self, denoiser, pixels: torch.Tensor, flip: bool, batch: int = 8):
        self.mean, self.std = encode(denoiser, pixels, batch)
        self.flip_mean = self.flip_std = None
        if flip:
            self.flip_mean, self.flip_std = encode(denoiser, pixels.flip(-1), batch)

    def sample(self, idx: torch.Tensor, flipped: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        mean, std = self.mean[idx].clone(), self.std[idx].clone()
        if flipped.any():
            mean[flipped], std[flipped] = self.flip_mean[idx[flipped]], self.flip_std[idx[flipped]]
        return mean + std * torch.randn(mean.shape, generator=gen)
