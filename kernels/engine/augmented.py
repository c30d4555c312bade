"""Instance latents seen through augmentation (kernels/augment), as the training loop draws them.

Augmentation works on pixels, so it cannot use latents encoded once. Two ways, chosen by ``AugmentSettings.views``:
- 0: every step draws fresh views of its photos and encodes them (exact; the VAE encoder runs once per sample and
  step, cheap next to the denoiser's forward and backward pass on a GPU and at the demo model's size);
- K > 0: a pool of K views per photo is drawn and encoded once; each step picks one of them per sample (for slow
  VAEs, e.g. SDXL at 1024 px on a CPU). Captions are still drawn per step, with the scale tag of the view picked.
Either way every draw is a pure function of (seed, step, micro-batch): resume stays bit-identical.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..augment.caption_ops import caption_views
from ..augment.views import Augmenter
from .data import TrainData, augment_generator, encode, step_generator


class AugmentedInstances:
    """Draws augmented instance samples: latents, per-pixel loss weights at latent size, captions."""

    def __init__(self, denoiser, data: TrainData, cfg):
        self.denoiser, self.data, self.cfg = denoiser, data, cfg
        self.settings = cfg.augment
        self.augmenter = Augmenter(self.settings, data.backgrounds)
        self.pool = None
        if self.settings.views:
            self.pool = [self._encoded_views(torch.arange(data.instance.shape[0]), ["" for _ in range(data.instance.shape[0])],
                                             step_generator(cfg.seed + 7_919_113, k))
                         for k in range(self.settings.views)]

    def _encoded_views(self, idx: torch.Tensor, captions: list[str], gen: torch.Generator) -> dict:
        masks = None if self.data.masks is None else self.data.masks[idx]
        views = self.augmenter(self.data.instance[idx], masks, captions, gen)
        mean, std = encode(self.denoiser, views.pixels)
        return {"mean": mean, "std": std, "weight": self._loss_weight(views.valid, views.masks, mean.shape[-2:]),
                "scales": views.scales, "rescaled": views.rescaled, "captions": views.captions}

    def _loss_weight(self, valid: torch.Tensor, masks: torch.Tensor | None, size) -> torch.Tensor:
        """Valid region × (subject + ``background_loss_weight`` × rest) at latent size (area-averaged)."""
        weight = valid if masks is None else valid * (masks + self.cfg.background_loss_weight * (1 - masks))
        return F.interpolate(weight, size=tuple(size), mode="area")

    def sample(self, idx: torch.Tensor, captions: list[str], step: int, micro: int
               ) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
        """(latents [B,C,h,w], loss weights [B,1,h,w], captions) of the photos ``idx`` with base ``captions``."""
        gen = augment_generator(self.cfg.seed, step, micro)
        if self.pool is None:
            v = self._encoded_views(idx, captions, gen)
            return v["mean"] + v["std"] * torch.randn(v["mean"].shape, generator=gen), v["weight"], v["captions"]
        which = torch.randint(0, len(self.pool), (idx.shape[0],), generator=gen)
        pick = lambda key: torch.stack([self.pool[int(k)][key][int(i)] for k, i in zip(which, idx)])  # noqa: E731
        mean, std = pick("mean"), pick("std")
        out_captions = caption_views(captions, pick("scales"), pick("rescaled"), self.settings, gen)
        return mean + std * torch.randn(mean.shape, generator=gen), pick("weight"), out_captions
