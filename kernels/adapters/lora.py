"""LoRA adapters (Hu et al. 2021, arXiv 2106.09685, eq. 3: h = W x + (α/r)·B A x) injected with peft.

The layers are peft's own ``LoraLayer`` wrappers; this file only decides *where* they go (exact module
paths given by a back end), reads their weights out as plain (down, up, alpha) triples, puts them back,
removes them again, and merges ΔW = (α/r)·up@down into base weights for inference.

Linear layers and 2-D convolutions can both be adapted. A convolution's LoRA is kohya's "LoCon" layout (what
peft builds too): ``down`` is a k×k convolution to ``r`` channels [r, in, k, k], ``up`` a 1×1 convolution back
[out, r, 1, 1], so ΔW = (α/r)·up@down.flatten(1), reshaped to the kernel.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import nn

ADAPTER_NAME = "fewshot"
#: default LoRA targets: the UNet's attention projections and the text encoders' self-attention projections
UNET_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
TEXT_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")
#: the target that stands for every linear layer and 2-D convolution of a model (what ComfyUI's TrainLoraNode
#: and kohya's LoCon adapt), instead of layer names
ALL_LAYERS = "all"
#: the module types a LoRA can wrap
ADAPTABLE_LAYERS = (nn.Linear, nn.Conv2d)
#: left out of ``ALL_LAYERS``: SDXL's embedding of pooled text and image sizes (diffusers: ``add_embedding``,
#: ComfyUI: ``label_emb``), whose kohya names diffusers' LoRA reader maps to modules that do not exist
ALL_LAYERS_EXCEPT = ("add_embedding.", "label_emb.")


def adapter_paths(root: nn.Module, targets: tuple[str, ...], within: str = "") -> list[str]:
    """Paths of ``nn.Linear`` modules whose name ends with one of ``targets`` (and contains ``within``);
    ``targets == (ALL_LAYERS,)``: every ``nn.Linear`` and ``nn.Conv2d`` under ``root``, wherever it is (but
    :data:`ALL_LAYERS_EXCEPT`)."""
    if tuple(targets) == (ALL_LAYERS,):
        return [n for n, m in root.named_modules()
                if isinstance(m, ADAPTABLE_LAYERS) and not n.startswith(ALL_LAYERS_EXCEPT)]
    return [n for n, m in root.named_modules()
            if isinstance(m, nn.Linear) and within in n and any(n == t or n.endswith("." + t) for t in targets)]


def layer_width(m: nn.Module) -> tuple[int, int]:
    """(inputs, outputs) of the weight matrix a LoRA factorises: a convolution's k×k×in patch counts as input."""
    if isinstance(m, nn.Conv2d):
        return m.in_channels // m.groups * m.kernel_size[0] * m.kernel_size[1], m.out_channels
    return m.in_features, m.out_features


def check_rank(root: nn.Module, paths: list[str], rank: int) -> None:
    """Refuse a rank larger than the smallest adapted layer allows (ValueError naming the layer)."""
    modules = dict(root.named_modules())
    for p in paths:
        m = modules.get(p)
        if m is None:
            raise ValueError(f"no module named {p!r}")
        if isinstance(m, nn.Conv2d) and m.groups != 1:
            raise ValueError(f"layer {p} is a grouped convolution; LoRA adapts ordinary convolutions only")
        n_in, n_out = layer_width(m)
        smallest = min(n_in, n_out)
        if rank > smallest:
            raise ValueError(f"rank {rank} is larger than layer {p} allows ({n_in}→{n_out}: at most {smallest})")


@dataclass
class LoraWeights:
    """One adapted layer: ``down`` [r, in] (peft ``lora_A``), ``up`` [out, r] (peft ``lora_B``), kohya ``alpha``;
    a convolution's are [r, in, k, k] and [out, r, 1, 1]."""

    down: torch.Tensor
    up: torch.Tensor
    alpha: float

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    def delta(self, strength: float = 1.0) -> torch.Tensor:
        """ΔW = strength · (α/r) · up @ down (kohya / ComfyUI convention), as a matrix [out, in·k·k]."""
        return (strength * self.alpha / self.rank) * (self.up.float().flatten(1) @ self.down.float().flatten(1))


