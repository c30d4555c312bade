"""ED-LoRA's layer-wise tokens (Mix-of-Show §3.2) on ComfyUI objects, for the stock CLIPTextEncode → KSampler path.

* CLIP (a clone): a tokenizer wrapper splices the token's layer-0 vectors into the token lists (as tensors, the
  way ComfyUI applies ``embedding:NAME``) when a prompt contains the token, and an object patch on
  ``encode_token_weights`` encodes such token lists once per cross-attention layer, with that layer's vectors in
  place of the layer-0 ones, returning the per-layer contexts stacked along the token axis ([B, layers·77, D];
  :mod:`...kernels.adapters.layerwise_context`). Prompts without the token pass through ComfyUI's own tokenizer
  (prompt weights included) and are encoded once.
* MODEL (a clone): an ``attn2_patch`` gives each cross-attention layer its own slice of a stacked context, the
  layer found from ComfyUI's ``block`` / ``block_index`` in forward order (input, middle, output blocks). Contexts
  of any other length (the negative prompt, ComfyUI's repeats of it to a common length) pass unchanged or slice to
  the same tokens.
"""

from __future__ import annotations

import torch

from ...kernels.adapters.layerwise_context import layer_context
from .text_encoder import ComfyTextEncoder

TOKENS = 77


def cross_attention_order(model) -> list[tuple[str, int, int]]:
    """(block name, block id, transformer index) of every cross-attention layer of a ComfyUI UNet, in forward order."""
    dm = model.model.diffusion_model
    order = []
    groups = [("input", enumerate(dm.input_blocks)), ("middle", [(0, dm.middle_block)]),
              ("output", enumerate(dm.output_blocks))]
    for name, blocks in groups:
        for block_id, block in blocks:
            for module in block:
                for i, tb in enumerate(getattr(module, "transformer_blocks", [])):
                    if getattr(tb, "attn2", None) is not None:
                        order.append((name, block_id, i))
    return order


def layerwise_context_patch(order: list[tuple[str, int, int]], tokens: int = TOKENS):
    """An ``attn2_patch``: layer i's slice of a stacked context (and of the value context with it)."""
    index = {key: i for i, key in enumerate(order)}
    layers = len(order)

    def patch(n, context, value, extra_options):
        block = extra_options.get("block")
        i = index.get((block[0], block[1], extra_options.get("block_index", 0))) if block is not None else None
        if i is None:
            return n, context, value
        return n, layer_context(context, i, layers, tokens), layer_context(value, i, layers, tokens)

    patch.fsp_layerwise_routing = True  # found by Apply regional sampling
    return patch


class LayerwiseTokenizer:
    """``clip.tokenizer`` of a clone that knows layer-wise tokens; everything else is the wrapped tokenizer's."""

    def __init__(self, inner, engine: ComfyTextEncoder, tokens: list[str]):
        self._inner, self._engine, self._tokens = inner, engine, tokens

    def tokenize_with_weights(self, text: str, return_word_ids: bool = False, **kwargs):
        if not any(t in text for t in self._tokens):
            return self._inner.tokenize_with_weights(text, return_word_ids, **kwargs)
        out = self._engine.tokenize(text)
        if return_word_ids:
            out = {k: [[(tok, w, 0) for tok, w in row] for row in rows] for k, rows in out.items()}
        return out

    def __getattr__(self, name):
        return getattr(self._inner, name)


def layerwise_clip(clip, family: str, vectors: dict[str, dict[str, torch.Tensor]]):
    """A clone of ``clip`` that encodes prompts with the given layer-wise tokens ({token: {encoder: [layers, n, w]}})."""
    out = clip.clone()
    engine = ComfyTextEncoder(out, family)
    names = [e.name for e in engine.encoders]
    # layer 0's vectors as row objects: the token lists hold these very objects, so they are found by identity
    rows = {t: [list(v[name][0].float()) for name in names] for t, v in vectors.items()}
    engine.install_placeholders(rows)
    marks = {id(row): (t, which, k) for t, per_encoder in rows.items() for which, r in enumerate(per_encoder)
             for k, row in enumerate(r)}
    layers = next(iter(next(iter(vectors.values())).values())).shape[0]
    original = out.patcher.get_model_object("encode_token_weights")

    def encode_token_weights(token_weight_pairs):
        if not _has_marks(token_weight_pairs, marks):
            return original(token_weight_pairs)
        outs = [original(_with_layer(token_weight_pairs, marks, vectors, names, layer)) for layer in range(layers)]
        return (torch.cat([o[0] for o in outs], dim=1), *outs[0][1:])

    out.patcher.add_object_patch("encode_token_weights", encode_token_weights)
    out.tokenizer = LayerwiseTokenizer(clip.tokenizer, engine, list(vectors))
    return out


