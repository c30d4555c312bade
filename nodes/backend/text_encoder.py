"""TextEncoder seam over a ComfyUI CLIP (SD1: clip_l; SD2: clip_h; SDXL: clip_l + clip_g with pooled output).

* Plain prompts go through ComfyUI's own ``tokenize`` → ``encode_token_weights``, so training sees exactly what
  CLIPTextEncode gives the sampler.
* With placeholders installed (Textual Inversion), prompts are tokenized around them and the learned vectors are
  put into the token lists as tensors: ComfyUI's ``process_tokens`` splices such tensors in as input embeddings,
  the same way it applies ``embedding:NAME`` files (gradients reach the vectors).
* Layer-wise placeholders (ED-LoRA, vectors [layers, n, w]): ``encode`` encodes each prompt once per
  cross-attention layer with that layer's vectors and stacks the contexts along the token axis
  (:mod:`...kernels.adapters.layerwise_context`); the pooled output is layer 0's.
* K/V tokens (CatVersion) replace the ``forward`` of the chosen ``CLIPAttention`` modules. During training this
  is done on the shared modules for the duration of the run (a :class:`Handle` undoes it); in the graph the
  loader node adds the same functions as object patches on a CLIP clone (:func:`kv_object_patches`).
* ``CLIPLayer.forward`` adds in place (``x += …``), which breaks back-propagation; a trainer that changes the text
  side gets the layers' ``forward`` replaced on its clone through object patches (:func:`clip_layer_patches`).
"""

from __future__ import annotations

import logging

import torch

from ...kernels.adapters.kv_concat import kv_concat_attention
from ...kernels.adapters.layerwise_context import stack_layer_contexts
from ...kernels.adapters.lora import TEXT_TARGETS, adapter_paths
from ...kernels.adapters.token_embeddings import add_placeholders, layer_count, splice_placeholders
from ...kernels.core.errors import UserInputError
from ...kernels.engine.seams import AdapterRoot, Conditioning, EncoderInfo, Handle, KVTokens, replace_forwards
from ...kernels.formats.lora_file import text_prefix

log = logging.getLogger(__name__)

#: text encoders inside comfy's cond_stage_model, per family
ENCODER_NAMES = {"sd1": ("clip_l", "clip_h"), "sd2": ("clip_h", "clip_l"), "sdxl": ("clip_l", "clip_g")}


def _layers(enc):
    return enc.transformer.text_model.encoder.layers


def clip_layer_forward(layer):
    """``CLIPLayer.forward`` without the in-place additions (same math), bound to one layer."""

    def forward(x, mask=None, optimized_attention=None):
        x = x + layer.self_attn(layer.layer_norm1(x), mask, optimized_attention)
        return x + layer.mlp(layer.layer_norm2(x))

    return forward


def kv_attention_forward(attn, k_c: torch.Tensor, v_c: torch.Tensor, strength: float = 1.0):
    """ComfyUI ``CLIPAttention.forward`` with learned K/V tokens concatenated (CatVersion, §3.2)."""

    def forward(x, mask=None, optimized_attention=None):
        q, k, v = attn.q_proj(x), attn.k_proj(x), attn.v_proj(x)
        kc, vc = k_c.to(x.device, x.dtype), v_c.to(x.device, x.dtype)
        return attn.out_proj(kv_concat_attention(q, k, v, kc, vc, attn.heads, mask, strength))

    return forward


def _layer_rows(vectors, layer: int):
    """A placeholder's rows for one layer: [n, w] (or a list of n rows) serve every layer; [layers, n, w] is
    indexed."""
    return vectors[layer] if torch.is_tensor(vectors) and vectors.dim() == 3 else vectors


