"""``evaluate``: DreamBooth's metrics of generated images against reference photos on your own local CLIP and DINO
models (``--clip``, ``--dino``; see kernels/evaluation), or without ``--clip`` the demo world's evaluator."""

from __future__ import annotations

import json
from pathlib import Path

from ..core.errors import UserInputError


def add_command(sub) -> None:
    e = sub.add_parser("evaluate", help="score generated images against references: CLIP-I, CLIP-T, DINO, PRES, DIV "
                                        "on local models (--clip), else with the demo world's evaluator")
    e.add_argument("--images", required=True, help="folder of generated images (masks as for train: NAME_mask.png, "
                                                   "masks/NAME.png or transparency)")
    e.add_argument("--prompt", help="the prompt the images were generated from (CLIP-T; the demo evaluator needs it)")
    e.add_argument("--references", required=True, help="folder of the subject's reference photos (masks as above)")
    e.add_argument("--clip", help="local transformers CLIP folder: CLIPModel, or CLIPVisionModelWithProjection "
                                  "(CLIP-I only)")
    e.add_argument("--dino", help="local DINO folder: ViTModel (DINO v1) or Dinov2Model")
    e.add_argument("--class-images", help="folder of images the personalised model drew from the bare class prompt "
                                          "(PRES)")
    e.add_argument("--device", help="cpu, cuda, mps (default: best available)")
    e.add_argument("--out", help="write the metrics JSON here (default: print it)")
    e.add_argument("--overwrite", action="store_true", help="replace an existing --out file")


def _with_models(a) -> dict:
    from ..core.devices import default_device
    from ..evaluation import ImageSet, load_clip, load_dino, score

    images, notes = ImageSet.from_folder("images", a.images)
    references, more = ImageSet.from_folder("references", a.references)
    notes += more
    class_images = None
    if a.class_images:
        class_images, more = ImageSet.from_folder("class images", a.class_images)
        notes += more
    device = a.device or default_device()
    clip = load_clip(a.clip, device, "--clip")
    dino = load_dino(a.dino, device, "--dino") if a.dino else None
    metrics = score(images, references, clip, dino, a.prompt, class_images)
    metrics["notes"] += notes
    return metrics


def cmd_evaluate(a) -> int:
    if a.out:
        from ..formats.safetensors_io import check_output_path

        check_output_path(a.out, overwrite=a.overwrite, suffix=None)
    if a.clip:
        metrics = _with_models(a)
    else:
        if a.dino or a.class_images:
            raise UserInputError("--dino and --class-images need --clip (without --clip, evaluate scores with the demo "
                                 "world's evaluator)")
        if not a.prompt:
            raise UserInputError("--prompt is needed by the demo world's evaluator (used when --clip is not given)")
        try:
            from ..demo.cli import evaluate_folders
        except ImportError:
            raise UserInputError("--clip is needed: the demo world is not installed") from None
        metrics = evaluate_folders(a.images, a.prompt, a.references)
    text = json.dumps(metrics, indent=1)
    if a.out:
        Path(a.out).write_text(text)
        print(f"wrote {a.out}")
    else:
        print(text)
    return 0
