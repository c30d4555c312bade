"""Region layout: in the first denoising steps, each region's latent crop is denoised with its own prompt.

Mix-of-Show's region-aware cross-attention (§3.4, :mod:`.regions`) binds a prompt to a region but does not
make the model *draw an object there*: the paper places objects with a T2I-Adapter sketch or pose. Without
one, a model that learned to draw its subject in the middle of the picture draws one object across the
boundary of two regions (measured on the demo world: README, "Several concepts"). The layout phase is the
remedy of area conditioning (ComfyUI's ``ConditioningSetArea``; Bar-Tal et al., MultiDiffusion, ICML 2023,
Eq. 3–5): while the timestep is in the first ``until`` of the schedule, the conditional prediction inside a
region is the denoiser's prediction *on the region's crop of the latent* with the region's prompt, so the
region is a small picture of its own and the model draws its subject in it; later steps run on the whole
latent (with regional cross-attention if asked) and make the picture one scene.

Backend-independent math: :func:`layout_crops` (where each region's crop lies on the latent grid and how much
of each latent pixel belongs to it), :func:`compose_layout` (the composed prediction, overlaps averaged
as in :func:`.regions.combine_weights`) and :func:`per_sample` (a denoiser input cut to the rows a crop run
takes).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..core.errors import UserInputError


@dataclass(frozen=True, eq=False)
class LayoutCrop:
    """One region's crop of the latent: rows ``y0:y1``, columns ``x0:x1`` (exclusive ends), and ``weight``
    [y1-y0, x1-x0] in [0, 1], the share of each latent pixel inside the region (0 in the crop's margin)."""

    y0: int
    y1: int
    x0: int
    x1: int
    weight: torch.Tensor

    def crop(self, x: torch.Tensor) -> torch.Tensor:
        """``x[..., y0:y1, x0:x1]``."""
        return x[..., self.y0:self.y1, self.x0:self.x1]


def _span(lo: int, hi: int, size: int, multiple: int) -> tuple[int, int]:
    """[lo, hi) grown around its centre to a length that is a multiple of ``multiple`` and kept inside
    [0, size) (``size`` itself is a multiple)."""
    length = min(size, -(-(hi - lo) // multiple) * multiple)
    start = max(0, min(size - length, (lo + hi - length) // 2))
    return start, start + length


def layout_crops(masks: torch.Tensor, latent_height: int, latent_width: int, multiple: int = 1) -> list[LayoutCrop]:
    """Each region's crop of a ``latent_height`` × ``latent_width`` latent.

    ``masks`` [R, H, W] are the image-size region masks of :func:`.regions.region_masks`; they are
    area-pooled to the latent grid (a latent pixel half inside a box weighs 0.5). The crop is the bounding
    box of the pooled mask, grown to a multiple of ``multiple`` latent pixels on each side (the denoiser's
    total down-sampling factor, so every level of a UNet has whole tokens) and kept inside the latent.
    """
    if masks.dim() != 3:
        raise ValueError(f"region masks must be [R, H, W], got {tuple(masks.shape)}")
    if multiple < 1 or latent_height % multiple or latent_width % multiple:
        raise UserInputError(f"the latent ({latent_height}×{latent_width}) is not a multiple of the model's "
                             f"down-sampling factor {multiple}; choose an image size the model accepts")
    pooled = F.adaptive_avg_pool2d(masks.float()[:, None], (latent_height, latent_width))[:, 0].clamp(0, 1)
    crops = []
    for i, w in enumerate(pooled):
        rows, cols = torch.nonzero(w.sum(1) > 0).flatten(), torch.nonzero(w.sum(0) > 0).flatten()
        if not len(rows):
            raise UserInputError(f"region {i + 1} covers no latent pixel; make it larger")
        y0, y1 = _span(int(rows[0]), int(rows[-1]) + 1, latent_height, multiple)
        x0, x1 = _span(int(cols[0]), int(cols[-1]) + 1, latent_width, multiple)
        crops.append(LayoutCrop(y0, y1, x0, x1, w[y0:y1, x0:x1].clone()))
    return crops


def per_sample(value, rows, batch: int):
    """``value`` restricted to ``rows`` (a slice or an index tensor) where it is per-sample: a tensor with ``batch``
    rows, or a dict of such values (SDXL's added conditioning); anything else as it is."""
    if isinstance(value, torch.Tensor) and value.dim() and value.shape[0] == batch:
        return value[rows.to(value.device) if isinstance(rows, torch.Tensor) else rows]
    if isinstance(value, dict):
        return {k: per_sample(v, rows, batch) for k, v in value.items()}
    return value


def compose_layout(global_prediction: torch.Tensor, region_predictions: list[torch.Tensor],
                   crops: list[LayoutCrop]) -> torch.Tensor:
    """The layout phase's prediction [B, C, H, W]: ``(1 − min(s, 1))·ε_global + Σ_r w_r·ε_r / max(s, 1)`` with
    ``s = Σ_r w_r`` per latent pixel; ``ε_r`` [B, C, h_r, w_r] is region r's prediction on its crop, ``w_r`` its
    weight (0 outside the crop). Inside one box the region's prediction replaces the global one; where
    regions overlap they are averaged; a soft mask edge blends."""
    if len(region_predictions) != len(crops):
        raise ValueError(f"{len(crops)} crops need as many predictions, got {len(region_predictions)}")
    h, w = global_prediction.shape[-2:]
    total = global_prediction.new_zeros(h, w)
    summed = torch.zeros_like(global_prediction)
    for pred, c in zip(region_predictions, crops):
        if pred.shape[-2:] != (c.y1 - c.y0, c.x1 - c.x0):
            raise ValueError(f"a region prediction of {tuple(pred.shape[-2:])} does not fit its crop "
                             f"{(c.y1 - c.y0, c.x1 - c.x0)}")
        weight = c.weight.to(global_prediction)
        total[c.y0:c.y1, c.x0:c.x1] += weight
        summed[..., c.y0:c.y1, c.x0:c.x1] += weight * pred.to(global_prediction)
    return (1 - total.clamp(max=1)) * global_prediction + summed / total.clamp(min=1)
