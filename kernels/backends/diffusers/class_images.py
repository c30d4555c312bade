"""DreamBooth class (prior) images: from a folder, or generated once by the frozen base model and cached
(Ruiz et al. 2023 §3.3: x_pr = x̂(z_t1, c_pr) sampled from the model before fine-tuning)."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from pathlib import Path

from .generate import generate_images, save_images
from ...core.cache import cache_root
from ...core.images import IMAGE_EXTENSIONS


def default_cache_dir(base: str | os.PathLike, class_prompt: str, resolution: int) -> Path:
    """``$FEWSHOT_CACHE`` (or ``~/.cache/fewshot_personalize``)/class_images/<hash of base, its weight files'
    identity, prompt, size>: a model replaced at the same path (a new shipped demo model, a retrained folder) gets
    class images of its own instead of the old model's."""
    path = Path(base).resolve()
    key = hashlib.sha256(f"{path}|{_weights_identity(path)}|{class_prompt}|{resolution}".encode()).hexdigest()[:12]
    return cache_root() / "class_images" / key


def _weights_identity(path: Path) -> str:
    """Name, size and modification time of every file of a model folder (or of the single checkpoint file): cheap
    for multi-GB models, and changed by any rewrite of the weights."""
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path] if path.exists() else []
    return ";".join(f"{p.relative_to(path) if path.is_dir() else p.name}:{p.stat().st_size}:{p.stat().st_mtime_ns}"
                    for p in files)


def count_images(folder: Path) -> int:
    return sum(1 for f in folder.iterdir() if f.suffix.lower() in IMAGE_EXTENSIONS) if folder.is_dir() else 0


def ensure_class_images(pipe, class_prompt: str, folder: str | os.PathLike, num: int, *, seed: int = 0,
                        steps: int = 25, resolution: int | None = None, guidance: float = 7.5,
                        on_image: Callable[[int, int], None] | None = None, have: int | None = None,
                        part: tuple[int, int] = (0, 1)) -> Path:
    """Make sure ``folder`` holds at least ``num`` class images, generating only the missing ones. Each image has
    its own seed, so several processes can share the work: ``part=(k, n)`` makes the k-th of every n missing images,
    given the count ``have`` that all of them saw before any started."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    have = count_images(folder) if have is None else have
    mine = list(range(have, max(have, num)))[part[0]::part[1]]
    for done, i in enumerate(mine, 1):
        im = generate_images(pipe, class_prompt, n=1, steps=steps, seed=seed + 100_000 + i,
                             guidance=guidance, resolution=resolution)
        save_images(im, folder, prefix=f"class_{i:04d}_")
        if on_image is not None:
            on_image(done, len(mine))
    return folder