class ComfyTextEncoder:
    def __init__(self, clip, family: str):
        self.clip = clip
        self.family = family
        csm = clip.cond_stage_model
        self.modules = {name: getattr(csm, name) for name in ENCODER_NAMES[family] if hasattr(csm, name)}
        if family != "sdxl":
            self.modules = dict(list(self.modules.items())[:1])  # SD1/SD2 have exactly one (clip_l or clip_h)
        if not self.modules:
            raise UserInputError(f"the CLIP does not match a {family} model (expected {'/'.join(ENCODER_NAMES[family])})")
        self.encoders = [self._info(name, enc) for name, enc in self.modules.items()]
        self._placeholders: dict[str, list[torch.Tensor]] = {}

    def _info(self, name: str, enc) -> EncoderInfo:
        layers = _layers(enc)
        n = len(layers)
        mode, idx = enc.options_default[0], enc.options_default[1]
        if self.clip.layer_idx is not None and abs(self.clip.layer_idx) <= n:
            mode, idx = "hidden", self.clip.layer_idx
        used = n if mode == "last" or idx is None else (idx + n + 1 if idx < 0 else idx + 1)
        width = enc.transformer.text_model.embeddings.token_embedding.weight.shape[1]
        return EncoderInfo(name, width, n, layers[0].self_attn.heads, used)

    # ------------------------------------------------------------------ tokens
    def _tokenizer(self, which: int):
        return getattr(self.clip.tokenizer, self.encoders[which].name)

    def token_ids(self, text: str, which: int = 0) -> list[int]:
        tok = self._tokenizer(which)
        ids = tok.tokenizer(text)["input_ids"]
        return ids[tok.tokens_start:-1 if tok.tokenizer_adds_end_token else None]

    def input_embeddings(self, ids: list[int], which: int = 0) -> torch.Tensor:
        table = self.modules[self.encoders[which].name].transformer.text_model.embeddings.token_embedding.weight
        return table[torch.tensor(ids, device=table.device)].detach().float().cpu().clone()

    def tokenize(self, prompt: str, layer: int = 0) -> dict:
        """ComfyUI token lists of one prompt; placeholders become their learned vectors (tensors; layer-wise ones
        those of cross-attention layer ``layer``), which ``clip.encode_from_tokens*`` splices in like
        ``embedding:NAME`` vectors."""
        if not self._placeholders:
            return self.clip.tokenize(prompt)
        out = {}
        for which, enc in enumerate(self.encoders):
            tok = self._tokenizer(which)
            rows_of = {p: _layer_rows(v[which], layer) for p, v in self._placeholders.items()}
            ids, slots = splice_placeholders(prompt, lambda t: self.token_ids(t, which),
                                             {p: len(r) for p, r in rows_of.items()},
                                             bos=tok.start_token, eos=tok.end_token, pad=tok.pad_token,
                                             max_length=tok.max_length)
            row: list = [(i, 1.0) for i in ids]
            for s in slots:
                row[s.pos] = (rows_of[s.placeholder][s.index], 1.0)
            out[enc.name[len("clip_"):]] = [row]
        return out

    def _layers(self) -> int:
        return layer_count({p: [v for v in per_encoder if torch.is_tensor(v)]
                            for p, per_encoder in self._placeholders.items()})

    # ------------------------------------------------------------------ encoding
    def encode(self, prompts: list[str]) -> Conditioning:
        csm = self.clip.cond_stage_model
        csm.reset_clip_options()
        if self.clip.layer_idx is not None:
            csm.set_clip_options({"layer": self.clip.layer_idx})
        ctx, pooled, layers = [], [], self._layers()
        for p in prompts:
            outs = [csm.encode_token_weights(self.tokenize(p, layer)) for layer in range(layers)]
            ctx.append(outs[0][0] if layers == 1 else stack_layer_contexts(torch.stack([o[0] for o in outs])))
            pooled.append(outs[0][1])
        pooled_t = torch.cat(pooled) if self.family == "sdxl" and pooled[0] is not None else None
        return Conditioning(torch.cat(ctx), pooled_t)

    def install_placeholders(self, vectors: dict[str, list[torch.Tensor]]) -> Handle:
        layer_count({p: [v for v in per_encoder if torch.is_tensor(v)]  # layer-wise sets must agree
                     for p, per_encoder in (self._placeholders | vectors).items()})
        add_placeholders(self._placeholders, vectors)
        return Handle(lambda: [self._placeholders.pop(p, None) for p in vectors])

    def install_kv_tokens(self, tokens: KVTokens, strength: float = 1.0) -> Handle:
        replacements = []
        for which, layers in tokens.items():
            enc = self.modules[self.encoders[which].name]
            for layer, (k_c, v_c) in layers.items():
                attn = _layers(enc)[layer].self_attn
                replacements.append((attn, kv_attention_forward(attn, k_c, v_c, strength)))
        return replace_forwards(replacements)

    def kv_object_patches(self, kv: dict[str, dict[int, tuple[torch.Tensor, torch.Tensor]]],
                          strength: float) -> dict:
        """Object patches (for ``clip.patcher.add_object_patch``) that put CatVersion K/V tokens on a CLIP clone."""
        patches = {}
        for name, layers in kv.items():
            enc = self.modules[name]
            for layer, (k_c, v_c) in layers.items():
                attn = _layers(enc)[layer].self_attn
                key = f"{name}.transformer.text_model.encoder.layers.{layer}.self_attn.forward"
                patches[key] = kv_attention_forward(attn, k_c, v_c, strength)
        return patches

    def clip_layer_patches(self) -> dict:
        """Non-in-place ``CLIPLayer.forward`` for every layer, keyed as ModelPatcher object patches."""
        return {f"{name}.transformer.text_model.encoder.layers.{i}.forward": clip_layer_forward(layer)
                for name, enc in self.modules.items() for i, layer in enumerate(_layers(enc))}

    # ------------------------------------------------------------------ LoRA
    def adapter_roots(self, targets: tuple[str, ...] = TEXT_TARGETS) -> list[AdapterRoot]:
        return [AdapterRoot(text_prefix(self.family, which), self.modules[enc.name].transformer,
                            adapter_paths(self.modules[enc.name].transformer, targets, "self_attn"))
                for which, enc in enumerate(self.encoders)]

    def set_gradient_checkpointing(self, on: bool) -> None:
        if on:
            log.info("gradient checkpointing is not used by the ComfyUI back end")