def attach_lora(root: nn.Module, module_paths: list[str], rank: int, alpha: float | None = None,
                dropout: float = 0.0) -> dict[str, nn.Module]:
    """Wrap each ``root.<path>`` (nn.Linear or nn.Conv2d) in a peft LoRA layer, in place.

    peft initialises ``lora_A`` with Kaiming-uniform and ``lora_B`` with zeros, so the model is unchanged at
    step 0. Only the adapter parameters require grad. Returns {path: peft layer}.
    """
    from peft import LoraConfig, inject_adapter_in_model

    if not module_paths:
        raise ValueError("no layers to adapt")
    check_rank(root, module_paths, rank)
    pattern = "^(" + "|".join(re.escape(p) for p in module_paths) + ")$"
    config = LoraConfig(r=rank, lora_alpha=float(alpha if alpha is not None else rank), lora_dropout=dropout,
                        target_modules=pattern, init_lora_weights=True)
    inject_adapter_in_model(config, root, adapter_name=ADAPTER_NAME)
    for name, param in root.named_parameters():
        param.requires_grad_(f".lora_A.{ADAPTER_NAME}." in name or f".lora_B.{ADAPTER_NAME}." in name)
    modules = dict(root.named_modules())
    return {p: modules[p] for p in module_paths}


def lora_layers(root: nn.Module) -> dict[str, nn.Module]:
    """The peft LoRA layers under ``root`` that carry our adapter, by module path."""
    from peft.tuners.lora import LoraLayer

    return {n: m for n, m in root.named_modules() if isinstance(m, LoraLayer) and ADAPTER_NAME in m.lora_A}


def read_lora(root: nn.Module) -> dict[str, LoraWeights]:
    """Current adapter weights of every LoRA layer under ``root`` (detached copies, float32)."""
    out = {}
    for path, layer in lora_layers(root).items():
        down = layer.lora_A[ADAPTER_NAME].weight.detach().float().cpu().clone()
        up = layer.lora_B[ADAPTER_NAME].weight.detach().float().cpu().clone()
        out[path] = LoraWeights(down, up, float(layer.scaling[ADAPTER_NAME] * down.shape[0]))
    return out


def write_lora(root: nn.Module, weights: dict[str, LoraWeights]) -> None:
    """Copy ``weights`` into the already attached LoRA layers (same paths and ranks)."""
    layers = lora_layers(root)
    missing = sorted(set(layers) ^ set(weights))
    if missing:
        raise ValueError(f"adapter layers do not match: {missing[:3]}{' …' if len(missing) > 3 else ''}")
    with torch.no_grad():
        for path, w in weights.items():
            layer = layers[path]
            layer.lora_A[ADAPTER_NAME].weight.copy_(w.down)
            layer.lora_B[ADAPTER_NAME].weight.copy_(w.up)
            layer.scaling[ADAPTER_NAME] = w.alpha / w.rank


def detach_lora(root: nn.Module) -> int:
    """Put every wrapped base layer back where its LoRA wrapper was (un-merged), drop peft's bookkeeping
    attribute and leave every parameter frozen. Returns the number of layers unwrapped."""
    layers = lora_layers(root)
    for path, layer in layers.items():
        parent_path, _, child = path.rpartition(".")
        parent = root.get_submodule(parent_path) if parent_path else root
        setattr(parent, child, layer.get_base_layer())
    root.__dict__.pop("peft_config", None)
    for p in root.parameters():
        p.requires_grad_(False)
    return len(layers)


@torch.no_grad()
def merge_lora(root: nn.Module, weights: dict[str, LoraWeights], strength: float = 1.0) -> None:
    """W ← W + strength·(α/r)·up@down for each layer path (inference; reverse with ``strength=-s``)."""
    modules = dict(root.named_modules())
    for path, w in weights.items():
        m = modules.get(path)
        if m is None:
            raise ValueError(f"the model has no layer {path!r}")
        delta = w.delta(strength).reshape(m.weight.shape)
        m.weight.add_(delta.to(device=m.weight.device, dtype=m.weight.dtype))
