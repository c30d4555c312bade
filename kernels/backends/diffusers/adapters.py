"""This project's adapter files on a diffusers pipeline.

* LoRA files are merged into the weights (ΔW = s·α/r·up@down; the original weights are kept, so ``remove()``
  restores them exactly); embeddings bundled in them (pivotal tuning) are installed as placeholders.
* Textual Inversion files become placeholder tokens of the pipeline's text encoder(s).
* CatVersion files add K/V tokens to the text encoders' self-attention for the prompt only: the negative
  (unconditional) branch is encoded without them (CatVersion §3.2).
* ED-LoRA files merge their LoRA and install their layer-wise tokens: prompts are then encoded once per
  cross-attention layer and a router on the UNet hands each layer its own context (Mix-of-Show §3.2).
* Fused files (several concepts, Mix-of-Show §3.3) merge their weight difference and install every concept's tokens.
With placeholders or K/V tokens on a pipeline, prompts are encoded by :class:`PipelineAdapters` and handed to the
pipeline as embeddings (:func:`.generate.generate_images` does this).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from ...adapters.lora import ADAPTABLE_LAYERS, merge_lora
from ...core.errors import UserInputError
from ...engine.seams import Conditioning, Handle
from ...formats.catversion_file import parse_catversion
from ...formats.edlora_file import is_edlora, parse_edlora
from ...formats.embedding_file import parse_embedding, split_bundled
from ...formats.fused_file import check_token_vectors, is_fused, parse_fused
from ...formats.lora_file import from_kohya, parse_lora_tensors, text_prefix
from ...formats.metadata import check_family
from ...formats.safetensors_io import load_safetensors
from ...methods.textual_inversion import check_placeholder
from .denoiser import DiffusersDenoiser
from .pipeline import detect_family, text_transformer
from .text_encoder import DiffusersTextEncoder


def adapter_modules(pipe) -> dict[str, torch.nn.Module]:
    """Kohya prefix → module tree, for this pipeline's family."""
    family = detect_family(pipe)
    encoders = [pipe.text_encoder] + ([pipe.text_encoder_2] if family == "sdxl" else [])
    out = {"lora_unet_": pipe.unet}
    for which, model in enumerate(encoders):
        out[text_prefix(family, which) + "text_model_"] = text_transformer(model)
    return out


def merge_lora_tensors(pipe, tensors: dict[str, torch.Tensor], source: str, strength: float = 1.0,
                       text_strength: float | None = None) -> int:
    """Merge kohya LoRA tensors into the pipeline's UNet and text encoder(s); returns the number of layers.
    Refuses layers this model does not have."""
    weights = parse_lora_tensors(tensors, source)
    count = 0
    for prefix, module in adapter_modules(pipe).items():
        paths = [n for n, m in module.named_modules() if isinstance(m, ADAPTABLE_LAYERS)]
        mapped = from_kohya(weights, prefix, paths)
        s = strength if prefix == "lora_unet_" or text_strength is None else text_strength
        try:
            merge_lora(module, mapped, s)
        except RuntimeError as e:
            raise UserInputError(f"{source}: layer shapes do not fit this model ({e})") from None
        count += len(mapped)
    known = sum(1 for k in weights if k.startswith(("lora_unet_", "lora_te")))
    if known != len(weights) or count == 0:
        raise UserInputError(f"{source}: {len(weights) - count} of {len(weights)} layers were not recognised")
    return count


def apply_lora_file(pipe, path: str | os.PathLike, strength: float = 1.0,
                    text_strength: float | None = None) -> int:
    """Merge a kohya LoRA file (any bundled embeddings are ignored here; see :class:`PipelineAdapters`)."""
    tensors, meta = load_safetensors(path)
    check_family(meta, detect_family(pipe), str(path))
    lora, _ = split_bundled(tensors)
    return merge_lora_tensors(pipe, lora, str(path), strength, text_strength)


