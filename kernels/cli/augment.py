"""Augmentation on the command line: the flags ``train`` and ``augment`` share, and ``augment``, which writes the
views a training run would see (images, ``NAME_mask.png`` subject masks, ``valid/NAME.png`` valid regions and
``captions.txt``), byte-identical for the same seed."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..augment.settings import PRESETS, AugmentSettings, preset
from ..core.atomic_write import atomic_write_text
from ..core.errors import UserInputError


def _pair(text: str) -> tuple[float, float]:
    try:
        lo, hi = (float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected MIN,MAX (e.g. 0.4,1.3), got {text!r}") from None
    return lo, hi


def add_augment_flags(p: argparse.ArgumentParser) -> None:
    """--augment PRESET and one flag per part (each overrides the preset)."""
    g = p.add_argument_group("augmentation (instance photos only; README: Augmentation)")
    g.add_argument("--augment", choices=list(PRESETS),
                   help="augmentation preset: " + ", ".join(f"{k} ({v.describe()})" for k, v in PRESETS.items())
                        + "; the flags below change single parts")
    g.add_argument("--aug-flip", type=float, metavar="P", help="probability of a mirror image")
    g.add_argument("--aug-rescale", type=float, metavar="P", help="probability of a random rescale")
    g.add_argument("--aug-scale", type=_pair, metavar="MIN,MAX",
                   help="size of the photo in the frame: < 1 shrinks onto a canvas, > 1 enlarges and crops (≤ 2)")
    g.add_argument("--aug-scale-tags", action=argparse.BooleanOptionalAction,
                   help="caption tags of rescaled views (Custom Diffusion: 'far away', 'very small', 'zoomed in', "
                        "'close up'; default on)")
    g.add_argument("--aug-rotate", type=float, metavar="DEG", help="largest rotation in degrees")
    g.add_argument("--aug-brightness", type=float, metavar="X", help="largest relative brightness change")
    g.add_argument("--aug-contrast", type=float, metavar="X", help="largest relative contrast change")
    g.add_argument("--aug-saturation", type=float, metavar="X",
                   help="largest relative saturation change (0 for concepts defined by their colours)")
    g.add_argument("--aug-hue", type=float, metavar="TURNS", help="largest hue turn (0 keeps identity colours)")
    g.add_argument("--aug-background", type=float, metavar="P",
                   help="probability of a new background behind the subject (needs subject masks)")
    g.add_argument("--backgrounds", metavar="DIR", help="background photos for --aug-background (default: generated "
                                                        "textures)")
    g.add_argument("--aug-shuffle-tags", action=argparse.BooleanOptionalAction,
                   help="shuffle comma-separated caption tags after the first --aug-keep-tags")
    g.add_argument("--aug-keep-tags", type=int, metavar="N", help="leading tags never shuffled or dropped (default 1)")
    g.add_argument("--aug-tag-dropout", type=float, metavar="P", help="probability of dropping each other tag")
    g.add_argument("--aug-caption-dropout", type=float, metavar="P",
                   help="probability of an empty caption (an unconditional sample)")
    g.add_argument("--aug-views", type=int, metavar="K",
                   help="0: encode fresh views every step (default); K: a pool of K views per photo encoded once")


FLAG_TO_SETTING = {"aug_flip": "flip", "aug_rescale": "rescale", "aug_scale_tags": "scale_tags",
                   "aug_rotate": "rotate", "aug_brightness": "brightness", "aug_contrast": "contrast",
                   "aug_saturation": "saturation", "aug_hue": "hue", "aug_background": "background",
                   "aug_shuffle_tags": "shuffle_tags", "aug_keep_tags": "keep_tags", "aug_tag_dropout": "tag_dropout",
                   "aug_caption_dropout": "caption_dropout", "aug_views": "views"}


def settings_from_args(a, default: str | None = None) -> AugmentSettings | None:
    """The augmentation the flags ask for; when neither --augment nor any --aug-* flag is given, the ``default``
    preset, or None."""
    overrides = {s: getattr(a, f) for f, s in FLAG_TO_SETTING.items() if getattr(a, f, None) is not None}
    if getattr(a, "aug_scale", None) is not None:
        overrides.update(scale_min=a.aug_scale[0], scale_max=a.aug_scale[1])
    if a.augment is None and not overrides:
        if default:
            return preset(default)
        if getattr(a, "backgrounds", None):
            raise UserInputError("--backgrounds is for augmentation: add --augment standard (or --aug-background P)")
        return None
    return preset(a.augment or "none", **overrides)


def load_backgrounds(a, resolution: int):
    """--backgrounds as a tensor [K,3,R,R], or None."""
    if not getattr(a, "backgrounds", None):
        return None
    from ..core.images import load_image_folder

    return load_image_folder(a.backgrounds, resolution)


def augmentation_notes(settings: AugmentSettings, masks, backgrounds) -> list[str]:
    """What the user should know about how the settings meet the data."""
    notes = [f"augmentation: {settings.describe()}"]
    if settings.background and masks is None:
        notes.append("no subject masks (NAME_mask.png, masks/NAME.png or transparency): backgrounds are not replaced")
    if backgrounds is not None and not settings.background:
        notes.append("--backgrounds given but the background probability is 0: they are not used")
    return notes


def add_command(sub) -> None:
    p = sub.add_parser("augment", help="write the augmented views a training run would see (images, masks, captions)")
    p.add_argument("--images", required=True, help="folder of training photos (masks: NAME_mask.png, masks/NAME.png "
                                                   "or transparency)")
    p.add_argument("--out", required=True, help="folder for the views (created if missing)")
    p.add_argument("--n", type=int, default=16, help="number of views (default 16)")
    p.add_argument("--seed", type=int, default=0, help="the training seed: the same views as train --seed S")
    p.add_argument("--prompt", default="a photo of sks toy", help="the instance prompt the captions start from")
    p.add_argument("--resolution", type=int, default=512, help="training resolution (default 512)")
    p.add_argument("--batch-size", type=int, default=1, help="as train's (the order of views depends on it)")
    p.add_argument("--grad-accum", type=int, default=1, help="as train's")
    p.add_argument("--background-weight", type=float, default=0.0, help="as train's")
    p.add_argument("--overwrite", action="store_true", help="replace views already in --out")
    add_augment_flags(p)


def cmd_augment(a) -> int:
    import numpy as np
    from PIL import Image

    from ..core.images import load_masked_folder, tensor_to_pil, write_pngs
    from ..engine.augmented import training_views
    from ..engine.config import TrainConfig
    from ..engine.data import TrainData

    if a.n < 1:
        raise UserInputError(f"--n must be at least 1, got {a.n}")
    settings = settings_from_args(a, default="standard")
    cfg = TrainConfig(instance_prompts=a.prompt, resolution=a.resolution, seed=a.seed, batch_size=a.batch_size,
                      grad_accum=a.grad_accum, background_loss_weight=a.background_weight, augment=settings)
    out = Path(a.out)
    if out.exists() and not out.is_dir():
        raise UserInputError(f"--out {out} is a file, not a folder")
    pixels, masks, notes = load_masked_folder(a.images, cfg.resolution)
    backgrounds = load_backgrounds(a, cfg.resolution)
    for note in notes + augmentation_notes(settings, masks, backgrounds):
        print(f"note: {note}")
    views = training_views(TrainData(pixels, None, masks, backgrounds), cfg, a.n)
    to_l = lambda m: Image.fromarray((m[0].clamp(0, 1).numpy() * 255).round().astype(np.uint8), "L")  # noqa: E731
    files: dict[str, Image.Image] = {}
    lines = []
    for i, (px, mask, valid, caption) in enumerate(views):
        name = f"view_{i:04d}"
        files[str(out / f"{name}.png")] = tensor_to_pil(px[None])[0]
        if mask is not None:
            files[str(out / f"{name}_mask.png")] = to_l(mask)
        files[str(out / "valid" / f"{name}.png")] = to_l(valid)
        lines.append(f"{name}.png\t{caption}")
    captions = out / "captions.txt"
    if captions.exists() and not a.overwrite:
        raise UserInputError(f"{captions} already exists (pass --overwrite to replace it)")
    (out / "valid").mkdir(parents=True, exist_ok=True)
    write_pngs(files, overwrite=a.overwrite)
    atomic_write_text(captions, "\n".join(lines) + "\n")
    print(f"wrote {len(views)} views of {pixels.shape[0]} photos (seed {a.seed}) → {out}")
    return 0
