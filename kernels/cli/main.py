"""Command line: ``python -m fewshot_personalize {train,generate,evaluate,…}``: the parser and the error policy.

Bad input ends with one line ``error: …`` on stderr and exit code 2, never a traceback or a half-written file.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from ..core.errors import TrainingDiverged, TrainingInterrupted, UserInputError
from ..methods import METHODS
from .augment import add_augment_flags
from .augment import add_command as add_augment
from .evaluate import add_command as add_evaluate
from .fuse import add_command as add_fuse

log = logging.getLogger("fewshot_personalize")


def _quiet_libraries() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    import warnings

    warnings.filterwarnings("ignore")
    try:
        import diffusers
        import transformers

        diffusers.utils.logging.set_verbosity_error()
        diffusers.utils.logging.disable_progress_bar()
        transformers.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
    except Exception:  # pragma: no cover - older versions lack some of these
        pass


def _positive_int(s: str) -> int:
    v = int(s)
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {v}")
    return v


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m fewshot_personalize",
                                description="Few-shot personalization of text-to-image diffusion models.")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train a concept (DreamBooth-LoRA, Textual Inversion, CatVersion, pivotal, "
                                     "ED-LoRA)")
    t.add_argument("--method", default="dreambooth-lora", choices=list(METHODS),
                   help="dreambooth-lora (default), textual-inversion, catversion, pivotal (TI + DreamBooth-LoRA), or "
                        "ed-lora (Mix-of-Show: layer-wise tokens + LoRA on UNet and text encoder)")
    t.add_argument("--base", required=True, help="diffusers model folder, a .safetensors checkpoint, or 'demo' "
                                                 "(which also takes the benchmark's recipe for every flag left out)")
    t.add_argument("--images", required=True, help="folder with the 3–10 instance images")
    t.add_argument("--prompt", help='instance prompt: DreamBooth "a sks toy" (required); textual-inversion / pivotal / '
                                    'ed-lora must contain --token; default for those and catversion: --templates')
    t.add_argument("--templates", default="object", choices=["object", "style"],
                   help="caption templates when --prompt is not given ({} = the token, or for catversion --init-word)")
    t.add_argument("--token", default="<sks>", help="placeholder token of textual-inversion / pivotal / ed-lora "
                                                    "(default <sks>)")
    t.add_argument("--init-word", default="toy",
                   help="the word the concept starts from: the token's initial embedding; catversion's class word; "
                        "ed-lora's second word (the class word)")
    t.add_argument("--num-vectors", type=int, default=1, help="vectors per placeholder token (textual inversion)")
    t.add_argument("--catversion-layers", help="CLIP layers for K/V tokens, e.g. 9,10,11 or -3,-2,-1, or per encoder "
                                               "clip_l:9,10,11;clip_g:-4,-3,-2 (default: the last 3 that feed the "
                                               "conditioning)")
    t.add_argument("--catversion-tokens", type=int, default=1, help="learned K/V tokens per layer (default 1)")
    t.add_argument("--class-prompt", help='class prompt for prior preservation, e.g. "a toy"')
    t.add_argument("--class-images", help="folder of class images (also the cache when --num-class-images is given)")
    t.add_argument("--num-class-images", type=int, help="generate class images with the base model until there are N (default 100 with --class-prompt and no folder)")
    t.add_argument("--prior-weight", type=float, default=1.0, help="λ of the prior-preservation loss (default 1)")
    t.add_argument("--steps", type=int, help="training steps (default 400)")
    t.add_argument("--resolution", type=int, help="training resolution (default: the model's native size)")
    t.add_argument("--rank", type=int, help="LoRA rank (default 4)")
    t.add_argument("--alpha", type=float, help="LoRA alpha (default: = rank, i.e. scale 1)")
    t.add_argument("--lr", type=float, help="learning rate (default: 1e-4 LoRA and ed-lora's UNet LoRA, "
                                             "5e-3 textual inversion, 1e-2 catversion)")
    t.add_argument("--embedding-lr", type=float, help="pivotal, ed-lora: learning rate of the token embeddings "
                                                       "(default 5e-3 pivotal, 1e-3 ed-lora)")
    t.add_argument("--train-text-encoder", action=argparse.BooleanOptionalAction,
                   help="also put LoRA on the text encoder(s) (default: no; with --base demo the benchmark recipe)")
    t.add_argument("--text-lr", type=float, help="learning rate of the text-encoder LoRA (default: --lr; "
                                                  "ed-lora 1e-5)")
    t.add_argument("--batch-size", type=int, help="images per step (default 1)")
    t.add_argument("--grad-accum", type=int, default=1)
    t.add_argument("--lr-schedule", default="constant", choices=["constant", "linear", "cosine"])
    t.add_argument("--warmup-steps", type=int, default=0)
    t.add_argument("--snr-gamma", type=float, help="min-SNR-γ loss weighting (e.g. 5)")
    t.add_argument("--noise-offset", type=float, default=0.0)
    t.add_argument("--flip", type=float, default=0.0, help="probability of a horizontal flip per sample (with "
                                                            "--augment: of class images; instances use --aug-flip)")
    t.add_argument("--background-weight", type=float, default=0.0,
                   help="loss weight outside the subject when --images has masks (NAME_mask.png, masks/NAME.png or "
                        "transparency; default 0: subject only)")
    t.add_argument("--gradient-checkpointing", action="store_true")
    t.add_argument("--unet-targets", help="comma-separated UNet layer names (default: the attention projections "
                        "to_q,to_k,to_v,to_out.0; with --base demo the benchmark recipe's 'all'), or 'all' for every "
                        "linear layer and convolution (kohya's LoCon; what ComfyUI's TrainLoraNode adapts)")
    t.add_argument("--checkpoint-every", type=int, default=0, help="save a resumable checkpoint every N steps")
    t.add_argument("--resume", action="store_true", help="continue from OUT's checkpoint (OUT.checkpoint.safetensors)")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--device", help="cpu, cuda, mps (default: best available)")
    t.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16", "fp16"])
    t.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    t.add_argument("--out", required=True, help="the adapter file (.safetensors); pivotal also writes "
                                                "OUT-lora.safetensors and OUT-embedding.safetensors")
    add_augment_flags(t)

    g = sub.add_parser("generate", help="sample images, optionally with adapter files")
    g.add_argument("--base", required=True, help="diffusers model folder, a .safetensors checkpoint, or 'demo'")
    g.add_argument("--adapter", action="append", default=[], metavar="FILE[:STRENGTH]",
                   help="adapter file of any kind (LoRA, textual inversion, catversion, pivotal), repeatable")
    g.add_argument("--lora", action="append", default=[], metavar="FILE[:STRENGTH]", help="same as --adapter")
    g.add_argument("--prompt", required=True)
    g.add_argument("--region", action="append", default=[], metavar="X0,Y0,X1,Y1:PROMPT",
                   help="bind PROMPT to a pixel box of the image (x1, y1 exclusive; Mix-of-Show regional "
                        "sampling), repeatable; --prompt stays the prompt outside the boxes")
    g.add_argument("--region-layout", type=float, metavar="SHARE",
                   help="for this share of the schedule (from the noisiest step; e.g. 0.4) denoise each region's "
                        "crop of the latent with its own prompt, so that each region draws its own object (area "
                        "composition; off by default)")
    g.add_argument("--region-attention", default="on", choices=["on", "off"],
                   help="Mix-of-Show's region-aware cross-attention in every step (default on); off needs "
                        "--region-layout")
    g.add_argument("--negative")
    g.add_argument("--n", type=_positive_int, default=4)
    g.add_argument("--steps", type=_positive_int, default=25)
    g.add_argument("--guidance", type=float, default=7.5)
    g.add_argument("--resolution", type=int)
    g.add_argument("--sampler", default="dpm", choices=["dpm", "ddim", "euler", "model"])
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--device")
    g.add_argument("--overwrite", action="store_true")
    g.add_argument("--out", required=True, help="folder for the PNGs (created if missing)")

    add_evaluate(sub)
    add_augment(sub)
    add_fuse(sub)
    try:
        from ..demo import cli as demo_cli
    except ImportError:
        demo_cli = None
    if demo_cli is not None:
        demo_cli.add_commands(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    _quiet_libraries()
    parser = build_parser()
    a = parser.parse_args(argv)
    from .augment import cmd_augment
    from .evaluate import cmd_evaluate
    from .fuse import cmd_fuse
    from .generate import cmd_generate
    from .train import cmd_train

    commands = {"train": cmd_train, "generate": cmd_generate, "evaluate": cmd_evaluate, "augment": cmd_augment,
                "fuse": cmd_fuse}
    try:
        from ..demo import cli as demo_cli

        commands.update(demo_cli.COMMANDS)
    except ImportError:
        pass
    try:
        return commands[a.command](a)
    except UserInputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except TrainingDiverged as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except TrainingInterrupted as e:
        print(f"interrupted: {e}", file=sys.stderr)
        return 130
