"""A deeper demo UNet that computes exactly what the shallower one computes, so that a trained UNet gains
cross-attention capacity (where two-object captions bind a colour and a class to each object) without starting over.

Every cross-attention block (``Transformer2DModel``) of a diffusers ``UNet2DConditionModel`` gets more transformer
layers (``transformer_layers_per_block``). The existing layers keep their weights; each new layer is a freshly
initialised ``BasicTransformerBlock`` whose three residual branches (self-attention, cross-attention, feed-forward)
end in an output projection set to zero, so the layer adds nothing and the network's function is unchanged. This is
Net2DeeperNet's aim (Chen, Goodfellow & Shlens, "Net2Net", ICLR 2016, §3.3: a new layer initialised to the identity)
with the zero-initialised residual branch that ControlNet (Zhang et al., ICCV 2023, §3.1) uses in place of an
identity matrix: the output projections get a gradient from the first step (their input is not zero), the rest of
the new layer once they have moved. The result is a stock diffusers UNet with a larger
``transformer_layers_per_block``, which diffusers and ComfyUI (its ``transformer_depth``) load like any other.
"""

from __future__ import annotations

import re

import torch

__all__ = ["deepen_unet", "transformer_layers"]

#: the residual branches' last projections inside a BasicTransformerBlock
_BRANCH_OUTPUTS = ("attn1.to_out.0", "attn2.to_out.0", "ff.net.2")
_LAYER = re.compile(r"\.transformer_blocks\.(\d+)\.")


def transformer_layers(unet) -> int:
    """The UNet's transformer layers per cross-attention block (one number for every block, as the demo uses)."""
    layers = unet.config.transformer_layers_per_block
    if not isinstance(layers, int):
        raise ValueError(f"expected one transformer depth for every block, got {layers!r}")
    return layers


def deepen_unet(unet, layers: int, seed: int = 0):
    """A copy of ``unet`` with ``layers`` transformer layers in every cross-attention block (at least its own);
    the new layers are drawn from ``seed`` and start with zero output projections (module docstring)."""
    from diffusers import UNet2DConditionModel

    have = transformer_layers(unet)
    if not isinstance(layers, int) or layers < have:
        raise ValueError(f"layers must be an integer of at least the UNet's own {have}, got {layers!r}")
    torch.manual_seed(seed)
    config = {k: v for k, v in unet.config.items() if not k.startswith("_")}  # from_config would drop a
    deep = UNet2DConditionModel(**(config | {"transformer_layers_per_block": layers}))  # default-valued key
    missing, unexpected = deep.load_state_dict(unet.state_dict(), strict=False)
    new = {k for k in missing if (m := _LAYER.search(k)) and int(m.group(1)) >= have}
    if unexpected or set(missing) != new:
        raise ValueError(f"not a UNet this function can deepen: {sorted(set(missing) - new)[:3]} missing, "
                         f"{sorted(unexpected)[:3]} unexpected")
    with torch.no_grad():
        for name, p in deep.named_parameters():
            if name in new and any(f".{out}." in name for out in _BRANCH_OUTPUTS):
                p.zero_()
    return deep.train(unet.training)
