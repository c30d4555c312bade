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


def _rows(v: Views, keep: slice) -> Views:
    """Rows ``keep`` of a batch of views."""
    def part(t):
        return None if t is None else t[keep]
    return Views(v.pixels[keep], part(v.masks), v.valid[keep], v.captions[keep], part(v.scales), part(v.rescaled),
                 part(v.replaced))


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
    ``denoiser`` it only draws pixel views (previews). A training pool keeps latents, not pixels (K views of 10
    photos at 1024 px would be gigabytes)."""

    def __init__(self, data: TrainData, cfg, denoiser=None):
        self.denoiser, self.data, self.cfg = denoiser, data, cfg
        self.settings = cfg.augment
        self.augmenter = Augmenter(self.settings, data.backgrounds)
        self.pool_views: list[Views] | None = None  # previews only
        self.pool: list[dict] | None = None  # per pool entry: scales, rescaled (+ mean, std, weight when training)
        if self.settings.views:
            n = data.instance.shape[0]
            self.pool, views = [], []
            for k in range(self.settings.views):
                v = self.augmenter(data.instance, data.masks, [""] * n, step_generator(cfg.seed + 7_919_113, k))
                entry = {"scales": v.scales, "rescaled": v.rescaled}
                if denoiser is not None:
                    entry.update(zip(("mean", "std", "weight"), self._encoded(v)))
                else:
                    views.append(v)
                self.pool.append(entry)
            self.pool_views = views if denoiser is None else None

    def _encoded(self, views: Views) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        mean, std = encode(self.denoiser, views.pixels)
        return mean, std, self._loss_weight(views, mean.shape[-2:])

    def _loss_weight(self, views: Views, size) -> torch.Tensor:
        """Valid region × (subject + ``background_loss_weight`` × rest) at latent size (area-averaged)."""
        m = views.masks
        weight = views.valid if m is None else views.valid * (m + self.cfg.background_loss_weight * (1 - m))
        return F.interpolate(weight, size=tuple(size), mode="area")

    def _pool_pick(self, idx: torch.Tensor, captions: list[str], gen: torch.Generator
                   ) -> tuple[torch.Tensor, list[str]]:
        """Which pool entry each sample uses, and the captions drawn for those views."""
        which = torch.randint(0, len(self.pool), (idx.shape[0],), generator=gen)
        scales = torch.stack([self.pool[int(k)]["scales"][int(i)] for k, i in zip(which, idx)])
        rescaled = torch.stack([self.pool[int(k)]["rescaled"][int(i)] for k, i in zip(which, idx)])
        return which, caption_views(captions, scales, rescaled, self.settings, gen)

    def _fresh(self, idx: torch.Tensor, captions: list[str], gen: torch.Generator) -> Views:
        masks = None if self.data.masks is None else self.data.masks[idx]
        return self.augmenter(self.data.instance[idx], masks, captions, gen)

    def views(self, idx: torch.Tensor, captions: list[str], step: int, micro: int) -> Views:
        """The pixel views of photos ``idx`` at this micro-batch, as training draws them."""
        gen = augment_generator(self.cfg.seed, step, micro)
        if self.pool is None:
            return self._fresh(idx, captions, gen)
        if self.pool_views is None:
            raise RuntimeError("pixel views of a training pool are not kept; build AugmentedInstances without a "
                               "denoiser to preview them")
        which, out_captions = self._pool_pick(idx, captions, gen)
        v = _pick(self.pool_views, which, idx)
        v.captions = out_captions
        return v

    def sample(self, idx: torch.Tensor, captions: list[str], step: int, micro: int, keep: slice = slice(None)
               ) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
        """(latents [B,C,h,w], loss weights [B,1,h,w], captions) of the photos ``idx`` with base ``captions``.
        ``keep``: the rows wanted (one process's shard of a global batch, engine/distributed.py); every draw is made
        for all rows, so the rows kept are those of the whole batch, but only they are encoded."""
        gen = augment_generator(self.cfg.seed, step, micro)
        if self.pool is None:
            v = self._fresh(idx, captions, gen)
            mean, std, weight = self._encoded(v if keep == slice(None) else _rows(v, keep))
            out_captions = v.captions
        else:
            which, out_captions = self._pool_pick(idx, captions, gen)
            mean, std, weight = (torch.stack([self.pool[int(k)][key][int(i)] for k, i in zip(which[keep], idx[keep])])
                                 for key in ("mean", "std", "weight"))
        noise = torch.randn((idx.shape[0],) + tuple(mean.shape[1:]), generator=gen)[keep]
        return mean + std * noise, weight, out_captions[keep]


def training_views(data: TrainData, cfg, count: int) -> list[tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, str]]:
    """The first ``count`` instance views a run with ``cfg`` trains on, in order: (pixels [3,R,R], subject mask
    [1,R,R] or None, valid region [1,R,R], caption). No model is needed."""
    aug = AugmentedInstances(data, cfg)
    out = []
    step = 0
    while len(out) < count:
        for micro in range(cfg.grad_accum):
            idx, captions = instance_draw(cfg, data.instance.shape[0], step, micro, step_generator(cfg.seed, step, micro))
            v = aug.views(idx, captions, step, micro)
            for i in range(idx.shape[0]):
                out.append((v.pixels[i], None if v.masks is None else v.masks[i], v.valid[i], v.captions[i]))
        step += 1
    return out[:count]