def _entries(pairs):
    """Every (token, weight…) entry of ComfyUI token lists ({name: [[entry, …], …]} or [[entry, …], …])."""
    if isinstance(pairs, dict):
        for rows in pairs.values():
            yield from _entries(rows)
        return
    for row in pairs:
        yield from row


def _has_marks(pairs, marks) -> bool:
    return any(id(e[0]) in marks for e in _entries(pairs))


def _with_layer(pairs, marks, vectors, names, layer):
    """The token lists with every marked vector replaced by the same token's vector of ``layer``."""
    def swap(entry):
        mark = marks.get(id(entry[0]))
        if mark is None:
            return entry
        token, which, k = mark
        return (vectors[token][names[which]][layer, k], *entry[1:])

    if isinstance(pairs, dict):
        return {key: [[swap(e) for e in row] for row in rows] for key, rows in pairs.items()}
    return [[swap(e) for e in row] for row in pairs]


def apply_layerwise_file(model, clip, tensors: dict[str, torch.Tensor], meta: dict[str, str], strength_model: float,
                         strength_clip: float, source: str):
    """(MODEL, CLIP) clones carrying an ED-LoRA or fused-concepts file: its LoRA as weight patches, its tokens on the
    CLIP, the per-layer context routing on the MODEL. Refuses other kinds, families and layer counts, naming both."""
    from ...kernels.core.errors import UserInputError
    from ...kernels.formats.edlora_file import is_edlora, parse_edlora
    from ...kernels.formats.fused_file import is_fused, parse_fused
    from .adapter import adapter_from_file_tensors, apply_adapter
    from .families import clip_family, model_family

    family = model_family(model)
    if clip_family(clip) != family:
        raise UserInputError(f"the CLIP is {clip_family(clip)}, the MODEL {family}: connect the pair from one checkpoint")
    order = cross_attention_order(model)
    engine = ComfyTextEncoder(clip, family)
    widths = {e.name: e.width for e in engine.encoders}
    if is_fused(meta):
        lora, tokens = parse_fused(tensors, meta, source)
    elif is_edlora(tensors, meta):
        lora, vectors, token = parse_edlora(tensors, meta, widths, len(order), family, source)
        tokens = {token: vectors}
    else:
        raise UserInputError(f"{source} is neither an ED-LoRA nor a fused-concepts file (use Apply adapter or the "
                             "stock LoraLoader for plain LoRAs)")
    vectors = layerwise_vectors(tokens, widths, len(order), source)  # checked before any patching
    m, c = apply_adapter(model, clip, adapter_from_file_tensors(lora, meta, source), strength_model, strength_clip,
                         family, source)
    return with_tokens(m, c, family, vectors, order)


def layerwise_vectors(tokens: dict[str, dict[str, torch.Tensor]], widths: dict[str, int], layers: int,
                      source: str) -> dict[str, dict[str, torch.Tensor]]:
    """Every token's vectors as [layers, n, w] (shared [n, w] vectors repeated in every layer), checked against the
    model (``widths``: {encoder: width})."""
    from ...kernels.formats.fused_file import check_token_vectors

    out = {}
    for token, per_encoder in tokens.items():
        check_token_vectors(token, per_encoder, widths, layers, source)
        out[token] = {name: v if v.dim() == 3 else v.unsqueeze(0).repeat(layers, 1, 1)
                      for name, v in per_encoder.items() if name in widths}
    return out


def with_tokens(model, clip, family: str, tokens: dict[str, dict[str, torch.Tensor]], order):
    """(MODEL, CLIP) with layer-wise tokens on a CLIP clone and the per-layer context routing on a MODEL clone; both
    as given when there are no tokens (fused DreamBooth-LoRAs: identifier words)."""
    if not tokens:
        return model, clip
    m = model.clone()
    m.set_model_attn2_patch(layerwise_context_patch(order))
    return m, layerwise_clip(clip, family, tokens)
