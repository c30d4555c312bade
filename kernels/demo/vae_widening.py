"""A wider VAE that computes exactly what a narrower one computes (Net2WiderNet: Chen, Goodfellow & Shlens,
"Net2Net", ICLR 2016, §3.2), so that the decoder gains capacity while the latent space a UNet was trained on stays.

Every feature channel of the narrow AutoencoderKL is copied ``factor`` times; a layer that reads copied channels
splits each weight among the copies (random shares that sum to one, drawn from ``seed``), so it sums to what it
summed before, and the copies, which get different gradients through their different outgoing weights, grow apart
in training (an even split would keep them identical for ever; Net2Net adds noise instead, which does not keep the
function exactly). The copies of a channel sit in the same
group of every GroupNorm (group g of the wide model holds ``factor`` copies of group g's channels), so each group's
mean and variance, and with them every normalised value, are unchanged. The mid-block's single-head attention scales
its logits by 1/√(head width); the copies double q·k, so the query is scaled by 1/√factor to leave the logits as they
were. Image and latent channels (the first and last convolutions, ``quant_conv``, ``post_quant_conv``) are not
widened. The result is a stock diffusers ``AutoencoderKL`` with wider ``block_out_channels``, which diffusers and
ComfyUI load like any other.
"""

from __future__ import annotations

import math

import torch

__all__ = ["widen_vae"]


def _copy_index(wide: int, narrow: int, groups: int) -> torch.Tensor:
    """For each channel of a ``wide`` feature map, the narrow channel it copies: group g of the wide map is
    ``wide // narrow`` copies of the narrow map's group g, in order."""
    size, factor = narrow // groups, wide // narrow
    n = torch.arange(wide)
    return (n // (size * factor)) * size + (n % (size * factor)) % size


def _shares(shape: torch.Size, index: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Random positive shares along dim 1 that sum to one over the copies of each narrow channel (``index``)."""
    r = torch.rand(shape, generator=g, dtype=torch.float64) + 0.5
    total = torch.zeros(shape[0], int(index.max()) + 1, *shape[2:], dtype=torch.float64).index_add_(1, index, r)
    return r / total.index_select(1, index)


def widen_vae(vae, factor: int = 2, seed: int = 0):
    """A new AutoencoderKL with every ``block_out_channels`` entry × ``factor`` whose encoder and decoder compute
    what ``vae``'s do (to float rounding); ``vae`` is not changed."""
    from diffusers import AutoencoderKL

    if factor < 1 or int(factor) != factor:
        raise ValueError(f"factor must be a positive integer, got {factor}")
    config = dict(vae.config)
    groups = config["norm_num_groups"]
    config["block_out_channels"] = [c * factor for c in config["block_out_channels"]]
    wide = AutoencoderKL.from_config({k: v for k, v in config.items() if not k.startswith("_")})
    narrow_state = vae.state_dict()
    g = torch.Generator().manual_seed(seed)
    state = {}
    for name, target in wide.state_dict().items():
        src = narrow_state[name]
        out = src
        for dim in range(src.dim()):
            if target.shape[dim] == src.shape[dim]:
                continue
            if target.shape[dim] != factor * src.shape[dim]:
                raise ValueError(f"{name}: dimension {dim} is {target.shape[dim]}, not {factor} × {src.shape[dim]}")
            index = _copy_index(target.shape[dim], src.shape[dim], groups)
            out = out.index_select(dim, index)
            if dim == 1:  # a layer reading the copies: they share each weight
                out = (out.double() * _shares(out.shape, index, g)).to(src.dtype)
        if ".attentions." in name and ".to_q." in name:
            out = out / math.sqrt(factor)
        state[name] = out.to(target.dtype)
    wide.load_state_dict(state)
    wide = wide.to(vae.device)
    return (wide if vae.dtype == torch.float32 else wide.to(dtype=vae.dtype)).eval()
