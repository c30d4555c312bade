"""``generate``: sample a diffusers model (or the demo model) with any number of adapter files, optionally with
region prompts (``--region``, Mix-of-Show §3.4 regional sampling)."""

from __future__ import annotations

import os
import time

from ..core.errors import UserInputError
from .common import resolve_base, split_strength


def cmd_generate(a) -> int:
    from tqdm import tqdm

    from ..backends.diffusers import load_pipeline
    from ..backends.diffusers.adapters import PipelineAdapters
    from ..backends.diffusers.generate import generate_images, save_images, use_sampler
    from ..backends.diffusers.pipeline import native_resolution
    from ..core.devices import default_device
    from ..multi_concept.regions import Region, parse_region, region_masks

    if not a.prompt.strip():
        raise UserInputError("the prompt is empty")
    parsed = [parse_region(text) for text in a.region]  # syntax first, before the model loads
    if a.region_layout is not None and not 0 < a.region_layout <= 1:
        raise UserInputError(f"--region-layout must be in (0, 1], got {a.region_layout:g}")
    if (a.region_layout or a.region_attention == "off") and not parsed:
        raise UserInputError("--region-layout and --region-attention need at least one --region")
    if a.region_attention == "off" and not a.region_layout:
        raise UserInputError("--region-attention off needs --region-layout (else the regions would do nothing)")
    if os.path.exists(a.out) and not os.path.isdir(a.out):
        raise UserInputError(f"--out {a.out} is a file, not a folder")
    start = time.perf_counter()
    pipe = load_pipeline(resolve_base(a.base), a.device or default_device())
    adapters = PipelineAdapters(pipe)
    kinds = []
    for flag, specs in (("--adapter", a.adapter), ("--lora", a.lora)):
        for spec in specs:
            path, strength = split_strength(spec, flag)
            kinds.append(adapters.load(path, strength))
    regions = [(Region.from_box(box, i, label=prompt), prompt) for i, (box, prompt) in enumerate(parsed)]
    if regions:
        res = a.resolution or native_resolution(pipe)
        _, notes = region_masks([r for r, _ in regions], res, res)  # boxes against the output size
        for note in notes:
            print(f"note: {note}")
    use_sampler(pipe, a.sampler)
    images = []
    for i in tqdm(range(a.n), desc="generate", unit="img"):
        images += generate_images(pipe, a.prompt, negative=a.negative, n=1, steps=a.steps, seed=a.seed + i,
                                  guidance=a.guidance, resolution=a.resolution, adapters=adapters,
                                  regions=regions or None, region_layout=a.region_layout or 0.0,
                                  region_attention=a.region_attention == "on")
    paths = save_images(images, a.out, overwrite=a.overwrite)
    parts = ([f"{len(kinds)} adapter(s) ({', '.join(kinds)})"] if kinds else []) + \
        ([f"{len(regions)} region(s)" + (f" (layout for the first {a.region_layout:.0%} of the schedule)"
                                          if a.region_layout else "")] if regions else [])
    used = f" with {' and '.join(parts)}" if parts else ""
    print(f"wrote {len(paths)} images{used} in {time.perf_counter() - start:.1f} s → {a.out}")
    return 0
