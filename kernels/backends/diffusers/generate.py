"""Sampling with a diffusers pipeline and this project's adapter files.

* LoRA files are merged into the weights (ΔW = s·α/r·up@down); embeddings bundled in them (pivotal tuning)
  are installed as placeholders.
* Textual Inversion files become placeholder tokens of the pipeline's text encoder(s).
* CatVersion files add K/V tokens to the text encoders' self-attention for the prompt only: the negative
  (unconditional) branch is encoded without them, as in the paper.
With placeholders or K/V tokens on a pipeline, prompts are encoded here (:class:`PipelineAdapters`) and handed
to the pipeline as embeddings.
* Regions (Mix-of-Show §3.4): each (region, prompt) pair binds its prompt to its part of the image through
  region-aware cross-attention processors (:mod:`.regional`), installed around the pipeline call only.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence

import torch
from PIL import Image

from ...core.errors import UserInputError
from ...core.images import write_pngs
from ...multi_concept.regions import Region, region_masks
from .adapters import PipelineAdapters
from .pipeline import native_resolution
from .region_layout import install_region_layout
from .regional import encode_region_prompts, install_regional_attention

log = logging.getLogger(__name__)

SAMPLERS = ("dpm", "ddim", "euler", "model")


def use_sampler(pipe, name: str = "dpm") -> None:
    """Swap the pipeline's scheduler for sampling (the training schedule stays in its config)."""
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler

    classes = {"dpm": DPMSolverMultistepScheduler, "ddim": DDIMScheduler, "euler": EulerDiscreteScheduler}
    if name == "model":
        return
    if name not in classes:
        raise UserInputError(f"sampler must be one of {SAMPLERS}, got {name!r}")
    pipe.scheduler = classes[name].from_config(pipe.scheduler.config)


@torch.no_grad()
def generate_images(pipe, prompt: str, *, negative: str | None = None, n: int = 1, steps: int = 25,
                    seed: int = 0, guidance: float = 7.5, resolution: int | None = None,
                    batch: int = 4, adapters: PipelineAdapters | None = None,
                    regions: Sequence[tuple[Region, str]] | None = None,
                    region_layout: float = 0.0, region_attention: bool = True) -> list[Image.Image]:
    """``n`` images of ``prompt``; image i uses seed ``seed + i`` (so any one image can be reproduced).

    ``regions``: (Region, prompt) pairs for Mix-of-Show's regional sampling (§3.4): inside each region the
    cross-attention uses its prompt instead of ``prompt`` (the negative branch is untouched); the processors
    are removed again when the call ends, also on errors. ``region_layout`` > 0: for that share of the schedule
    (from the noisiest step) each region's latent crop is also denoised with its own prompt
    (:mod:`.region_layout`), so each region draws its own object; ``region_attention=False`` leaves the layout
    alone, without region-aware cross-attention.
    """
    if not prompt or not prompt.strip():
        raise UserInputError("the prompt is empty")
    if n < 1 or steps < 1:
        raise UserInputError(f"--n and --steps must be at least 1 (got {n}, {steps})")
    res = resolution or native_resolution(pipe)
    regional = layout = None
    if region_layout and not regions:
        raise UserInputError("a region layout needs regions (--region)")
    if regions and not region_attention and not region_layout:
        raise UserInputError("regions without regional cross-attention need a region layout (--region-layout)")
    if regions:
        masks, notes = region_masks([r for r, _ in regions], res, res)
        for note in notes:
            log.info("note: %s", note)
        contexts = encode_region_prompts(pipe, [p for _, p in regions], adapters)
        guided = uses_guidance(pipe, guidance)
        if region_attention:
            regional = install_regional_attention(pipe, contexts, masks, res, res, guided=guided)
        if region_layout:
            layout = install_region_layout(pipe, contexts, masks, region_layout, guided=guided, regional=regional)
    images: list[Image.Image] = []
    try:
        for start in range(0, n, batch):
            k = min(batch, n - start)
            gens = [torch.Generator().manual_seed(seed + start + i) for i in range(k)]
            if adapters is not None and adapters.active:
                text = adapters.pipeline_kwargs(prompt, negative, k)
            else:
                text = {"prompt": [prompt] * k, "negative_prompt": None if negative is None else [negative] * k}
            out = pipe(**text, num_inference_steps=steps, guidance_scale=guidance, height=res, width=res,
                       generator=gens)
            images.extend(out.images)
    finally:
        for handle in (layout, regional):
            if handle is not None:
                handle.remove()
    return images


def uses_guidance(pipe, guidance: float) -> bool:
    """Whether the pipeline batches [uncond, cond] rows for classifier-free guidance (as diffusers' Stable
    Diffusion pipelines decide: scale > 1 and no guidance-embedding UNet)."""
    return guidance > 1 and getattr(pipe.unet.config, "time_cond_proj_dim", None) is None


def save_images(images: list[Image.Image], out_dir: str | os.PathLike, prefix: str = "", overwrite: bool = False) -> list[str]:
    """Write PNGs ``<prefix>000.png`` … into ``out_dir`` (created if missing); never overwrites unless asked."""
    os.makedirs(out_dir, exist_ok=True)
    return write_pngs({os.path.join(out_dir, f"{prefix}{i:03d}.png"): im for i, im in enumerate(images)}, overwrite)
