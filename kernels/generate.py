"""Sampling with a diffusers pipeline, with LoRA files merged into the weights (ΔW = s·α/r·up@down)."""

from __future__ import annotations

import logging
import os

import torch
from PIL import Image

from .diffusers_backend import detect_family, text_transformer
from .errors import UserInputError
from .lora import merge_lora
from .lora_format import check_family, from_kohya, load_lora_file

log = logging.getLogger(__name__)

SAMPLERS = ("dpm", "ddim", "euler", "model")


def use_sampler(pipe, name: str = "dpm") -> None:
    """Swap the pipeline's scheduler for sampling (the training schedule stays in its config)."""
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler

    classes = {"dpm": DPMSolverMultistepScheduler, "ddim": DDIMScheduler, "euler": EulerDiscreteScheduler}
    if name == "model":
        return
    if name not in classes:
        raise UserInputError(f"sampler must be one of {SAMPLERS}, got {name!r}")
    pipe.scheduler = classes[name].from_config(pipe.scheduler.config)


def adapter_modules(pipe) -> dict[str, torch.nn.Module]:
    """Kohya prefix → module tree, for this pipeline's family."""
    family = detect_family(pipe)
    out = {"lora_unet_": pipe.unet}
    if family == "sdxl":
        out.update({"lora_te1_text_model_": text_transformer(pipe.text_encoder),
                    "lora_te2_text_model_": text_transformer(pipe.text_encoder_2)})
    else:
        out["lora_te_text_model_"] = text_transformer(pipe.text_encoder)
    return out


def apply_lora_file(pipe, path: str | os.PathLike, strength: float = 1.0,
                    text_strength: float | None = None) -> int:
    """Merge a kohya LoRA file into the pipeline's UNet and text encoder(s); returns the number of layers.

    Refuses a file made for another model family or with layers this model does not have.
    """
    weights, meta = load_lora_file(path)
    check_family(meta, detect_family(pipe), str(path))
    count = 0
    for prefix, module in adapter_modules(pipe).items():
        paths = [n for n, m in module.named_modules() if isinstance(m, torch.nn.Linear)]
        mapped = from_kohya(weights, prefix, paths)
        s = strength if prefix == "lora_unet_" or text_strength is None else text_strength
        try:
            merge_lora(module, mapped, s)
        except RuntimeError as e:
            raise UserInputError(f"{path}: layer shapes do not fit this model ({e})") from None
        count += len(mapped)
    known = sum(1 for k in weights if k.startswith(("lora_unet_", "lora_te")))
    if known != len(weights) or count == 0:
        raise UserInputError(f"{path}: {len(weights) - count} of {len(weights)} layers were not recognised")
    return count


@torch.no_grad()
def generate_images(pipe, prompt: str, *, negative: str | None = None, n: int = 1, steps: int = 25,
                    seed: int = 0, guidance: float = 7.5, resolution: int | None = None,
                    batch: int = 4) -> list[Image.Image]:
    """``n`` images of ``prompt``; image i uses seed ``seed + i`` (so any one image can be reproduced)."""
    if not prompt or not prompt.strip():
        raise UserInputError("the prompt is empty")
    if n < 1 or steps < 1:
        raise UserInputError(f"--n and --steps must be at least 1 (got {n}, {steps})")
    vae_scale = 2 ** (len(pipe.vae.config.block_out_channels) - 1)
    res = resolution or pipe.unet.config.sample_size * vae_scale
    images: list[Image.Image] = []
    for start in range(0, n, batch):
        k = min(batch, n - start)
        gens = [torch.Generator().manual_seed(seed + start + i) for i in range(k)]
        out = pipe(prompt=[prompt] * k, negative_prompt=None if negative is None else [negative] * k,
                   num_inference_steps=steps, guidance_scale=guidance, height=res, width=res, generator=gens)
        images.extend(out.images)
    return images


def save_images(images: list[Image.Image], out_dir: str | os.PathLike, prefix: str = "", overwrite: bool = False) -> list[str]:
    """Write PNGs ``<prefix>000.png`` … into ``out_dir`` (created if missing); never overwrites unless asked."""
    os.makedirs(out_dir, exist_ok=True)
    paths = [os.path.join(out_dir, f"{prefix}{i:03d}.png") for i in range(len(images))]
    clash = [p for p in paths if os.path.exists(p)]
    if clash and not overwrite:
        raise UserInputError(f"{clash[0]} already exists (pass --overwrite to replace it)")
    for im, p in zip(images, paths):
        tmp = p + ".tmp"
        im.save(tmp, format="PNG")
        os.replace(tmp, p)
    return paths
