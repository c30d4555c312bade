"""Region layout on a diffusers UNet: in the first steps each region's latent crop is denoised with its own prompt
(:mod:`...multi_concept.region_layout`), so each region gets its own object; later steps see the whole latent.

The UNet's ``forward`` is wrapped on the instance (the class is untouched). Under classifier-free guidance
only the conditional rows (the second half of [uncond, cond]) are composed. Region contexts are those of
:func:`.regional.encode_region_prompts` (ED-LoRA's layer-wise contexts arrive stacked and are routed as the
global prompt's are). When regional cross-attention is installed as well, it is paused during the crop calls
(its masks are image-size).
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import nullcontext

import torch

from ...core.errors import UserInputError
from ...engine.seams import Handle, replace_forwards
from ...multi_concept.region_layout import compose_layout, layout_crops, per_sample


def down_sampling_factor(unet) -> int:
    """How much a UNet2DConditionModel shrinks the latent at its deepest level: 2 per down block but the last."""
    return 2 ** max(0, len(unet.config.down_block_types) - 1)


def install_region_layout(pipe, region_contexts: Sequence[torch.Tensor], masks: torch.Tensor, until: float, *,
                          guided: bool = True, regional=None) -> Handle:
    """Compose the UNet's conditional prediction from region crops while ``t ≥ (1 − until)·T``.

    Args:
        pipe: a diffusers Stable Diffusion / SDXL pipeline (``.unet``, ``.scheduler``).
        region_contexts: one context per region [1 or B_cond, T, D].
        masks: [R, H, W] image-size region masks (``region_masks``), one per context.
        until: the share of the schedule (by timestep, from the noisiest end) with the layout; 0 < until ≤ 1.
        guided: [uncond, cond] batches (classifier-free guidance): only the second half is composed.
        regional: the :class:`.regional.RegionalHandle` of regional cross-attention on the same UNet, paused
            during the crop calls; None when there is none.
    Returns a :class:`Handle` whose ``remove()`` puts the UNet's forward back.
    """
    if not 0 < until <= 1:
        raise UserInputError(f"the region layout share must be in (0, 1], got {until}")
    if masks.dim() != 3 or masks.shape[0] != len(region_contexts):
        raise ValueError(f"{len(region_contexts)} region contexts need masks [R={len(region_contexts)}, H, W], "
                         f"got {tuple(masks.shape)}")
    unet = pipe.unet
    original = unet.forward
    factor, horizon = down_sampling_factor(unet), float(pipe.scheduler.config.num_train_timesteps)
    crops_by_size: dict[tuple[int, int], list] = {}

    def forward(sample, timestep, encoder_hidden_states=None, *args, **kwargs):
        out = original(sample, timestep, encoder_hidden_states, *args, **kwargs)
        t = float(torch.as_tensor(timestep).flatten()[0])
        if t < (1 - until) * horizon:
            return out
        prediction = out[0] if isinstance(out, tuple) else out.sample
        batch = sample.shape[0]
        if guided and batch % 2:
            raise ValueError(f"region layout expects [uncond, cond] batches under classifier-free guidance, got "
                             f"an odd batch of {batch}")
        rows = slice(batch // 2, batch) if guided else slice(0, batch)
        size = tuple(sample.shape[-2:])
        if size not in crops_by_size:
            crops_by_size[size] = layout_crops(masks, size[0], size[1], factor)
        crops = crops_by_size[size]
        cond = sample[rows]
        step = per_sample(torch.as_tensor(timestep, device=sample.device), rows, batch)
        extra = [per_sample(a, rows, batch) for a in args]
        extra_kw = {k: per_sample(v, rows, batch) for k, v in kwargs.items()}
        region_predictions = []
        with regional.paused() if regional is not None else nullcontext():
            for crop, context in zip(crops, region_contexts):
                context = context.to(device=cond.device, dtype=encoder_hidden_states.dtype)
                context = context.expand(cond.shape[0], -1, -1) if context.shape[0] == 1 else context
                r = original(crop.crop(cond), step, context, *extra, **extra_kw)
                region_predictions.append(r[0] if isinstance(r, tuple) else r.sample)
        composed = prediction.clone()
        composed[rows] = compose_layout(prediction[rows], region_predictions, crops)
        if isinstance(out, tuple):
            return (composed, *out[1:])
        return type(out)(sample=composed)

    return replace_forwards([(unet, forward)])