def adapter_kind(tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> str:
    """``lora`` (kohya keys, maybe with bundled embeddings), ``embedding``, ``catversion``, ``ed-lora`` or ``fused``,
    from the file."""
    method = meta.get("fsp.method")
    if method == "catversion":
        return "catversion"
    if is_fused(meta):
        return "fused"
    if is_edlora(tensors, meta):
        return "ed-lora"
    if any(k.endswith(".lora_down.weight") for k in tensors):
        return "lora"
    if method == "textual-inversion" or len(tensors) <= 2:
        return "embedding"
    raise UserInputError("not a LoRA, Textual Inversion, CatVersion or ED-LoRA file of a known layout")


class PipelineAdapters:
    """Adapters on a pipeline that act through prompt encoding: placeholder tokens (Textual Inversion) and
    CatVersion K/V tokens (positive prompt only)."""

    def __init__(self, pipe):
        self.pipe = pipe
        self.text = DiffusersTextEncoder(pipe)
        self.family = self.text.family
        self.kv: list[tuple[dict, float]] = []
        self.handles: list[Handle] = []
        self.tokens: list[str] = []
        self._saved: dict[torch.nn.Module, torch.Tensor] = {}
        self._routed = False

    @property
    def active(self) -> bool:
        return bool(self.kv or self.tokens)

    def encoder_widths(self) -> dict[str, int]:
        return {e.name: e.width for e in self.text.encoders}

    def add_embedding(self, token: str, vectors: dict[str, torch.Tensor], source: str) -> None:
        try:
            check_placeholder(self.text, token)
        except UserInputError as e:
            raise UserInputError(f"{source}: {e}") from None
        if token in self.tokens:
            raise UserInputError(f"{source}: token {token!r} is already in use by another embedding")
        self.handles.append(self.text.install_placeholders({token: [vectors[e.name] for e in self.text.encoders]}))
        self.tokens.append(token)

    def add_layerwise_embedding(self, token: str, vectors: dict[str, torch.Tensor], source: str) -> None:
        """Layer-wise tokens (ED-LoRA): the placeholder, plus (once) the router of stacked contexts on the UNet."""
        if not self._routed:
            with torch.no_grad():
                tokens = self.text.encode([""]).context.shape[1]
            self.handles.append(DiffusersDenoiser(self.pipe).install_layerwise_context(tokens))
            self._routed = True
        self.add_embedding(token, vectors, source)

    def add_tokens(self, token: str, vectors: dict[str, torch.Tensor], source: str) -> None:
        """A placeholder of either kind: shared [n, width] or layer-wise [layers, n, width] vectors per encoder."""
        layers = DiffusersDenoiser(self.pipe).cross_attention_layers()
        check_token_vectors(token, vectors, self.encoder_widths(), layers, source)
        if next(iter(vectors.values())).dim() == 3:
            self.add_layerwise_embedding(token, vectors, source)
        else:
            self.add_embedding(token, vectors, source)

    def add_catversion(self, kv: dict, strength: float) -> None:
        index = {e.name: i for i, e in enumerate(self.text.encoders)}
        self.kv.append(({index[enc]: layers for enc, layers in kv.items()}, strength))

    def load(self, path: str | os.PathLike, strength: float = 1.0) -> str:
        """Apply one adapter file of any kind; returns its kind."""
        tensors, meta = load_safetensors(path)
        return self.apply(tensors, meta, str(path), strength, default_token=f"<{Path(path).stem}>")

    def apply(self, tensors: dict[str, torch.Tensor], meta: dict[str, str], source: str, strength: float = 1.0,
              default_token: str = "<concept>") -> str:
        """Apply an adapter given as file tensors + metadata (from a file, or a method's in-memory export)."""
        check_family(meta, self.family, source)
        kind = adapter_kind(tensors, meta)
        if kind == "lora":
            lora, bundles = split_bundled(tensors)
            self._merge(lora, source, strength)
            for name, parts in bundles.items():
                vectors = parse_embedding(unbundle(parts, self.family), meta, self.encoder_widths(), self.family, source)
                self.add_embedding(meta.get("fsp.token", f"<{name}>"), vectors, source)
        elif kind == "ed-lora":
            layers = DiffusersDenoiser(self.pipe).cross_attention_layers()
            lora, vectors, token = parse_edlora(tensors, meta, self.encoder_widths(), layers, self.family, source)
            self._merge(lora, source, strength)
            self.add_layerwise_embedding(token, vectors, source)
        elif kind == "fused":
            lora, tokens = parse_fused(tensors, meta, source)
            self._merge(lora, source, strength)
            for token, vectors in tokens.items():
                self.add_tokens(token, vectors, source)
        elif kind == "embedding":
            vectors = parse_embedding(tensors, meta, self.encoder_widths(), self.family, source)
            self.add_embedding(meta.get("fsp.token") or default_token, vectors, source)
        else:
            widths = {e.name: (e.width, e.num_layers) for e in self.text.encoders}
            self.add_catversion(parse_catversion(tensors, meta, widths, self.family, source), strength)
        return kind

    def _merge(self, lora: dict[str, torch.Tensor], source: str, strength: float) -> None:
        """Merge LoRA weights, keeping the original weights of every touched layer so :meth:`remove` restores
        them exactly."""
        modules = {prefix: dict(m.named_modules()) for prefix, m in adapter_modules(self.pipe).items()}
        names = {k.rsplit(".lora_", 1)[0] for k in lora if ".lora_" in k}
        for prefix, mods in modules.items():
            for path, m in mods.items():
                if isinstance(m, ADAPTABLE_LAYERS) and prefix + path.replace(".", "_") in names and m not in self._saved:
                    self._saved[m] = m.weight.detach().clone()
        merge_lora_tensors(self.pipe, lora, source, strength)

    def encode(self, prompts: list[str], with_kv: bool) -> Conditioning:
        handles = [self.text.install_kv_tokens(kv, s) for kv, s in self.kv] if with_kv else []
        try:
            with torch.no_grad():
                return self.text.encode(prompts)
        finally:
            for h in handles:
                h.remove()

    def pipeline_kwargs(self, prompt: str, negative: str | None, k: int) -> dict:
        """``prompt_embeds`` and ``negative_prompt_embeds`` (+ pooled on SDXL) for ``k`` images."""
        pos = self.encode([prompt] * k, with_kv=True)
        zeros = negative is None and getattr(self.pipe.config, "force_zeros_for_empty_prompt", False)
        neg = self.encode([negative or ""] * k, with_kv=False)
        if zeros:
            neg = Conditioning(torch.zeros_like(neg.context), None if neg.pooled is None else torch.zeros_like(neg.pooled))
        out = {"prompt_embeds": pos.context, "negative_prompt_embeds": neg.context}
        if pos.pooled is not None:
            out.update(pooled_prompt_embeds=pos.pooled, negative_pooled_prompt_embeds=neg.pooled)
        return out

    def remove(self) -> None:
        """Undo everything: placeholders, K/V tokens, and merged LoRA weights (restored bit-exactly)."""
        for h in reversed(self.handles):
            h.remove()
        with torch.no_grad():
            for m, w in self._saved.items():
                m.weight.copy_(w)
        self.handles, self.tokens, self.kv, self._saved, self._routed = [], [], [], {}, False


def unbundle(parts: dict[str, torch.Tensor], family: str) -> dict[str, torch.Tensor]:
    """Bundled-embedding keys (``string_to_param.*`` or per-encoder names) → embedding-file tensors."""
    if family == "sdxl":
        return parts
    (only,) = parts.values()
    return {"emb_params": only}
