"""Device policy: which device and compute dtype training and sampling use (no back end involved)."""

from __future__ import annotations

import torch


def pick_dtype(device: torch.device | str, requested: str = "auto") -> torch.dtype:
    """Compute dtype for autocast: bf16 on GPUs that have it, else fp32; fp32 on every CPU. On a CPU with bf16
    units (AMX) bf16 autocast pays off only for large models and changes the numbers from one CPU kind to another,
    so there it must be asked for (``requested='bf16'``)."""
    if requested != "auto":
        return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[requested]
    device = torch.device(device)
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    return torch.float32


def default_device() -> str:
    """cuda, else mps, else cpu."""
    return "cuda" if torch.cuda.is_available() else ("mps" if torch.backends.mps.is_available() else "cpu")
