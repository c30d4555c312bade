"""``generate``: sample a diffusers model (or the demo model) with any number of adapter files."""

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
    from ..core.devices import default_device

    if not a.prompt.strip():
        raise UserInputError("the prompt is empty")
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
    use_sampler(pipe, a.sampler)
    images = []
    for i in tqdm(range(a.n), desc="generate", unit="img"):
        images += generate_images(pipe, a.prompt, negative=a.negative, n=1, steps=a.steps, seed=a.seed + i,
                                  guidance=a.guidance, resolution=a.resolution, adapters=adapters)
    paths = save_images(images, a.out, overwrite=a.overwrite)
    used = f" with {len(kinds)} adapter(s) ({', '.join(kinds)})" if kinds else ""
    print(f"wrote {len(paths)} images{used} in {time.perf_counter() - start:.1f} s → {a.out}")
    return 0
