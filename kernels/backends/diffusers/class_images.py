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


def default_cache_dir(base: str, class_prompt: str, resolution: int) -> Path:
    """``$FEWSHOT_CACHE`` (or ``~/.cache/fewshot_personalize``)/class_images/<hash of base, prompt, size>."""
    key = hashlib.sha256(f"{os.path.abspath(base) if base != 'demo' else 'demo'}|{class_prompt}|{resolution}".encode()).hexdigest()[:12]
    return cache_root() / "class_images" / key


def count_images(folder: Path) -> int:
    return sum(1 for f in folder.iterdir() if f.suffix.lower() in IMAGE_EXTENSIONS) if folder.is_dir() else 0


def ensure_class_images(pipe, class_prompt: str, folder: str | os.PathLike, num: int, *, seed: int = 0,
                        steps: int = 25, resolution: int | None = None, guidance: float = 7.5,
                        on_image: Callable[[int, int], None] | None = None) -> Path:
    """Make sure ``folder`` holds at least ``num`` class images, generating only the missing ones."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    have = count_images(folder)
    missing = max(0, num - have)
    for i in range(missing):
        im = generate_images(pipe, class_prompt, n=1, steps=steps, seed=seed + 100_000 + have + i,
                             guidance=guidance, resolution=resolution)
        save_images(im, folder, prefix=f"class_{have + i:04d}_")
        if on_image is not None:
            on_image(i + 1, missing)
    return folder
