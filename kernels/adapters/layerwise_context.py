"""One text conditioning per cross-attention layer (P+, Voynov et al. 2023 §4; Mix-of-Show's ED-LoRA, Gu et al.
2023 §3.2), carried as one context: the per-layer contexts [layers, B, L, D] are concatenated along the token axis
into [B, layers·L, D], so they pass through every API that takes a context tensor (pipelines, samplers, CFG
batching). A router on the denoiser's cross-attention modules (in forward order) hands layer i its own L tokens (of
every part, when several stacked contexts are concatenated); a context of any other length passes unchanged.
"""

from __future__ import annotations

from collections.abc import Callable

import torch


def stack_layer_contexts(per_layer: torch.Tensor) -> torch.Tensor:
    """[layers, B, L, D] → [B, layers·L, D] (layer 0's tokens first)."""
    layers, b, length, d = per_layer.shape
    return per_layer.permute(1, 0, 2, 3).reshape(b, layers * length, d)


def layer_context(context: torch.Tensor, layer: int, layers: int, tokens: int) -> torch.Tensor:
    """Layer ``layer``'s tokens out of a stacked context; any other context as it is.

    [B, layers·L, D] → [B, L, D]. A context of m stacked parts, [B, m·layers·L, D] in [part][layer][token] order
    (the global and region prompts of Mix-of-Show's regional sampling, §3.4, or ComfyUI's repeats of a stacked
    context to a common length), gives every part's slice of that layer in order: [B, m·L, D].
    """
    length = context.shape[1]
    span = layers * tokens
    if layers <= 1 or tokens <= 0 or length == 0 or length % span:
        return context
    if length == span:
        return context[:, layer * tokens:(layer + 1) * tokens]
    parts = length // span
    return context.unflatten(1, (parts, layers, tokens))[:, :, layer].flatten(1, 2)


def routing_pre_hook(layer: int, layers: int, tokens: int, key: str = "encoder_hidden_states") -> Callable:
    """A ``register_forward_pre_hook(..., with_kwargs=True)`` hook for cross-attention module number ``layer``:
    replaces the keyword argument ``key`` by that layer's slice of a stacked context."""

    def hook(module, args, kwargs):
        context = kwargs.get(key)
        if context is None:
            return None
        kwargs[key] = layer_context(context, layer, layers, tokens)
        return args, kwargs

    return hook
