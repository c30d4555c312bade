"""What the train and generate commands share: base-model names and strength suffixes."""

from __future__ import annotations

import os

from ..core.errors import UserInputError


def resolve_base(base: str) -> str:
    """``demo`` → the shipped demo model folder; otherwise the path as given."""
    if base == "demo":
        from ..demo.model import demo_model_path

        return str(demo_model_path())
    return base


def base_name(base: str) -> str:
    """What a file's metadata records as its base model: ``demo`` or the folder/file name."""
    return "demo" if base == "demo" else os.path.basename(os.path.normpath(base))


def split_strength(spec: str, flag: str) -> tuple[str, float]:
    """``FILE[:STRENGTH]`` → (file, strength); a path that exists as given wins over a suffix."""
    if ":" not in spec or os.path.exists(spec):
        return spec, 1.0
    path, _, s = spec.rpartition(":")
    try:
        return path, float(s)
    except ValueError:
        raise UserInputError(f"{flag} {spec}: strength {s!r} is not a number") from None
