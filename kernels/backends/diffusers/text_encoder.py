"""TextEncoder seam over a diffusers pipeline: one CLIP text encoder (SD1/SD2) or two (SDXL), encoded as the
pipelines' own ``encode_prompt`` does (SD1/SD2: last hidden state; SDXL: the penultimate hidden states of both
encoders concatenated, pooled output of the second), so what is trained is what the pipeline samples with.

Placeholder embeddings are a forward hook on each encoder's token-embedding table (:mod:`...adapters.token_embeddings`);
with layer-wise placeholders installed (ED-LoRA) every prompt is encoded once per cross-attention layer and the
contexts come stacked along the token axis (:mod:`...adapters.layerwise_context`), the pooled output from layer 0's copy;
K/V tokens replace the ``forward`` of the chosen self-attention modules on the instance (:mod:`...adapters.kv_concat`).
Both come with a :class:`Handle` that removes them.
"""

from __future__ import annotations

import torch

from ...adapters.kv_concat import causal_mask, kv_concat_attention
from ...adapters.layerwise_context import stack_layer_contexts
from ...adapters.lora import TEXT_TARGETS, adapter_paths
from ...adapters.token_embeddings import (Slot, add_placeholders, filler_id, layer_count, splice_placeholders,
                                          substitute)
from ...engine.seams import AdapterRoot, Conditioning, EncoderInfo, Handle, KVTokens, replace_forwards
from ...formats.lora_file import text_prefix
from .pipeline import detect_family, text_transformer

ENCODER_NAMES = {"sd1": ("clip_l",), "sd2": ("clip_h",), "sdxl": ("clip_l", "clip_g")}


class DiffusersTextEncoder:
    def __init__(self, pipe, family: str | None = None):
        self.family = family or detect_family(pipe)
        xl = self.family == "sdxl"
        self.tokenizers = [pipe.tokenizer] + ([pipe.tokenizer_2] if xl else [])
        self.models = [pipe.text_encoder] + ([pipe.text_encoder_2] if xl else [])
        self.encoders = []
        for name, model in zip(ENCODER_NAMES[self.family], self.models):
            c = model.config
            self.encoders.append(EncoderInfo(name, c.hidden_size, c.num_hidden_layers, c.num_attention_heads,
                                             c.num_hidden_layers - 1 if xl else c.num_hidden_layers))
        self._placeholders: dict[str, list[torch.Tensor]] = {}
        self._pending: list[list[Slot]] = [[] for _ in self.models]
        self._rows_per_layer = 1

    # ------------------------------------------------------------------ tokens
    def token_ids(self, text: str, which: int = 0) -> list[int]:
        return self.tokenizers[which](text, add_special_tokens=False).input_ids

    def input_embeddings(self, ids: list[int], which: int = 0) -> torch.Tensor:
        table = text_transformer(self.models[which]).embeddings.token_embedding.weight
        return table[torch.tensor(ids, device=table.device)].detach().float().cpu().clone()

    def _padded_ids(self, prompts: list[str], which: int) -> torch.Tensor:
        tok = self.tokenizers[which]
        if not self._placeholders:
            return tok(prompts, padding="max_length", max_length=tok.model_max_length, truncation=True,
                       return_tensors="pt").input_ids
        bos, eos = tok.bos_token_id, tok.eos_token_id
        pad = tok.pad_token_id if tok.pad_token_id is not None else eos
        counts = {p: v[which].shape[-2] for p, v in self._placeholders.items()}  # [n, D] or [layers, n, D]
        rows, slots = [], []
        for i, prompt in enumerate(prompts):
            ids, s = splice_placeholders(prompt, lambda t: self.token_ids(t, which), counts, bos=bos, eos=eos,
                                         pad=pad, max_length=tok.model_max_length, filler=filler_id(bos, eos, pad), row=i)
            rows.append(ids)
            slots += s
        self._pending[which] = slots
        return torch.tensor(rows)

    # ------------------------------------------------------------------ encoding
    def encode(self, prompts: list[str]) -> Conditioning:
        layers, b = layer_count(self._placeholders), len(prompts)
        rows = prompts * layers  # layer-major: rows l·B … (l+1)·B−1 carry layer l's vectors
        self._rows_per_layer = b
        try:
            if self.family != "sdxl":
                model = self.models[0]
                context, pooled = model(self._padded_ids(rows, 0).to(model.device))[0], None
            else:
                hidden = []
                for i, model in enumerate(self.models):
                    out = model(self._padded_ids(rows, i).to(model.device), output_hidden_states=True)
                    hidden.append(out.hidden_states[-2])
                    pooled = out[0][:b]  # the last encoder's projected pooled output (text_embeds)
                context = torch.cat(hidden, dim=-1)
        finally:
            self._pending = [[] for _ in self.models]
        if layers > 1:
            context = stack_layer_contexts(context.view(layers, b, *context.shape[1:]))
        return Conditioning(context, pooled)

    def install_placeholders(self, vectors: dict[str, list[torch.Tensor]]) -> Handle:
        layer_count(self._placeholders | vectors)  # layer-wise sets must agree on the layer count
        add_placeholders(self._placeholders, vectors)
        hooks = []
        for which, model in enumerate(self.models):
            def hook(module, inputs, output, which=which):  # this install's placeholders only
                slots = [s for s in self._pending[which] if s.placeholder in vectors]
                return substitute(output, slots, {p: v[which] for p, v in vectors.items()}, self._rows_per_layer)

            hooks.append(text_transformer(model).embeddings.token_embedding.register_forward_hook(hook))

        def undo():
            for h in hooks:
                h.remove()
            for p in vectors:
                self._placeholders.pop(p, None)

        return Handle(undo)

    def install_kv_tokens(self, tokens: KVTokens, strength: float = 1.0) -> Handle:
        replacements = []
        for which, layers in tokens.items():
            body = text_transformer(self.models[which])
            for layer, (k_c, v_c) in layers.items():
                attn = body.encoder.layers[layer].self_attn
                replacements.append((attn, _kv_forward(attn, k_c, v_c, strength)))
        return replace_forwards(replacements)

    # ------------------------------------------------------------------ LoRA
    def adapter_roots(self, targets: tuple[str, ...] = TEXT_TARGETS) -> list[AdapterRoot]:
        roots = []
        for which, model in enumerate(self.models):
            body = text_transformer(model)
            roots.append(AdapterRoot(text_prefix(self.family, which) + "text_model_", body,
                                     adapter_paths(body, targets, within="self_attn")))
        return roots

    def set_gradient_checkpointing(self, on: bool) -> None:
        for m in self.models:
            if on:
                m.gradient_checkpointing_enable()
            else:
                m.gradient_checkpointing_disable()


def _kv_forward(attn, k_c: torch.Tensor, v_c: torch.Tensor, strength: float):
    """``CLIPAttention.forward`` with learned K/V tokens concatenated (same projections, heads and scale)."""

    def forward(hidden_states, attention_mask=None, **kwargs):
        q, k, v = attn.q_proj(hidden_states), attn.k_proj(hidden_states), attn.v_proj(hidden_states)
        mask = attention_mask
        if mask is None:
            mask = causal_mask(hidden_states.shape[1], hidden_states.dtype, hidden_states.device)
        out = kv_concat_attention(q, k, v, k_c, v_c, attn.num_heads, mask, strength, scale=attn.scale)
        return attn.out_proj(out), None

    return forward
