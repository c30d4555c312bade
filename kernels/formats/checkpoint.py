"""Training checkpoints in safetensors: adapter parameters, optimizer and LR-scheduler state, RNG state.

Tensors go in the tensor section, everything else (step, losses, param groups, scheduler counters) as JSON
in the metadata. Written atomically, so an interrupted write never replaces a good checkpoint.
"""

from __future__ import annotations

import json
import os

import torch

from ..core.errors import UserInputError
from .safetensors_io import atomic_save, load_safetensors


def save_checkpoint(path: str | os.PathLike, *, step: int, params: dict[str, torch.Tensor],
                    optimizer: torch.optim.Optimizer, scheduler, losses: list[float], fingerprint: str,
                    extra: dict | None = None) -> str:
    opt = optimizer.state_dict()
    tensors = {f"param.{n}": p.detach() for n, p in params.items()}
    for idx, state in opt["state"].items():
        for k, v in state.items():
            tensors[f"optim.{idx}.{k}"] = v if torch.is_tensor(v) else torch.tensor(v)
    tensors["rng.torch"] = torch.get_rng_state()
    meta = {
        "fsp.checkpoint_version": "1",
        "step": str(step),
        "fingerprint": fingerprint,
        "losses": json.dumps(losses),
        "optim.param_groups": json.dumps(opt["param_groups"]),
        "scheduler": json.dumps(scheduler.state_dict() if scheduler is not None else None, default=lambda o: None),
        "extra": json.dumps(extra or {}),
    }
    atomic_save(tensors, path, meta, overwrite=True)
    return str(path)


def load_checkpoint(path: str | os.PathLike, *, params: dict[str, torch.Tensor], optimizer: torch.optim.Optimizer,
                    scheduler, fingerprint: str) -> tuple[int, list[float], dict]:
    """Restore state in place; returns (step, losses so far, extra). Refuses a checkpoint of other settings.
    ``scheduler`` may be None on both sides (a loop that sets its learning rate itself)."""
    tensors, meta = load_safetensors(path)
    if "fsp.checkpoint_version" not in meta:
        raise UserInputError(f"{path} is not a training checkpoint of this project")
    if meta.get("fingerprint") != fingerprint:
        raise UserInputError(f"{path} was written with other training settings; resume with the same "
                             "settings or start afresh without --resume")
    with torch.no_grad():
        for n, p in params.items():
            key = f"param.{n}"
            if key not in tensors or tensors[key].shape != p.shape:
                raise UserInputError(f"{path}: parameter {n} is missing or has another shape")
            p.copy_(tensors[key])
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, idx, name = key.split(".", 2)
            state.setdefault(int(idx), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": json.loads(meta["optim.param_groups"])})
    sched_state = json.loads(meta["scheduler"])
    if scheduler is not None and sched_state is not None:
        sched_state.pop("lr_lambdas", None)
        scheduler.load_state_dict({**scheduler.state_dict(), **sched_state})
    torch.set_rng_state(tensors["rng.torch"])
    return int(meta["step"]), json.loads(meta["losses"]), json.loads(meta.get("extra", "{}"))
