"""Instance samples seen through augmentation (kernels/augment), as the training loop draws them.

Augmentation works on pixels, so it cannot use latents encoded once. Two ways, chosen by ``AugmentSettings.views``:
- 0: every step draws fresh views of its photos and encodes them (exact; the VAE encoder runs once per sample and
  step, cheap next to the denoiser's forward and backward pass on a GPU and at the demo model's size);
- K > 0: a pool of K views per photo is drawn and encoded once; each step picks one of them per sample (for slow
  VAEs, e.g. SDXL at 1024 px on a CPU). Captions are still drawn per step, with the scale tag of the view picked.
Either way every draw is a pure function of (seed, step, micro-batch): resume stays bit-identical, and
:func:`training_views` shows exactly the views a run will train on.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..augment.caption_ops import caption_views
from ..augment.views import Augmenter, Views
from .data import TrainData, augment_generator, encode, epoch_indices, step_generator


def instance_draw(cfg, n_images: int, step: int, micro: int, gen: torch.Generator) -> tuple[torch.Tensor, list[str]]:
    """The photos (indices) and base captions of one micro-batch: the loop's first draws of an augmented step."""
    bs = cfg.batch_size
    idx = epoch_indices(n_images, bs, (step * cfg.grad_accum + micro) * bs, cfg.seed)
    n_inst = len(cfg.instance_prompts)
    rows = torch.randint(0, n_inst, (bs,), generator=gen) if n_inst > 1 else torch.zeros(bs, dtype=torch.long)
    return idx, [cfg.instance_prompts[int(r)] for r in rows]


def _pick(views: list[Views], which: torch.Tensor, idx: torch.Tensor) -> Views:
    """Views of photos ``idx`` taken from pool entries ``which``."""
    def stack(name):
        parts = [getattr(views[int(k)], name) for k in which]
        if parts[0] is None:
            return None
        return torch.stack([p[int(i)] for p, i in zip(parts, idx)])
    return Views(stack("pixels"), stack("masks"), stack("valid"), [], stack("scales"), stack("rescaled"),
                 stack("replaced"))


class AugmentedInstances:
    """Draws augmented instance samples: latents, per-pixel loss weights at latent size, captions. Without a
    ``denoiser`` it only draws pixel views (previews)."""

    def __init__(self, data: TrainData, cfg, denoiser=None):
        self.denoiser, self.data, self.cfg = denoiser, data, cfg
        self.settings = cfg.augment
        self.augmenter = Augmenter(self.settings, data.backgrounds)
        self.pool_views: list[Views] | None = None
        self.pool: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] | None = None
        if self.settings.views:
            n = data.instance.shape[0]
            self.pool_views = [self.augmenter(data.instance, data.masks, [""] * n,
                                              step_generator(cfg.seed + 7_919_113, k))
                               for k in range(self.settings.views)]
            if denoiser is not None:
                self.pool = [self._encoded(v) for v in self.pool_views]

    def _encoded(self, views: Views) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        mean, std = encode(self.denoiser, views.pixels)
        return mean, std, self._loss_weight(views, mean.shape[-2:])

    def _loss_weight(self, views: Views, size) -> torch.Tensor:
        """Valid region × (subject + ``background_loss_weight`` × rest) at latent size (area-averaged)."""
        m = views.masks
        weight = views.valid if m is None else views.valid * (m + self.cfg.background_loss_weight * (1 - m))
        return F.interpolate(weight, size=tuple(size), mode="area")

    def views(self, idx: torch.Tensor, captions: list[str], step: int, micro: int
              ) -> tuple[Views, torch.Tensor | None, torch.Tensor]:
        """(the pixel views of photos ``idx`` at this micro-batch, the pool entries picked or None, the generator
        for what follows)."""
        gen = augment_generator(self.cfg.seed, step, micro)
        if self.pool_views is None:
            masks = None if self.data.masks is None else self.data.masks[idx]
            return self.augmenter(self.data.instance[idx], masks, captions, gen), None, gen
        which = torch.randint(0, len(self.pool_views), (idx.shape[0],), generator=gen)
        v = _pick(self.pool_views, which, idx)
        v.captions = caption_views(captions, v.scales, v.rescaled, self.settings, gen)
        return v, which, gen

    def sample(self, idx: torch.Tensor, captions: list[str], step: int, micro: int
               ) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
        """(latents [B,C,h,w], loss weights [B,1,h,w], captions) of the photos ``idx`` with base ``captions``."""
        v, which, gen = self.views(idx, captions, step, micro)
        if which is None:
            mean, std, weight = self._encoded(v)
        else:
            parts = [tuple(t[int(i)] for t in self.pool[int(k)]) for k, i in zip(which, idx)]
            mean, std, weight = (torch.stack([p[j] for p in parts]) for j in range(3))
        return mean + std * torch.randn(mean.shape, generator=gen), weight, v.captions


def training_views(data: TrainData, cfg, count: int) -> list[tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, str]]:
    """The first ``count`` instance views a run with ``cfg`` trains on, in order: (pixels [3,R,R], subject mask
    [1,R,R] or None, valid region [1,R,R], caption). No model is needed."""
    aug = AugmentedInstances(data, cfg)
    out = []
    step = 0
    while len(out) < count:
        for micro in range(cfg.grad_accum):
            idx, captions = instance_draw(cfg, data.instance.shape[0], step, micro, step_generator(cfg.seed, step, micro))
            v = aug.views(idx, captions, step, micro)[0]
            for i in range(idx.shape[0]):
                out.append((v.pixels[i], None if v.masks is None else v.masks[i], v.valid[i], v.captions[i]))
        step += 1
    return out[:count]
