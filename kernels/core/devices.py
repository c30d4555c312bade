"""Device policy: which device and compute dtype training and sampling use (no back end involved)."""

from __future__ import annotations

from pathlib import Path

import torch


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
    """cuda, else mps, else cpu."""
    return "cuda" if torch.cuda.is_available() else ("mps" if torch.backends.mps.is_available() else "cpu")
