"""Safe file handling: safetensors only (never pickle), atomic writes, no silent overwrite, no path escape."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..core.atomic_write import atomic_write
from ..core.errors import UserInputError


def check_output_path(path: str | os.PathLike, overwrite: bool = False, suffix: str | None = ".safetensors") -> Path:
    """Validate an output file path before any work starts: its folder exists, and it is new unless
    ``overwrite`` is set."""
    p = Path(path)
    if suffix and p.suffix != suffix:
        raise UserInputError(f"output file {p} must end in {suffix}")
    if not p.parent.is_dir():
        raise UserInputError(f"output folder {p.parent} does not exist")
    if p.exists() and not overwrite:
        raise UserInputError(f"{p} already exists (pass --overwrite to replace it)")
    if p.is_dir():
        raise UserInputError(f"{p} is a folder, not a file")
    return p


def safe_join(folder: str | os.PathLike, name: str) -> Path:
    """``folder/name``, refusing names that would leave ``folder`` (``..``, absolute paths, symlinks out)."""
    base = Path(folder).resolve()
    target = (base / name).resolve()
    if target != base and base not in target.parents:
        raise UserInputError(f"file name {name!r} points outside {base}")
    return target


def atomic_save(tensors: dict[str, torch.Tensor], path: str | os.PathLike, metadata: dict | None = None,
                overwrite: bool = False) -> Path:
    """Write a safetensors file whole or not at all (core/atomic_write.py), never over an existing file unless
    ``overwrite``. Metadata values that are not strings are stored as JSON."""
    p = Path(path)
    if p.exists() and not overwrite:
        raise UserInputError(f"{p} already exists (pass --overwrite to replace it)")
    meta = {k: v if isinstance(v, str) else json.dumps(v) for k, v in (metadata or {}).items()}
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    return atomic_write(p, lambda tmp: save_file(tensors, tmp, metadata=meta))


def load_safetensors(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read tensors and metadata; a missing, empty or non-safetensors file gives a ``UserInputError``."""
    p = Path(path)
    if not p.is_file():
        raise UserInputError(f"{p} does not exist")
    if p.stat().st_size == 0:
        raise UserInputError(f"{p} is empty (0 bytes)")
    try:
        with safe_open(str(p), framework="pt", device="cpu") as f:
            meta = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises several types for corrupt headers
        raise UserInputError(f"{p} is not a readable safetensors file ({e})") from None
    return tensors, meta
