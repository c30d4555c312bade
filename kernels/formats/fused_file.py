"""Fused multi-concept files (Mix-of-Show §3.3): several concepts merged into one model, kept as one safetensors file.

* The fused weights' difference from the base model as a kohya LoRA (:mod:`.lora_file`; α = rank, i.e. scale 1).
  Gradient fusion's difference (Σ ΔW_i G_i)(Σ G_i + λI)⁻¹ has rank ≤ Σ_i rank(ΔW_i), so a rank of the summed
  concept ranks stores it exactly; a lower rank is its best approximation (SVD).
* Every concept's tokens: ``concept_emb.<i>.<encoder>``, [n, width] (Textual Inversion-like) or [layers, n, width]
  (ED-LoRA's layer-wise tokens); ``fsp.tokens`` lists the tokens in index order (JSON).
* Metadata (``fsp.*``): method ``fused``, base family, ``fsp.fusion`` (gradient / sum / average), ``fsp.concepts``
  (the source files' names, JSON), rank, format version.
"""

from __future__ import annotations

import json

import torch

from ..core.errors import UserInputError

EMBEDDING_PREFIX = "concept_emb."
METHOD = "fused"


def fused_tensors(lora: dict[str, torch.Tensor], tokens: dict[str, dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """LoRA file tensors + {token: {encoder: vectors}} → the file's tensors."""
    out = dict(lora)
    for i, per_encoder in enumerate(tokens.values()):
        for name, v in per_encoder.items():
            out[f"{EMBEDDING_PREFIX}{i}.{name}"] = v.detach().float().contiguous()
    return out


def fused_metadata(lora_meta: dict[str, str], tokens: list[str], fusion: str, concepts: list[str]) -> dict[str, str]:
    return {**lora_meta, "fsp.method": METHOD, "fsp.fusion": fusion, "fsp.tokens": json.dumps(tokens),
            "fsp.concepts": json.dumps(concepts)}


def is_fused(meta: dict[str, str]) -> bool:
    return meta.get("fsp.method") == METHOD


def parse_fused(tensors: dict[str, torch.Tensor], meta: dict[str, str], source: str
                ) -> tuple[dict[str, torch.Tensor], dict[str, dict[str, torch.Tensor]]]:
    """(LoRA tensors, {token: {encoder: vectors}}) of a fused file (shapes are checked where they are installed)."""
    try:
        tokens = json.loads(meta.get("fsp.tokens", "[]"))
    except json.JSONDecodeError:
        raise UserInputError(f"{source}: fsp.tokens is not a JSON list") from None
    if not isinstance(tokens, list) or not all(isinstance(t, str) for t in tokens):
        raise UserInputError(f"{source}: fsp.tokens is not a list of tokens")
    vectors: dict[str, dict[str, torch.Tensor]] = {t: {} for t in tokens}
    for key, v in tensors.items():
        if not key.startswith(EMBEDDING_PREFIX):
            continue
        index, _, encoder = key[len(EMBEDDING_PREFIX):].partition(".")
        if not index.isdigit() or int(index) >= len(tokens) or not encoder:
            raise UserInputError(f"{source}: tensor {key} names no listed token")
        vectors[tokens[int(index)]][encoder] = v.float()
    empty = [t for t, per_encoder in vectors.items() if not per_encoder]
    if empty:
        raise UserInputError(f"{source}: no embeddings for token {empty[0]!r}")
    lora = {k: v for k, v in tensors.items() if not k.startswith(EMBEDDING_PREFIX)}
    return lora, vectors


def check_token_vectors(token: str, vectors: dict[str, torch.Tensor], widths: dict[str, int], layers: int,
                        source: str) -> None:
    """Refuse a token whose vectors do not fit the model: per text encoder (``widths``: {name: width}) shared
    [n, width] or layer-wise [layers, n, width] vectors, naming both shapes."""
    for name, width in widths.items():
        v = vectors.get(name)
        if v is None:
            raise UserInputError(f"{source}: token {token!r} has no embeddings for text encoder {name}")
        if v.dim() not in (2, 3) or v.shape[-1] != width or (v.dim() == 3 and v.shape[0] != layers):
            raise UserInputError(f"{source}: token {token!r} has {name} embeddings of shape {tuple(v.shape)}; this "
                                 f"model needs [n, {width}] or [{layers}, n, {width}]")
