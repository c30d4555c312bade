"""Loading diffusers pipelines (local folders and single-file safetensors only) and telling their family."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

from ...core.errors import UserInputError

log = logging.getLogger(__name__)


def load_pipeline(base: str, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
    """Load a diffusers pipeline from a local folder (``model_index.json``) or a single ``.safetensors``
    checkpoint (offline only). Never downloads, never unpickles."""
    from diffusers import DiffusionPipeline

    path = Path(base)
    kwargs = dict(torch_dtype=dtype, local_files_only=True)
    if path.is_dir():
        if not (path / "model_index.json").is_file():
            raise UserInputError(f"--base {path}: not a diffusers model folder (no model_index.json)")
        pickled = sorted(str(f.relative_to(path)) for f in path.glob("*/*") if f.suffix in (".bin", ".ckpt", ".pt", ".pth")
                         and not any(f.parent.glob("*.safetensors")))
        if pickled:
            raise UserInputError(f"--base {path}: {', '.join(pickled)} hold pickled weights, which are never loaded "
                                 "(they can run code); save the model with safetensors (save_pretrained's default)")
        folder_kwargs = dict(kwargs, use_safetensors=True)  # never the pickled .bin weights
        try:
            pipe = DiffusionPipeline.from_pretrained(str(path), safety_checker=None, requires_safety_checker=False,
                                                     **folder_kwargs) \
                if _has_safety_checker(path) else DiffusionPipeline.from_pretrained(str(path), **folder_kwargs)
        except Exception as e:
            raise UserInputError(f"--base {path}: cannot load the diffusers model ({type(e).__name__}: {e})") from None
    elif path.is_file():
        if path.suffix != ".safetensors":
            raise UserInputError(f"--base {path}: only diffusers folders and .safetensors checkpoints are read (no pickled .ckpt)")
        pipe = _load_single_file(path, kwargs)
    else:
        raise UserInputError(f"--base {path}: no such model folder or file")
    if not hasattr(pipe, "unet") or not hasattr(pipe, "vae") or not hasattr(pipe, "text_encoder"):
        raise UserInputError(f"--base {path}: {type(pipe).__name__} is not a Stable Diffusion (UNet) pipeline")
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def _has_safety_checker(path: Path) -> bool:
    import json

    return "safety_checker" in json.loads((path / "model_index.json").read_text())


def _load_single_file(path: Path, kwargs):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        keys = set(f.keys())
    is_xl = any(k.startswith("conditioner.embedders.1") for k in keys)
    cls = StableDiffusionXLPipeline if is_xl else StableDiffusionPipeline
    try:
        return cls.from_single_file(str(path), **kwargs)
    except Exception as e:
        raise UserInputError(f"--base {path}: diffusers could not read this single-file checkpoint offline "
                             f"({type(e).__name__}: {e}); convert it to a diffusers folder first") from None


def detect_family(pipe) -> str:
    """``sdxl`` (two text encoders, text_time conditioning), ``sd2`` (OpenCLIP-H text encoder: 1024-wide context,
    GELU activation) or ``sd1`` (CLIP-L: quick-GELU). The family is the architecture, not the noise schedule:
    SD2-base predicts ε, and SD1 models fine-tuned for v-prediction (the demo model among them) stay SD1."""
    if getattr(pipe, "text_encoder_2", None) is not None:
        return "sdxl"
    act = getattr(getattr(pipe.text_encoder, "config", None), "hidden_act", None)
    if pipe.unet.config.cross_attention_dim == 1024 or act == "gelu":
        return "sd2"
    return "sd1"


def vae_scale(pipe) -> int:
    """Pixels per latent pixel of the pipeline's VAE (8 for Stable Diffusion)."""
    return 2 ** (len(pipe.vae.config.block_out_channels) - 1)


def native_resolution(pipe) -> int:
    """The image size the UNet was made for (sample size × VAE scale)."""
    return pipe.unet.config.sample_size * vae_scale(pipe)


def text_transformer(model: nn.Module) -> nn.Module:
    """The CLIP transformer body (embeddings + encoder) whose layers kohya names ``text_model_encoder_…``.

    transformers < 5 nests it as ``CLIPTextModel.text_model``; transformers 5 puts it at the top level.
    """
    return getattr(model, "text_model", model)
