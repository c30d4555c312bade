"""Mix-of-Show's regionally controllable sampling (Gu et al., NeurIPS 2023, §3.4) on ComfyUI objects, for the stock
CLIPTextEncode → KSampler path.

* CONDITIONING: the positive's tensor becomes the global prompt's context followed by each region's,
  [B, (1+R)·L, D]; the pooled output and every other key stay the global prompt's. ComfyUI batches, pads (by
  repeating whole contexts) and moves it like any conditioning; the negative prompt is untouched.
* MODEL (a clone): one attn2 *replace* patch on every cross-attention layer. On the conditional rows it splits the
  projected keys/values into the global and R region parts and returns ``regional_attention``; the unconditional
  rows (the negative prompt, repeated by ComfyUI to the common length) get plain attention, as without regions.
* ED-LoRA / fused concepts (:mod:`.layerwise`): every part is a layer-wise stack [layers·77] (a plain 77-token prompt
  is repeated once per layer), so the layer-wise ``attn2_patch``, which runs before the replace patch, hands each
  layer every part's slice and the replace patch sees (1+R)·77 tokens.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch

from ...kernels.core.errors import UserInputError
from ...kernels.multi_concept.regions import Region, region_masks, regional_attention, token_weights
from .layerwise import TOKENS, cross_attention_order
from .region_layout import install_layout

#: conditioning keys that place or time a prompt; a region prompt's own are not used (its mask/box places it)
_PLACEMENT_KEYS = ("area", "mask", "strength", "start_percent", "end_percent", "set_area_to_bounds")
#: how much longer than the longest prompt the common length may be (ComfyUI's own limit for padding by repeats)
_MAX_PADDING = 4


@dataclass(frozen=True, eq=False)
class RegionEntry:
    """One region on the FSP_REGIONS socket: its prompt's context [B, L, D], its mask [height, width] (float in
    [0, 1], CPU) on a width x height image, where it came from (for messages) and notes for the user."""

    context: torch.Tensor
    mask: torch.Tensor
    width: int
    height: int
    where: str
    notes: tuple[str, ...] = ()


def _renumbered(err: UserInputError, index: int) -> UserInputError:
    """``region_masks`` names a lone region 'region 1'; name it by its place in the chain."""
    text, first = str(err), "region 1"
    if text.startswith(first):
        text = f"region {index + 1}" + text[len(first):]
    return UserInputError(text)


def _region_context(conditioning, name: str) -> tuple[torch.Tensor, list[str]]:
    if not isinstance(conditioning, (list, tuple)) or not conditioning:
        raise UserInputError(f"{name}: the conditioning is empty; connect a CLIP Text Encode output")
    if len(conditioning) > 1:
        raise UserInputError(f"{name}: the conditioning holds {len(conditioning)} prompts (combined or concatenated "
                             "conditioning); a region takes one prompt from one CLIP Text Encode")
    tensor, options = conditioning[0][0], conditioning[0][1]
    if not isinstance(tensor, torch.Tensor) or tensor.dim() != 3 or 0 in tensor.shape:
        shape = tuple(tensor.shape) if isinstance(tensor, torch.Tensor) else type(tensor).__name__
        raise UserInputError(f"{name}: expected a text conditioning [batch, tokens, width], got {shape}")
    notes = []
    ignored = [k for k in _PLACEMENT_KEYS if k in options]
    if ignored:
        notes.append(f"{name}: its conditioning's {', '.join(ignored)} setting(s) are not used; the region's "
                     "mask or box places its prompt")
    return tensor, notes


def add_region(previous, conditioning, mask: torch.Tensor | None, box: tuple[int, int, int, int], width: int,
               height: int) -> tuple[list[RegionEntry], str]:
    """The region list ``previous`` (or none) with one more region (Mix-of-Show §3.4): ``conditioning``'s prompt
    inside ``mask`` (resized to width x height) or, without a mask, the pixel ``box`` (x0, y0, x1, y1; x1/y1
    exclusive) on a width x height image. Returns (new list, text for the user); raises UserInputError for a box of
    zero area or outside the image, an empty mask, a batch of masks or an unusable conditioning."""
    regions = list(previous or [])
    index = len(regions)
    name = f"region {index + 1}"
    context, notes = _region_context(conditioning, name)
    if mask is not None:
        if not isinstance(mask, torch.Tensor):
            raise UserInputError(f"{name}: the mask must be a MASK tensor, got {type(mask).__name__}")
        if mask.dim() == 3:
            if mask.shape[0] != 1:
                raise UserInputError(f"{name}: the MASK holds a batch of {mask.shape[0]} masks; a region takes one")
            mask = mask[0]
        region = Region.from_mask(mask)
        where = f"a {mask.shape[-1]}x{mask.shape[-2]} mask" if mask.dim() == 2 else "a mask"
    else:
        region = Region.from_box(box)
        where = "box {},{},{},{}".format(*region.box)
    try:
        masks, mask_notes = region_masks([region], height, width)
    except UserInputError as err:
        raise _renumbered(err, index) from None
    # a lone region's notes about itself (a resize); coverage and overlaps are told by the apply node
    notes += [str(_renumbered(UserInputError(n), index)) for n in mask_notes if n.startswith("region 1")]
    entry = RegionEntry(context.detach(), masks[0], width, height, where, tuple(notes))
    summary = f"{name}: {where} on a {width}x{height} image; prompt of {context.shape[1]} tokens"
    return [*regions, entry], "\n".join([summary, *notes])


def _routes_layerwise(model) -> bool:
    """Whether ``model`` carries the layer-wise routing ``attn2_patch`` of Apply ED-LoRA / fused concepts."""
    patches = model.model_options.get("transformer_options", {}).get("patches", {}).get("attn2_patch", [])
    return any(getattr(p, "fsp_layerwise_routing", False) for p in patches)


def _part_length(lengths: list[tuple[str, int]], layers: int, routed: bool) -> tuple[int, int]:
    """(L, tokens per part after layer slicing) for prompts of the given (name, token count)."""
    stacked = layers * TOKENS
    layerwise = [name for name, n in lengths if layers > 1 and n == stacked]
    if layerwise and not routed:
        raise UserInputError(f"{', '.join(layerwise)}: a layer-wise ED-LoRA / fused-concepts conditioning ({layers} "
                             f"layers x {TOKENS} tokens), but the MODEL does not route it per layer: connect the MODEL "
                             "output of 'Apply ED-LoRA / fused concepts' whose CLIP encoded the prompts")
    if routed:
        long = [f"{name} ({n} tokens)" for name, n in lengths if n not in (TOKENS, stacked)]
        if long:
            raise UserInputError(f"{', '.join(long)}: with ED-LoRA / fused concepts on the MODEL every prompt must fit "
                                 f"in one chunk of {TOKENS} tokens (about 75 words), so that it can be stacked per "
                                 "layer; shorten it")
        return stacked, TOKENS
    common = math.lcm(*(n for _, n in lengths))
    longest = max(n for _, n in lengths)
    if common > _MAX_PADDING * longest:
        listed = ", ".join(f"{name} {n}" for name, n in lengths)
        raise UserInputError(f"the prompts' token counts ({listed}) have no common length within {_MAX_PADDING}x the "
                             f"longest (it would be {common}): encode them with the same CLIP and similar lengths")
    return common, common


def _assemble(global_context: torch.Tensor, regions: list[RegionEntry], length: int, what: str) -> torch.Tensor:
    """[B, (1+R)·length, D]: the global context then each region's, each repeated whole up to ``length`` tokens."""
    parts = [(what, global_context)] + [(f"region {i + 1}", r.context) for i, r in enumerate(regions)]
    width = global_context.shape[-1]
    batch = max(c.shape[0] for _, c in parts)
    out = []
    for name, c in parts:
        if c.shape[-1] != width:
            raise UserInputError(f"{name}'s conditioning is {c.shape[-1]} wide, {what}'s {width}: encode every prompt "
                                 "with the same CLIP (the one of this MODEL)")
        if c.shape[0] not in (1, batch):
            raise UserInputError(f"{name}'s conditioning has a batch of {c.shape[0]}, another prompt's {batch}: use "
                                 "one prompt per region (batch 1) or the same batch everywhere")
        c = c.to(device=global_context.device, dtype=global_context.dtype).expand(batch, -1, -1)
        out.append(c.repeat(1, length // c.shape[1], 1) if c.shape[1] != length else c)
    return torch.cat(out, dim=1)


def apply_regions(model, positive, regions, layout: float = 0.0, attention: bool = True) -> tuple[object, list, str]:
    """(MODEL clone with the regional attn2 patch, the positive with the region contexts appended, text for the user)
    for Mix-of-Show's regional sampling (§3.4). The caller's MODEL and conditioning are not changed.

    ``layout`` > 0: for that share of the schedule each region's latent crop is also denoised with its own prompt
    (:mod:`.region_layout`); ``attention=False``: no region-aware cross-attention (the global prompt everywhere
    once the layout is over; needs a layout)."""
    regions = list(regions or [])
    if not regions:
        raise UserInputError("no regions: connect the REGIONS output of a 'Region prompt' node")
    if not 0 <= layout <= 1:
        raise UserInputError(f"the layout share must be between 0 and 1, got {layout}")
    if not attention and not layout:
        raise UserInputError("with region attention off the regions need a layout share above 0 (else they would do "
                             "nothing)")
    if not isinstance(positive, (list, tuple)) or not positive:
        raise UserInputError("the positive conditioning is empty; connect the global prompt's CLIP Text Encode")
    sizes = {(r.width, r.height) for r in regions}
    if len(sizes) > 1:
        listed = ", ".join(f"region {i + 1} {r.width}x{r.height}" for i, r in enumerate(regions))
        raise UserInputError(f"the regions are drawn on images of different sizes ({listed}): give every Region prompt "
                             "the width and height you sample at")
    width, height = regions[0].width, regions[0].height
    order = cross_attention_order(model)
    if not order:
        raise UserInputError("this MODEL has no cross-attention layers in a UNet (input, middle, output blocks): "
                             "regional sampling needs an SD1 / SDXL-type model")
    routed = _routes_layerwise(model)
    globals_ = []
    for n, entry in enumerate(positive):
        tensor = entry[0]
        if not isinstance(tensor, torch.Tensor) or tensor.dim() != 3 or 0 in tensor.shape:
            raise UserInputError("the positive conditioning is not a text conditioning [batch, tokens, width]")
        globals_.append(("the global prompt" + (f" {n + 1}" if len(positive) > 1 else ""), tensor))
    lengths = [(name, t.shape[1]) for name, t in globals_]
    lengths += [(f"region {i + 1}", r.context.shape[1]) for i, r in enumerate(regions)]
    length, part_tokens = _part_length(lengths, len(order), routed)
    conditioning = [[_assemble(t, regions, length, name), dict(entry[1])]
                    for (name, t), entry in zip(globals_, positive)]

    masks = torch.stack([r.mask for r in regions])
    _, notes = region_masks([Region.from_mask(m) for m in masks], height, width)  # overlaps, full coverage
    notes = [n for r in regions for n in r.notes] + notes
    out = model.clone()
    replaced = out.model_options.get("transformer_options", {}).get("patches_replace", {}).get("attn2", {})
    if replaced:
        notes.append(f"this replaces {len(replaced)} attn2 replace patch(es) already on the MODEL (from another node)")
    patch = RegionalAttentionPatch(masks, len(regions), part_tokens, (height, width), global_only=not attention)
    for block_name, block_id, index in order:
        out.set_model_attn2_replace(patch, block_name, block_id, index)
    if layout:
        notes.append(install_layout(out, masks, len(regions), length, layout))
    stacked = f" (stacked per layer: {len(order)} layers x {TOKENS})" if part_tokens != length else ""
    what = "cross-attention layers patched" if attention else "cross-attention layers see the global prompt only"
    summary = (f"{len(regions)} region(s) on a {width}x{height} image, {len(order)} {what}; "
               f"every prompt as {length} tokens{stacked}")
    return out, conditioning, "\n".join([summary, *notes])


def _conditional_rows(extra_options: dict, batch: int) -> list[bool]:
    """Which rows of the batch are conditional (ComfyUI's ``cond_or_uncond``: 0 = positive, one flag per chunk);
    all of them when the sampler does not say."""
    flags = extra_options.get("cond_or_uncond")
    if not flags or batch % len(flags):
        return [True] * batch
    per = batch // len(flags)
    return [flag == 0 for flag in flags for _ in range(per)]


class RegionalAttentionPatch:
    """The attn2 replace patch of Mix-of-Show's regional sampling (§3.4), shared by every cross-attention layer.

    Gets projected q [B, N, C], k and v [B, T, C] and ComfyUI's ``extra_options``. On conditional rows whose T is a
    multiple of (1+R)·L (ComfyUI may repeat the whole context), the first (1+R)·L tokens are split into the global
    and the region prompts and ``regional_attention`` runs with the masks pooled to this layer's N tokens (grid
    aspect from the latent, cached per N). Other rows and lengths get plain attention, ComfyUI's own.
    """

    def __init__(self, masks: torch.Tensor, regions: int, part_tokens: int, size: tuple[int, int],
                 global_only: bool = False):
        self.masks = masks.detach().float().cpu()
        self.regions, self.part_tokens = regions, part_tokens
        self.global_only = global_only  # region attention off (a layout alone): the global part everywhere
        self.size = size  # (height, width) of the image the masks are drawn on
        self._weights: dict[tuple, torch.Tensor] = {}
        self._told: set[tuple[int, int]] = set()

    def __deepcopy__(self, memo):
        """ModelPatcher.clone deep-copies model_options: clones share this patch (its only mutable state is a cache
        of pure results)."""
        return self

    def weights(self, n_tokens: int, latent: tuple[int, int], device: torch.device) -> torch.Tensor:
        """The region masks pooled to a layer of ``n_tokens`` tokens on a ``latent`` (height, width) grid: [R, N]."""
        key = (n_tokens, latent, device)
        if key not in self._weights:
            (h, w), (lh, lw) = self.size, latent
            if h * lw != w * lh and latent not in self._told:
                self._told.add(latent)
                logging.warning("Apply regional sampling: the regions are drawn on a %dx%d image but the latent is "
                                "%dx%d; the regions are stretched to it", w, h, lw, lh)
            self._weights[key] = token_weights(self.masks, n_tokens, aspect=latent).to(device)
        return self._weights[key]

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, extra_options: dict) -> torch.Tensor:
        from comfy.ldm.modules.attention import optimized_attention

        heads = extra_options["n_heads"]
        precision = extra_options.get("attn_precision")

        def attention(q_, k_, v_, heads_):
            return optimized_attention(q_, k_, v_, heads_, attn_precision=precision, transformer_options=extra_options)

        length = self.part_tokens
        span = (1 + self.regions) * length
        rows = _conditional_rows(extra_options, q.shape[0])
        if k.shape[1] % span or v.shape[1] != k.shape[1] or not any(rows):
            return attention(q, k, v, heads)
        shape = extra_options.get("original_shape")
        latent = (int(shape[-2]), int(shape[-1])) if shape is not None and len(shape) >= 4 else self.size
        weights = None if self.global_only else self.weights(q.shape[1], latent, q.device)

        def regional(q_, k_, v_):
            if self.global_only:
                return attention(q_, k_[:, :length], v_[:, :length], heads)
            parts_k = [k_[:, i * length:(i + 1) * length] for i in range(1 + self.regions)]
            parts_v = [v_[:, i * length:(i + 1) * length] for i in range(1 + self.regions)]
            return regional_attention(q_, parts_k[0], parts_v[0], parts_k[1:], parts_v[1:], weights, heads,
                                      attention=attention)

        if all(rows):
            return regional(q, k, v)
        cond = torch.tensor([i for i, c in enumerate(rows) if c], device=q.device)
        uncond = torch.tensor([i for i, c in enumerate(rows) if not c], device=q.device)
        a = regional(q[cond], k[cond], v[cond])
        b = attention(q[uncond], k[uncond], v[uncond], heads)
        out = torch.empty((q.shape[0], *a.shape[1:]), dtype=a.dtype, device=a.device)
        out[cond], out[uncond] = a, b.to(a.dtype)
        return out
