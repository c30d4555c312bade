"""LoRA files in kohya's key layout, which ComfyUI's LoraLoader, A1111/Forge and diffusers'
``load_lora_weights`` all read.

Keys: ``<prefix><module path with '.'→'_'>.lora_down.weight`` [r, in], ``.lora_up.weight`` [out, r],
``.alpha`` (scalar; ΔW = α/r · up@down). Prefixes: ``lora_unet_`` (diffusers UNet names), ``lora_te_``
(SD1.x/SD2.x text encoder), ``lora_te1_`` / ``lora_te2_`` (SDXL's two text encoders).
Metadata (all strings): ``fsp.*`` fields of this project plus kohya's ``ss_*`` basics.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

import torch

from ..adapters.lora import LoraWeights
from ..core.errors import UserInputError
from .metadata import fsp_metadata
from .safetensors_io import atomic_save, load_safetensors

UNET_PREFIX = "lora_unet_"
TEXT_PREFIXES = ("lora_te_", "lora_te1_", "lora_te2_")
_SUFFIXES = (".lora_down.weight", ".lora_up.weight", ".alpha")
_KOHYA_BASE = {"sd1": "sd_v1", "sd2": "sd_v2", "sdxl": "sdxl_base_v1-0"}


def text_prefix(family: str, which: int) -> str:
    """The kohya module prefix of text encoder ``which`` (``lora_te_``; SDXL: ``lora_te1_`` / ``lora_te2_``)."""
    return f"lora_te{which + 1}_" if family == "sdxl" else "lora_te_"


def kohya_name(prefix: str, module_path: str) -> str:
    return prefix + module_path.replace(".", "_")


def to_kohya(weights: dict[str, LoraWeights], prefix: str,
             canonical: dict[str, str] | None = None) -> dict[str, LoraWeights]:
    """{module path: weights} → {kohya module name: weights}; ``canonical`` renames module paths first (e.g.
    ComfyUI's LDM UNet paths → diffusers paths)."""
    if canonical is not None:
        unknown = [p for p in weights if p not in canonical]
        if unknown:
            raise UserInputError(f"no diffusers name for adapted layer {unknown[0]}")
        weights = {canonical[p]: w for p, w in weights.items()}
    return {kohya_name(prefix, p): w for p, w in weights.items()}


def from_kohya(weights: dict[str, LoraWeights], prefix: str, module_paths: Iterable[str]) -> dict[str, LoraWeights]:
    """Pick the entries with ``prefix`` and map them back to module paths of a model whose modules are
    ``module_paths`` (kohya names are ambiguous without the model: '_' is both separator and letter)."""
    lookup = {kohya_name(prefix, p): p for p in module_paths}
    out, unknown = {}, []
    for name, w in weights.items():
        if not name.startswith(prefix):
            continue
        if name in lookup:
            out[lookup[name]] = w
        else:
            unknown.append(name)
    if unknown:
        raise UserInputError(f"the adapter has {len(unknown)} layers this model does not have, e.g. {unknown[0]} "
                             "(was it trained on another model?)")
    return out


def lora_tensors(weights: dict[str, LoraWeights]) -> dict[str, torch.Tensor]:
    """{kohya name: weights} → the flat tensor dict that goes into the file."""
    out = {}
    for name, w in weights.items():
        out[f"{name}.lora_down.weight"] = w.down.contiguous()
        out[f"{name}.lora_up.weight"] = w.up.contiguous()
        out[f"{name}.alpha"] = torch.tensor(float(w.alpha))
    return out


def parse_lora_tensors(tensors: dict[str, torch.Tensor], source: str = "adapter") -> dict[str, LoraWeights]:
    """The inverse of :func:`lora_tensors`; refuses files that are not kohya LoRAs with a clear message."""
    names = {}
    for key in tensors:
        for suffix in _SUFFIXES:
            if key.endswith(suffix):
                names.setdefault(key[: -len(suffix)], set()).add(suffix)
                break
    if not names:
        raise UserInputError(f"{source} has no LoRA weights (no '*.lora_down.weight' keys): not a LoRA file")
    out = {}
    for name, have in names.items():
        if {".lora_down.weight", ".lora_up.weight"} - have:
            raise UserInputError(f"{source}: layer {name} lacks its lora_down or lora_up weight")
        down, up = tensors[f"{name}.lora_down.weight"].float(), tensors[f"{name}.lora_up.weight"].float()
        if up.shape[1] != down.shape[0]:
            raise UserInputError(f"{source}: layer {name} has mismatched ranks {tuple(down.shape)} / {tuple(up.shape)}")
        alpha = float(tensors[f"{name}.alpha"]) if ".alpha" in have else float(down.shape[0])
        out[name] = LoraWeights(down, up, alpha)
    return out


def lora_metadata(*, family: str, method: str, rank: int, alpha: float, steps: int, **fields) -> dict[str, str]:
    """The metadata block of a LoRA file: ``fsp.*`` (:func:`fsp_metadata`) and kohya's ``ss_*`` basics."""
    return {**fsp_metadata(method=method, family=family, steps=steps, rank=rank, alpha=alpha, **fields),
            "ss_network_module": "networks.lora",
            "ss_network_dim": str(rank),
            "ss_network_alpha": str(alpha),
            "ss_base_model_version": _KOHYA_BASE.get(family, family),
            "ss_steps": str(steps)}


def save_lora_file(path: str | os.PathLike, weights: dict[str, LoraWeights], metadata: dict[str, str],
                   overwrite: bool = False):
    """Atomically write {kohya name: weights} + metadata."""
    return atomic_save(lora_tensors(weights), path, metadata, overwrite=overwrite)


def load_lora_file(path: str | os.PathLike) -> tuple[dict[str, LoraWeights], dict[str, str]]:
    """Read a kohya LoRA file (ours or another trainer's); never unpickles."""
    tensors, meta = load_safetensors(path)
    return parse_lora_tensors(tensors, source=str(path)), meta
