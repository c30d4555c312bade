"""Mix-of-Show's regionally controllable sampling (Gu et al., NeurIPS 2023, §3.4) on a diffusers UNet.

An attention processor on every cross-attention (``attn2``) module replaces, at the image tokens inside each
region, the attention with the global prompt by the attention with that region's prompt
(:func:`...multi_concept.regions.regional_attention`); self-attention (``attn1``) is untouched.

* The global prompt's context is what the pipeline passes as ``encoder_hidden_states``; each region's context is
  encoded by the same path (:func:`encode_region_prompts`, so placeholder and ED-LoRA tokens work in region
  prompts) and projected by the module's own ``to_k`` / ``to_v``.
* ED-LoRA's layer-wise contexts arrive stacked [B, layers·L, D]; the router slices the global one before the
  processor runs, and the processor slices each region's the same way with its layer index (forward order of
  :meth:`.denoiser.DiffusersDenoiser.cross_attention_modules`).
* Classifier-free guidance: diffusers batches [uncond, cond] rows; with ``guided=True`` only the second half
  (the conditional rows) gets regions, the unconditional half keeps plain global attention.
* SDXL: the pooled embedding stays the global prompt's; region contexts are both encoders' outputs concatenated,
  like the global one.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import contextmanager

import torch
import torch.nn.functional as F

from ...adapters.layerwise_context import layer_context
from ...core.errors import UserInputError
from ...engine.seams import Handle
from ...multi_concept.regions import regional_attention, token_weights
from .denoiser import DiffusersDenoiser
from .text_encoder import DiffusersTextEncoder


class RegionWeightCache:
    """Region masks [R, H, W] pooled to each layer's token count (Mix-of-Show §3.4), computed once per count and
    device and shared by all processors of one install."""

    def __init__(self, masks: torch.Tensor, height: int, width: int):
        self.masks, self.aspect = masks.detach().float().cpu(), (height, width)
        self._cache: dict[tuple[int, torch.device], torch.Tensor] = {}

    def __call__(self, n_tokens: int, device: torch.device) -> torch.Tensor:
        key = (n_tokens, device)
        if key not in self._cache:
            self._cache[key] = token_weights(self.masks, n_tokens, aspect=self.aspect).to(device)
        return self._cache[key]


class RegionalSwitch:
    """Shared by the processors of one install: ``active`` False makes them plain cross-attention (the region
    layout phase runs the UNet on region crops, where the image-size regions do not apply)."""

    def __init__(self):
        self.active = True


class RegionalHandle(Handle):
    """The :class:`Handle` of :func:`install_regional_attention`, with :meth:`paused` for calls on region crops."""

    def __init__(self, undo, switch: RegionalSwitch):
        super().__init__(undo)
        self.switch = switch

    @contextmanager
    def paused(self):
        """Plain cross-attention inside the ``with`` block."""
        before, self.switch.active = self.switch.active, False
        try:
            yield
        finally:
            self.switch.active = before


class RegionalCrossAttnProcessor:
    """Region-aware cross-attention (Mix-of-Show §3.4) for one diffusers ``Attention`` module used as ``attn2``.

    Mirrors ``AttnProcessor2_0`` (spatial/group norm, ``norm_cross``, ``norm_q``/``norm_k``, output projection,
    residual, rescale) with the attention itself replaced by :func:`regional_attention` on the conditional rows.
    Region contexts are [1 or B_cond, T, D] (layer-wise stacked ones are sliced to this layer).
    """

    def __init__(self, layer: int, layers: int, region_contexts: Sequence[torch.Tensor],
                 weights: RegionWeightCache, guided: bool = True, switch: RegionalSwitch | None = None):
        self.layer, self.layers = layer, layers
        self.switch = switch or RegionalSwitch()
        self.region_contexts = list(region_contexts)
        self.weights = weights
        self.guided = guided

    def conditional_rows(self, batch: int) -> slice:
        """The rows that get regions: with classifier-free guidance the second half ([uncond, cond]), else all."""
        if not self.guided:
            return slice(0, batch)
        if batch % 2:
            raise ValueError(f"regional attention expects [uncond, cond] batches under classifier-free guidance, "
                             f"got an odd batch of {batch}; install with guided=False when sampling without CFG")
        return slice(batch // 2, batch)

    def _region_context(self, context: torch.Tensor, global_tokens: int, like: torch.Tensor) -> torch.Tensor:
        context = layer_context(context, self.layer, self.layers, global_tokens)
        return context.to(device=like.device, dtype=like.dtype)

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None,
                 *args, **kwargs) -> torch.Tensor:
        if encoder_hidden_states is None:
            raise ValueError("the regional processor is for cross-attention (attn2) only; it got no context")
        if attention_mask is not None:
            raise ValueError("regional cross-attention does not support an encoder attention mask")
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            b, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(b, channel, height * width).transpose(1, 2)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
            """softmax(QKᵀ·scale)V per head, with the module's q/k norms (as ``AttnProcessor2_0``)."""
            bq, n = q.shape[:2]

            def split(x: torch.Tensor) -> torch.Tensor:
                return x.reshape(x.shape[0], x.shape[1], heads, -1).transpose(1, 2)

            qh, kh, vh = split(q), split(k), split(v)
            if attn.norm_q is not None:
                qh = attn.norm_q(qh)
            if attn.norm_k is not None:
                kh = attn.norm_k(kh)
            out = F.scaled_dot_product_attention(qh, kh, vh, scale=attn.scale)
            return out.transpose(1, 2).reshape(bq, n, -1).to(q.dtype)

        def project(context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            if attn.norm_cross:
                context = attn.norm_encoder_hidden_states(context)
            return attn.to_k(context), attn.to_v(context)

        query = attn.to_q(hidden_states)
        key, value = project(encoder_hidden_states)
        if self.switch.active:
            cond = self.conditional_rows(query.shape[0])
            region_kv = [project(self._region_context(c, encoder_hidden_states.shape[1], encoder_hidden_states))
                         for c in self.region_contexts]
            out = regional_attention(query[cond], key[cond], value[cond], [k for k, _ in region_kv],
                                     [v for _, v in region_kv], self.weights(query.shape[1], query.device),
                                     attn.heads, attention=attend)
            if cond.start:  # unconditional rows: plain attention with the global (negative) prompt
                uncond = slice(0, cond.start)
                out = torch.cat([attend(query[uncond], key[uncond], value[uncond], attn.heads), out])
        else:  # paused (region layout's calls on region crops): plain cross-attention
            out = attend(query, key, value, attn.heads)
        hidden_states = attn.to_out[1](attn.to_out[0](out))
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(b, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


def encode_region_prompts(pipe, prompts: Sequence[str], adapters=None) -> list[torch.Tensor]:
    """Each region prompt's context [1, T, D] for Mix-of-Show's regional sampling (§3.4), encoded like the global
    prompt: through ``adapters`` (a :class:`.adapters.PipelineAdapters`; placeholders, ED-LoRA layer-wise tokens
    stacked [1, layers·L, D], CatVersion K/V tokens as for a positive prompt) when given, else the pipeline's
    text encoder(s) as the pipeline encodes (SDXL: both encoders' penultimate states concatenated)."""
    contexts = []
    text = None if adapters is not None else DiffusersTextEncoder(pipe)
    for i, prompt in enumerate(prompts):
        if not prompt or not prompt.strip():
            raise UserInputError(f"region {i + 1}: the prompt is empty")
        with torch.no_grad():
            cond = adapters.encode([prompt], with_kv=True) if adapters is not None else text.encode([prompt])
        contexts.append(cond.context.detach())
    return contexts


def install_regional_attention(pipe, region_contexts: Sequence[torch.Tensor], masks: torch.Tensor, height: int,
                               width: int, *, guided: bool = True) -> Handle:
    """Put region-aware cross-attention processors (Mix-of-Show §3.4) on the UNet's ``attn2`` modules.

    Args:
        pipe: a diffusers Stable Diffusion / SDXL pipeline (or anything with ``.unet``, ``.vae``, ``.scheduler``).
        region_contexts: one context per region [1 or B_cond, T, D] (:func:`encode_region_prompts`).
        masks: [R, H, W] region masks in [0, 1] (``region_masks``), one per region context.
        height, width: the image size in pixels (gives each layer's token grid its aspect).
        guided: the pipeline samples with classifier-free guidance ([uncond, cond] batches): only the
            second half of each batch gets regions. False: every row does.
    Returns a :class:`RegionalHandle` whose ``remove()`` puts back exactly the processors that were there before.
    """
    if masks.dim() != 3 or masks.shape[0] != len(region_contexts):
        raise ValueError(f"{len(region_contexts)} region contexts need masks [R={len(region_contexts)}, H, W], "
                         f"got {tuple(masks.shape)}")
    modules = DiffusersDenoiser(pipe).cross_attention_modules()
    weights, switch = RegionWeightCache(masks, height, width), RegionalSwitch()
    previous = [m.processor for m in modules]
    for layer, module in enumerate(modules):
        module.set_processor(RegionalCrossAttnProcessor(layer, len(modules), region_contexts, weights, guided,
                                                        switch))

    def restore() -> None:
        for module, processor in zip(modules, previous):
            module.set_processor(processor)

    return RegionalHandle(restore, switch)
