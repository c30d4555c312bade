"""A set of images to score (generated images, references or class images) with optional subject masks, read from
a folder (masks as ``NAME_mask.png``, ``masks/NAME.png`` or transparency, as for training) or given as tensors."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..core.errors import UserInputError
from ..core.images import IMAGE_EXTENSIONS, MASK_SUFFIX, list_images, open_image, read_mask, to_rgb
from .masking import subject_crop


@dataclass
class ImageSet:
    """``images``: [H,W,3] tensors in 0..1 (sizes may differ); ``masks``: None, or one [H,W] tensor (1 = subject) or
    None (whole image) per image; ``names`` for messages. Counts and sizes are checked here."""

    label: str
    images: list[torch.Tensor]
    masks: list[torch.Tensor | None] | None = None
    names: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.images:
            raise UserInputError(f"no {self.label} were given")
        self.names = self.names or [f"{self.label} #{i}" for i in range(len(self.images))]
        for name, im in zip(self.names, self.images):
            if im.ndim != 3 or im.shape[-1] != 3:
                raise UserInputError(f"{name}: expected an RGB image [H,W,3], got shape {tuple(im.shape)}")
        if self.masks is None:
            return
        if len(self.masks) != len(self.images):
            raise UserInputError(f"{len(self.masks)} masks for {len(self.images)} {self.label}: give one mask per "
                                 "image")
        for name, im, m in zip(self.names, self.images, self.masks):
            if m is not None and tuple(m.shape) != tuple(im.shape[:2]):
                raise UserInputError(f"the mask of {name} is {m.shape[-1]}x{m.shape[0]} but the image is "
                                     f"{im.shape[1]}x{im.shape[0]}: masks must have their image's size")

    def __len__(self) -> int:
        return len(self.images)

    @property
    def has_masks(self) -> bool:
        return self.masks is not None and any(m is not None for m in self.masks)

    def subjects(self, background: Sequence[float]) -> list[torch.Tensor]:
        """Each image cut to its subject on ``background`` (:func:`subject_crop`); images without a mask whole."""
        if not self.has_masks:
            return list(self.images)
        out = []
        for name, im, m in zip(self.names, self.images, self.masks):
            try:
                out.append(im if m is None else subject_crop(im, m, background))
            except UserInputError as e:
                raise UserInputError(f"{name}: {e}") from None
        return out

    @classmethod
    def from_batch(cls, label: str, images: torch.Tensor, masks: torch.Tensor | None = None) -> "ImageSet":
        """A batch [B,H,W,C] in 0..1 (C = 3 or 4; alpha is ignored) and optional masks [B,H,W]."""
        if images.ndim == 3:
            images = images[None]
        if images.ndim != 4 or images.shape[-1] not in (3, 4):
            raise UserInputError(f"{label}: expected images [B,H,W,3], got shape {tuple(images.shape)}")
        ims = list(images[..., :3].float().clamp(0, 1))
        ms = None
        if masks is not None:
            masks = masks[None] if masks.ndim == 2 else masks
            if masks.ndim != 3:
                raise UserInputError(f"{label}: expected masks [B,H,W], got shape {tuple(masks.shape)}")
            ms = list(masks.float())
        return cls(label, ims, ms)

    @classmethod
    def from_folder(cls, label: str, folder: str | os.PathLike) -> tuple["ImageSet", list[str]]:
        """The images of ``folder`` at their own size with their masks (mask files must match their photo's size
        and every mask file must have a photo); returns (set, notes)."""
        files = list_images(folder)
        _check_orphan_masks(Path(folder), files)
        images, masks, notes = [], [], []
        for f in files:
            im = open_image(f)
            mask, source = read_mask(f, im)
            if source is not None and mask.size != im.size:
                raise UserInputError(f"mask {source} is {mask.size[0]}x{mask.size[1]} but {f} is "
                                     f"{im.size[0]}x{im.size[1]}: masks must have their photo's size")
            images.append(torch.from_numpy(np.asarray(to_rgb(im), dtype=np.float32) / 255.0))
            masks.append(None if mask is None else torch.from_numpy(np.asarray(mask, dtype=np.float32) / 255.0))
        found = sum(m is not None for m in masks)
        if found and found < len(files):
            notes.append(f"{len(files) - found} of {len(files)} {label} in {folder} have no mask: scored whole")
        return cls(label, images, masks if found else None, [str(f) for f in files]), notes


def _check_orphan_masks(folder: Path, photos: list[Path]) -> None:
    """A mask file without its photo means masks and photos do not pair up: refuse it."""
    stems = {p.stem for p in photos}
    candidates = [(m, m.stem[: -len(MASK_SUFFIX)]) for m in folder.iterdir()
                  if m.is_file() and m.suffix.lower() in IMAGE_EXTENSIONS and m.stem.endswith(MASK_SUFFIX)]
    if (folder / "masks").is_dir():
        candidates += [(m, m.stem) for m in (folder / "masks").iterdir()
                       if m.is_file() and m.suffix.lower() in IMAGE_EXTENSIONS]
    for mask, stem in sorted(candidates):
        if stem not in stems:
            raise UserInputError(f"mask {mask} has no photo named {stem}.* in {folder}: every mask needs its photo")
