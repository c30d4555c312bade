"""Loading a few training photos: any size and mode PIL reads, EXIF rotation honoured, transparency
composited onto a background, resized (shorter side) and centre-cropped to the training resolution."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from .atomic_write import atomic_write
from .errors import UserInputError

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}


MASK_SUFFIX = "_mask"


def is_mask_file(path: Path) -> bool:
    return path.stem.endswith(MASK_SUFFIX)


def list_images(folder: str | os.PathLike) -> list[Path]:
    """Image files directly in ``folder`` (not ``*_mask.*`` files), sorted by name; errors if the folder is missing
    or has none."""
    p = Path(folder)
    if not p.is_dir():
        raise UserInputError(f"image folder {p} does not exist")
    files = sorted(f for f in p.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS and not is_mask_file(f))
    if not files:
        raise UserInputError(f"image folder {p} has no images ({', '.join(sorted(IMAGE_EXTENSIONS))})")
    return files


def open_image(path: str | os.PathLike) -> Image.Image:
    """Open one image as PIL reads it, EXIF orientation applied; a clear error for empty or unreadable files."""
    path = Path(path)
    if path.stat().st_size == 0:
        raise UserInputError(f"image {path} is empty (0 bytes)")
    try:
        with Image.open(path) as im:
            im.load()
            return ImageOps.exif_transpose(im)
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        raise UserInputError(f"image {path} cannot be read ({e})") from None


def open_rgb(path: str | os.PathLike, background=(255, 255, 255)) -> Image.Image:
    """Open one image as RGB: EXIF orientation applied, alpha composited on ``background``."""
    return to_rgb(open_image(path), background)


def to_rgb(im: Image.Image, background=(255, 255, 255)) -> Image.Image:
    """Convert any PIL mode to RGB, compositing transparency (RGBA, LA, P with transparency) on ``background``."""
    if im.mode in ("RGBA", "LA") or (im.mode == "P" and "transparency" in im.info):
        rgba = im.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, tuple(background) + (255,))
        canvas.alpha_composite(rgba)
        return canvas.convert("RGB")
    if im.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(im, dtype=np.float64)
        arr = (255 * arr / max(arr.max(), 1)).astype(np.uint8)
        return Image.fromarray(arr).convert("RGB")
    return im.convert("RGB")


def scaled_crop_box(h: int, w: int, resolution: int) -> tuple[int, int, int, int]:
    """The one resize-and-crop policy of the project: (new height, new width, top, left) of scaling the shorter
    side of an h×w image to ``resolution`` and cutting the centre square."""
    scale = resolution / min(h, w)
    nh, nw = max(resolution, round(h * scale)), max(resolution, round(w * scale))
    return nh, nw, (nh - resolution) // 2, (nw - resolution) // 2


def resize_center_crop(im: Image.Image, resolution: int) -> Image.Image:
    """PIL image → ``resolution``² (bicubic; Lanczos when shrinking), by :func:`scaled_crop_box`."""
    w, h = im.size
    nh, nw, top, left = scaled_crop_box(h, w, resolution)
    im = im.resize((nw, nh), Image.LANCZOS if nh < h else Image.BICUBIC)
    return im.crop((left, top, left + resolution, top + resolution))


def resize_center_crop_tensor(x: torch.Tensor, resolution: int, mode: str = "bicubic") -> torch.Tensor:
    """[N,C,H,W] → [N,C,R,R] by :func:`scaled_crop_box` (antialiased when shrinking)."""
    import torch.nn.functional as F

    h, w = x.shape[-2:]
    nh, nw, top, left = scaled_crop_box(h, w, resolution)
    if (nh, nw) != (h, w):
        kw = {"antialias": True} if mode in ("bilinear", "bicubic") and nh < h else {}
        x = F.interpolate(x, size=(nh, nw), mode=mode, **({"align_corners": False} if mode != "area" else {}), **kw)
    return x[..., top:top + resolution, left:left + resolution]


def pil_to_tensor(images: list[Image.Image]) -> torch.Tensor:
    """RGB PIL images (same size) → float tensor [N, 3, H, W] in [-1, 1]."""
    arr = np.stack([np.asarray(im, dtype=np.float32) for im in images]) / 127.5 - 1.0
    return torch.from_numpy(arr).permute(0, 3, 1, 2).contiguous()


def tensor_to_pil(x: torch.Tensor) -> list[Image.Image]:
    """[N, 3, H, W] in [-1, 1] → RGB PIL images."""
    arr = ((x.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(a) for a in arr]


def load_image_folder(folder: str | os.PathLike, resolution: int) -> torch.Tensor:
    """All images of a folder as a training tensor [N, 3, R, R] in [-1, 1]."""
    return pil_to_tensor([resize_center_crop(open_rgb(f), resolution) for f in list_images(folder)])


def mask_for(image: Path) -> Path | None:
    """The mask file of a training photo: ``<stem>_mask.<ext>`` beside it, or ``masks/<stem>.<ext>``."""
    for folder, stem in ((image.parent, image.stem + MASK_SUFFIX), (image.parent / "masks", image.stem)):
        for ext in sorted(IMAGE_EXTENSIONS):
            candidate = folder / (stem + ext)
            if candidate.is_file():
                return candidate
    return None


def read_mask(path: Path, im: Image.Image) -> tuple[Image.Image | None, Path | None]:
    """The mask of the opened photo ``im`` read from ``path``, at the size it is stored: (mask in mode "L", its
    file) from a mask file (:func:`mask_for`, white = subject), else (its alpha channel, None), else (None, None)."""
    m = mask_for(path)
    if m is not None:
        return open_image(m).convert("L"), m
    if im.mode in ("RGBA", "LA") or (im.mode == "P" and "transparency" in im.info):
        return im.convert("RGBA").getchannel("A"), None
    return None, None


def load_masked_folder(folder: str | os.PathLike, resolution: int) -> tuple[torch.Tensor, torch.Tensor | None, list[str]]:
    """A folder of training photos with their masks where present: (pixels [N,3,R,R] in [-1,1], masks [N,1,R,R]
    in [0,1] or None when no photo has one, notes). A mask comes from a mask file (:func:`mask_for`, white =
    subject) or else from the photo's alpha channel; a photo without either gets an all-ones mask when others have
    one. Masks get the same resize and crop as their photo."""
    files = list_images(folder)
    pixels, masks, notes, found = [], [], [], 0
    for f in files:
        im = open_image(f)
        mask, m = read_mask(f, im)
        if m is not None and mask.size != im.size:
            notes.append(f"mask {m.name} is {mask.size[0]}x{mask.size[1]} but {f.name} is {im.size[0]}x{im.size[1]}: "
                         "resized to the photo")
            mask = mask.resize(im.size, Image.BILINEAR)
        found += mask is not None
        pixels.append(resize_center_crop(to_rgb(im), resolution))
        masks.append(resize_center_crop(mask if mask is not None else Image.new("L", im.size, 255), resolution))
    if not found:
        return pil_to_tensor(pixels), None, notes
    if found < len(files):
        notes.append(f"{len(files) - found} of {len(files)} photos have no mask: their whole image counts")
    arr = np.stack([np.asarray(m, dtype=np.float32) / 255.0 for m in masks])
    return pil_to_tensor(pixels), torch.from_numpy(arr)[:, None], notes


def write_pngs(images: dict[str, Image.Image], overwrite: bool = False) -> list[str]:
    """Write each picture to its path as PNG (temporary file + rename); refuses, before writing anything, when a
    path exists and ``overwrite`` is not set."""
    clash = [p for p in images if os.path.exists(p)]
    if clash and not overwrite:
        raise UserInputError(f"{clash[0]} already exists (pass --overwrite to replace it)")
    for p, im in images.items():
        atomic_write(p, lambda tmp, im=im: im.save(tmp, format="PNG"))
    return list(images)
