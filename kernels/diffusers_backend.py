"""The diffusers back end: Denoiser and TextEncoder over a diffusers pipeline (SD1.x, SD2.x, SDXL).

Text encoding reproduces the pipelines' own ``encode_prompt`` (SD1/SD2: last hidden state; SDXL: the
penultimate hidden states of both encoders concatenated, pooled output of the second), so what is trained
is what the pipeline later samples with.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
from torch import nn

from .errors import UserInputError
from .noise_schedule import NoiseSchedule
from .seams import AdapterRoot, Conditioning

log = logging.getLogger(__name__)

UNET_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
TEXT_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")


def resolve_base(base: str) -> str:
    """``demo`` → the shipped demo model folder; otherwise the path as given."""
    if base == "demo":
        from .demo.model import demo_model_path

        return str(demo_model_path())
    return base


def load_pipeline(base: str, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
    """Load a diffusers pipeline from a local folder (``model_index.json``) or a single ``.safetensors``
    checkpoint (offline only). Never downloads, never unpickles."""
    from diffusers import DiffusionPipeline

    path = Path(resolve_base(base))
    kwargs = dict(torch_dtype=dtype, local_files_only=True)
    if path.is_dir():
        if not (path / "model_index.json").is_file():
            raise UserInputError(f"--base {path}: not a diffusers model folder (no model_index.json)")
        try:
            pipe = DiffusionPipeline.from_pretrained(str(path), safety_checker=None, requires_safety_checker=False, **kwargs) \
                if _has_safety_checker(path) else DiffusionPipeline.from_pretrained(str(path), **kwargs)
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
    """``sdxl`` (two text encoders, text_time conditioning), ``sd2`` (1024-wide context or v-prediction), or ``sd1``."""
    if getattr(pipe, "text_encoder_2", None) is not None:
        return "sdxl"
    if pipe.unet.config.cross_attention_dim == 1024 or pipe.scheduler.config.get("prediction_type") == "v_prediction":
        return "sd2"
    return "sd1"


def linear_paths(root: nn.Module, targets: tuple[str, ...], within: str = "") -> list[str]:
    """Paths of ``nn.Linear`` modules whose name ends with one of ``targets`` (and contains ``within``)."""
    return [n for n, m in root.named_modules()
            if isinstance(m, nn.Linear) and within in n and any(n == t or n.endswith("." + t) for t in targets)]


class DiffusersDenoiser:
    """UNet2DConditionModel + the pipeline's noise schedule + AutoencoderKL."""

    def __init__(self, pipe, family: str | None = None):
        self.unet, self.vae = pipe.unet, pipe.vae
        self.family = family or detect_family(pipe)
        sched = pipe.scheduler
        self.schedule = NoiseSchedule(sched.alphas_cumprod, sched.config.get("prediction_type", "epsilon"))
        self.scaling_factor = float(self.vae.config.scaling_factor)
        self.shift_factor = float(getattr(self.vae.config, "shift_factor", None) or 0.0)
        self.vae_scale = 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def device(self) -> torch.device:
        return self.unet.device

    def add_noise(self, x0, noise, t):
        return self.schedule.add_noise(x0, noise, t)

    def target(self, x0, noise, t):
        return self.schedule.target(x0, noise, t)

    @torch.no_grad()
    def encode_images(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        dist = self.vae.encode(pixels.to(self.vae.device, self.vae.dtype)).latent_dist
        mean = (dist.mean - self.shift_factor) * self.scaling_factor
        return mean.float(), (dist.std * self.scaling_factor).float()

    def predict(self, x_t: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        added = None
        if self.family == "sdxl":
            h, w = x_t.shape[-2] * self.vae_scale, x_t.shape[-1] * self.vae_scale
            # add_time_ids = (original size, crop top-left, target size): SDXL report §2.2
            time_ids = torch.tensor([h, w, 0, 0, h, w], dtype=x_t.dtype, device=x_t.device).expand(x_t.shape[0], 6)
            added = {"text_embeds": cond.pooled.to(x_t.dtype), "time_ids": time_ids}
        return self.unet(x_t, t.to(x_t.device), encoder_hidden_states=cond.context.to(x_t.dtype),
                         added_cond_kwargs=added).sample

    def adapter_roots(self, targets: tuple[str, ...] = UNET_TARGETS) -> list[AdapterRoot]:
        paths = linear_paths(self.unet, targets, within="attn")
        return [AdapterRoot("lora_unet_", self.unet, paths)]

    def set_gradient_checkpointing(self, on: bool) -> None:
        if on:
            self.unet.enable_gradient_checkpointing()
        else:
            self.unet.disable_gradient_checkpointing()


class DiffusersTextEncoder:
    """One CLIP text encoder (SD1/SD2) or two (SDXL), encoded as the diffusers pipelines do."""

    def __init__(self, pipe, family: str | None = None):
        self.family = family or detect_family(pipe)
        self.tokenizers = [pipe.tokenizer] + ([pipe.tokenizer_2] if self.family == "sdxl" else [])
        self.models = [pipe.text_encoder] + ([pipe.text_encoder_2] if self.family == "sdxl" else [])
        self.prefixes = ["lora_te1_", "lora_te2_"] if self.family == "sdxl" else ["lora_te_"]

    def token_ids(self, prompts: list[str], which: int = 0) -> torch.Tensor:
        tok = self.tokenizers[which]
        return tok(prompts, padding="max_length", max_length=tok.model_max_length, truncation=True,
                   return_tensors="pt").input_ids

    def encode(self, prompts: list[str]) -> Conditioning:
        if self.family != "sdxl":
            model = self.models[0]
            return Conditioning(model(self.token_ids(prompts).to(model.device))[0])
        hidden, pooled = [], None
        for i, model in enumerate(self.models):
            out = model(self.token_ids(prompts, i).to(model.device), output_hidden_states=True)
            hidden.append(out.hidden_states[-2])
            pooled = out[0]  # the last encoder's projected pooled output (text_embeds)
        return Conditioning(torch.cat(hidden, dim=-1), pooled)

    def adapter_roots(self, targets: tuple[str, ...] = TEXT_TARGETS) -> list[AdapterRoot]:
        roots = []
        for prefix, model in zip(self.prefixes, self.models):
            body = text_transformer(model)
            roots.append(AdapterRoot(prefix + "text_model_", body, linear_paths(body, targets, within="self_attn")))
        return roots

    def set_gradient_checkpointing(self, on: bool) -> None:
        for m in self.models:
            if on:
                m.gradient_checkpointing_enable()
            else:
                m.gradient_checkpointing_disable()


def text_transformer(model: nn.Module) -> nn.Module:
    """The CLIP transformer body (embeddings + encoder) whose layers kohya names ``text_model_encoder_…``.

    transformers < 5 nests it as ``CLIPTextModel.text_model``; transformers 5 puts it at the top level.
    """
    return getattr(model, "text_model", model)


def pick_dtype(device: torch.device | str, requested: str = "auto") -> torch.dtype:
    """Compute dtype for autocast: fp32 on a CPU without bf16 units (bf16 there is ~10× slower), bf16 on GPUs
    and CPUs that have it."""
    if requested != "auto":
        return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[requested]
    device = torch.device(device)
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    if device.type == "cpu" and _cpu_has_bf16():
        return torch.bfloat16
    return torch.float32


def _cpu_has_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else ("mps" if torch.backends.mps.is_available() else "cpu")


def base_name(base: str) -> str:
    return "demo" if base == "demo" else os.path.basename(os.path.normpath(base))
