"""``fuse``: several concept adapters (ED-LoRA, DreamBooth-LoRA, pivotal) fused into one file (Mix-of-Show §3.3):
the fused weights' difference from the base model and every concept's tokens. ``generate --adapter`` reads it."""

from __future__ import annotations

import os
import time

from ..core.errors import UserInputError
from ..multi_concept.fusion import DEFAULT_RIDGE
from .common import base_name, resolve_base


def add_command(sub) -> None:
    f = sub.add_parser("fuse", help="fuse several concept adapters into one model (Mix-of-Show gradient fusion)")
    f.add_argument("--base", required=True, help="diffusers model folder, a .safetensors checkpoint, or 'demo'")
    f.add_argument("--adapter", action="append", default=[], metavar="FILE[=PROMPT]",
                   help="a concept (ED-LoRA, DreamBooth-LoRA or pivotal file), repeatable; =PROMPT says what to "
                        "record it on (default: its token, or the instance prompt the file records)")
    f.add_argument("--fusion", default="gradient", choices=["gradient", "sum", "average"],
                   help="gradient (Mix-of-Show, default), or the weight-fusion baselines sum / average")
    f.add_argument("--rank", type=int, help="rank of the saved difference (default: the concepts' ranks summed, "
                                            "which stores gradient fusion exactly)")
    f.add_argument("--ridge", type=float, default=DEFAULT_RIDGE,
                   help="ridge of the least-squares solve toward the concepts' weight average, relative to the "
                        f"inputs' mean eigenvalue (default {DEFAULT_RIDGE:g}; ~0: Eq. 5's exact optimum)")
    f.add_argument("--steps", type=int, default=20, help="sampling steps recorded per prompt (Mix-of-Show: 20)")
    f.add_argument("--samples", type=int, default=2, help="images sampled per prompt while recording")
    f.add_argument("--resolution", type=int)
    f.add_argument("--seed", type=int, default=0)
    f.add_argument("--device")
    f.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    f.add_argument("--out", required=True, help="the fused file (.safetensors)")


def split_prompt(spec: str) -> tuple[str, str | None]:
    """``FILE[=PROMPT]`` → (file, prompt); a path that exists as given wins."""
    if "=" not in spec or os.path.exists(spec):
        return spec, None
    path, _, prompt = spec.partition("=")
    if not prompt.strip():
        raise UserInputError(f"--adapter {spec}: the prompt after '=' is empty")
    return path, prompt


def cmd_fuse(a) -> int:
    from tqdm import tqdm

    from ..backends.diffusers import load_pipeline, native_resolution
    from ..backends.diffusers.fusion import fuse_concepts, load_concept
    from ..core.devices import default_device
    from ..formats.fused_file import fused_metadata, fused_tensors
    from ..formats.lora_file import lora_metadata, lora_tensors
    from ..formats.safetensors_io import atomic_save, check_output_path

    if len(a.adapter) < 2:
        raise UserInputError(f"fuse needs two or more --adapter files, got {len(a.adapter)}")
    if a.rank is not None and a.rank < 1:
        raise UserInputError(f"--rank must be at least 1, got {a.rank}")
    for flag, v in (("--steps", a.steps), ("--samples", a.samples)):
        if v < 1:
            raise UserInputError(f"{flag} must be at least 1, got {v}")
    check_output_path(a.out, overwrite=a.overwrite)
    start = time.perf_counter()
    pipe = load_pipeline(resolve_base(a.base), a.device or default_device())
    concepts = [load_concept(pipe, *split_prompt(spec)) for spec in a.adapter]
    bar = tqdm(total=2 * len(concepts), desc=f"fuse ({a.fusion})", unit="concept")

    def progress(stage: str, done: int, total: int) -> None:
        bar.set_postfix_str(stage)
        if done:
            bar.update(1)

    fused = fuse_concepts(pipe, concepts, a.fusion, ridge=a.ridge, sample_steps=a.steps, samples=a.samples,
                          resolution=a.resolution or native_resolution(pipe), seed=a.seed, progress=progress)
    bar.close()
    weights = fused.low_rank(a.rank)
    ranks = sorted({w.rank for w in weights.values()})
    meta = lora_metadata(family=fused.adapters.family, method="fused", rank=max(ranks), alpha=float(max(ranks)),
                         steps=0, base_model=base_name(a.base), trainer="cli")
    meta = fused_metadata(meta, list(fused.tokens()), a.fusion, [os.path.basename(c.source) for c in concepts])
    atomic_save(fused_tensors(lora_tensors(weights), fused.tokens()), a.out, meta, overwrite=a.overwrite)
    fused.remove()
    tokens = ", ".join(fused.tokens()) or "no tokens"
    print(f"fused {len(concepts)} concepts ({a.fusion}; {len(weights)} layers, rank {'/'.join(map(str, ranks))}; "
          f"{tokens}) in {time.perf_counter() - start:.1f} s → {a.out}")
    return 0
