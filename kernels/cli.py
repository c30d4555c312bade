"""Command line: ``python -m fewshot_personalize {train,generate,…}``.

Bad input ends with one line ``error: …`` on stderr and exit code 2, never a traceback or a half-written file.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
import time

from .errors import TrainingDiverged, TrainingInterrupted, UserInputError

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

    t = sub.add_parser("train", help="train a DreamBooth-LoRA concept adapter from a few images")
    t.add_argument("--base", required=True, help="diffusers model folder, a .safetensors checkpoint, or 'demo'")
    t.add_argument("--images", required=True, help="folder with the 3–10 instance images")
    t.add_argument("--prompt", required=True, help='instance prompt with a rare identifier, e.g. "a sks toy"')
    t.add_argument("--class-prompt", help='class prompt for prior preservation, e.g. "a toy"')
    t.add_argument("--class-images", help="folder of class images (also the cache when --num-class-images is given)")
    t.add_argument("--num-class-images", type=int, help="generate class images with the base model until there are N (default 100 with --class-prompt and no folder)")
    t.add_argument("--prior-weight", type=float, default=1.0, help="λ of the prior-preservation loss (default 1)")
    t.add_argument("--steps", type=int, default=400)
    t.add_argument("--resolution", type=int, help="training resolution (default: the model's native size)")
    t.add_argument("--rank", type=int, default=4)
    t.add_argument("--alpha", type=float, help="LoRA alpha (default: = rank, i.e. scale 1)")
    t.add_argument("--lr", type=float, default=1e-4)
    t.add_argument("--train-text-encoder", action="store_true", help="also put LoRA on the text encoder(s)")
    t.add_argument("--text-lr", type=float, help="learning rate of the text-encoder LoRA (default: --lr)")
    t.add_argument("--batch-size", type=int, default=1)
    t.add_argument("--grad-accum", type=int, default=1)
    t.add_argument("--lr-schedule", default="constant", choices=["constant", "linear", "cosine"])
    t.add_argument("--warmup-steps", type=int, default=0)
    t.add_argument("--snr-gamma", type=float, help="min-SNR-γ loss weighting (e.g. 5)")
    t.add_argument("--noise-offset", type=float, default=0.0)
    t.add_argument("--flip", type=float, default=0.0, help="probability of a horizontal flip per sample")
    t.add_argument("--gradient-checkpointing", action="store_true")
    t.add_argument("--unet-targets", default="to_q,to_k,to_v,to_out.0", help="comma-separated UNet layer names")
    t.add_argument("--checkpoint-every", type=int, default=0, help="save a resumable checkpoint every N steps")
    t.add_argument("--resume", action="store_true", help="continue from OUT's checkpoint (OUT.checkpoint.safetensors)")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--device", help="cpu, cuda, mps (default: best available)")
    t.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16", "fp16"])
    t.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    t.add_argument("--out", required=True, help="where the LoRA goes (.safetensors)")

    g = sub.add_parser("generate", help="sample images, optionally with LoRA files")
    g.add_argument("--base", required=True)
    g.add_argument("--lora", action="append", default=[], metavar="FILE[:STRENGTH]", help="LoRA file, repeatable")
    g.add_argument("--prompt", required=True)
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

    try:
        from .demo import cli as demo_cli
    except ImportError:
        demo_cli = None
    if demo_cli is not None:
        demo_cli.add_commands(sub)
    return p


def cmd_train(a) -> int:
    from tqdm import tqdm

    from .class_images import default_cache_dir, ensure_class_images
    from .diffusers_backend import (DiffusersDenoiser, DiffusersTextEncoder, base_name, default_device,
                                    load_pipeline)
    from .generate import use_sampler
    from .images import load_image_folder, list_images
    from .lora_format import lora_metadata, save_lora_file
    from .safetensors_io import check_output_path
    from .train_config import TrainConfig
    from .trainer import DreamBoothLoraTrainer, TrainData

    # validated before the model loads; resolution 8 stands in for the model's native size until then
    cfg = TrainConfig(instance_prompt=a.prompt, class_prompt=a.class_prompt, prior_weight=a.prior_weight,
                      steps=a.steps, batch_size=a.batch_size, grad_accum=a.grad_accum, lr=a.lr, text_lr=a.text_lr,
                      rank=a.rank, alpha=a.alpha, train_text_encoder=a.train_text_encoder,
                      unet_targets=tuple(s.strip() for s in a.unet_targets.split(",") if s.strip()),
                      lr_schedule=a.lr_schedule, warmup_steps=a.warmup_steps, snr_gamma=a.snr_gamma,
                      noise_offset=a.noise_offset, random_flip=a.flip, gradient_checkpointing=a.gradient_checkpointing,
                      resolution=a.resolution or 8, seed=a.seed, checkpoint_every=a.checkpoint_every, dtype=a.dtype)
    out = check_output_path(a.out, overwrite=a.overwrite or a.resume)
    if a.num_class_images is not None and a.num_class_images < 1:
        raise UserInputError(f"--num-class-images must be at least 1, got {a.num_class_images}")
    if (a.class_images or a.num_class_images) and not a.class_prompt:
        raise UserInputError("class images need a class prompt (--class-prompt \"a toy\")")
    list_images(a.images)  # fail fast on a missing/empty folder, before loading the model
    device = a.device or default_device()
    pipe = load_pipeline(a.base, device)
    vae_scale = 2 ** (len(pipe.vae.config.block_out_channels) - 1)
    cfg = dataclasses.replace(cfg, resolution=a.resolution or pipe.unet.config.sample_size * vae_scale)
    denoiser, text = DiffusersDenoiser(pipe), DiffusersTextEncoder(pipe)
    _check_rank(denoiser, text, cfg)
    instance = load_image_folder(a.images, cfg.resolution)

    class_pixels = None
    if a.class_prompt:
        folder = a.class_images
        if a.num_class_images or not folder:
            num = a.num_class_images or 100
            folder = folder or str(default_cache_dir(a.base, a.class_prompt, cfg.resolution))
            use_sampler(pipe, "dpm")
            with tqdm(total=num, desc="class images", unit="img", leave=False) as bar:
                ensure_class_images(pipe, a.class_prompt, folder, num, seed=a.seed, resolution=cfg.resolution,
                                    on_image=lambda i, n: bar.update(1))
        class_pixels = load_image_folder(folder, cfg.resolution)
        if a.num_class_images:
            class_pixels = class_pixels[: a.num_class_images]

    trainer = DreamBoothLoraTrainer(denoiser, text, TrainData(instance, class_pixels), cfg, device=device)
    ckpt = str(out.with_suffix("")) + ".checkpoint.safetensors"
    bar = tqdm(total=cfg.steps, desc="train", unit="step")
    if a.resume and os.path.exists(ckpt):
        bar.set_description("train (resumed)")

    def on_step(step: int, total: int, loss: float) -> None:
        bar.n = step
        bar.set_postfix(loss=f"{loss:.4f}")
        bar.refresh()

    try:
        result = trainer.train(on_step=on_step, checkpoint_path=ckpt, resume=a.resume)
    finally:
        bar.close()
    meta = lora_metadata(family=denoiser.family, method="dreambooth-lora", rank=cfg.rank, alpha=cfg.lora_alpha,
                         steps=result.steps, base_model=base_name(a.base), instance_prompt=cfg.instance_prompt,
                         class_prompt=cfg.class_prompt, prior_weight=cfg.prior_weight if class_pixels is not None else None,
                         resolution=cfg.resolution, seed=cfg.seed, train_text_encoder=str(cfg.train_text_encoder).lower(),
                         unet_targets=",".join(cfg.unet_targets), lr=cfg.lr, final_loss=f"{result.losses[-1]:.6f}")
    save_lora_file(out, result.adapter, meta, overwrite=a.overwrite or a.resume)
    if os.path.exists(ckpt):
        os.unlink(ckpt)
    print(f"trained {result.steps} steps in {result.seconds:.1f} s ({result.seconds / max(1, result.steps):.3f} s/step), "
          f"final loss {result.final_loss()} → {out}")
    return 0


def _check_rank(denoiser, text, cfg) -> None:
    """Refuse a rank larger than the smallest adapted layer allows, before any slow work."""
    roots = denoiser.adapter_roots(cfg.unet_targets) + (text.adapter_roots(cfg.text_targets) if cfg.train_text_encoder else [])
    for r in roots:
        if not r.paths:
            raise UserInputError(f"the model has no layers named {','.join(cfg.unet_targets)}")
        mods = dict(r.module.named_modules())
        smallest = min(min(mods[p].in_features, mods[p].out_features) for p in r.paths)
        if cfg.rank > smallest:
            raise UserInputError(f"rank {cfg.rank} is larger than the smallest adapted layer allows ({smallest})")


def cmd_generate(a) -> int:
    from .diffusers_backend import default_device, load_pipeline
    from .generate import apply_lora_file, generate_images, save_images, use_sampler

    if not a.prompt.strip():
        raise UserInputError("the prompt is empty")
    if os.path.exists(a.out) and not os.path.isdir(a.out):
        raise UserInputError(f"--out {a.out} is a file, not a folder")
    start = time.perf_counter()
    pipe = load_pipeline(a.base, a.device or default_device())
    for spec in a.lora:
        path, strength = spec, 1.0
        if ":" in spec and not os.path.exists(spec):
            path, _, s = spec.rpartition(":")
            try:
                strength = float(s)
            except ValueError:
                raise UserInputError(f"--lora {spec}: strength {s!r} is not a number") from None
        apply_lora_file(pipe, path, strength)
    use_sampler(pipe, a.sampler)
    from tqdm import tqdm

    images = []
    for i in tqdm(range(a.n), desc="generate", unit="img"):
        images += generate_images(pipe, a.prompt, negative=a.negative, n=1, steps=a.steps, seed=a.seed + i,
                                  guidance=a.guidance, resolution=a.resolution)
    paths = save_images(images, a.out, overwrite=a.overwrite)
    print(f"wrote {len(paths)} images in {time.perf_counter() - start:.1f} s → {a.out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    _quiet_libraries()
    parser = build_parser()
    a = parser.parse_args(argv)
    commands = {"train": cmd_train, "generate": cmd_generate}
    try:
        from .demo import cli as demo_cli

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
