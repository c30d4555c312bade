"""Placeholder tokens with learned input embeddings (Textual Inversion, Gal et al. 2022, arXiv 2208.01618, §3):
a placeholder string S* in a prompt stands for n learned vectors v* that replace its token embeddings; the
rest of the text encoder is unchanged.

The vocabulary is never modified: prompts are tokenized around the placeholders, each occurrence gets n slot
positions (holding a harmless filler id), and the embedding output is overwritten at those positions. This is
what ComfyUI does with ``embedding:NAME`` and what diffusers' ``load_textual_inversion`` does with added tokens,
so all three give the same conditioning.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Slot:
    """Position ``pos`` of prompt ``row`` holds vector ``index`` of ``placeholder``."""

    row: int
    pos: int
    placeholder: str
    index: int


def splice_placeholders(prompt: str, tokenize: Callable[[str], list[int]], counts: dict[str, int], *, bos: int,
                        eos: int, pad: int, max_length: int = 77, filler: int = 0,
                        row: int = 0) -> tuple[list[int], list[Slot]]:
    """Token ids of ``prompt`` padded to ``max_length`` (bos … eos pad…), with each placeholder of ``counts``
    (placeholder → number of vectors) expanded to that many slots. Text is truncated like CLIP's tokenizer
    (the end token always stays)."""
    body: list[int] = []
    slots: list[Slot] = []
    if counts:
        pattern = "|".join(re.escape(p) for p in sorted(counts, key=len, reverse=True))
        pieces = re.split(f"({pattern})", prompt)
    else:
        pieces = [prompt]
    for piece in pieces:
        if piece in counts:
            for k in range(counts[piece]):
                slots.append(Slot(row, 1 + len(body), piece, k))
                body.append(filler)
        elif piece.strip():
            body.extend(tokenize(piece))
    body = body[: max_length - 2]
    slots = [s for s in slots if s.pos < max_length - 1]
    ids = [bos] + body + [eos]
    return ids + [pad] * (max_length - len(ids)), slots


def substitute(embeddings: torch.Tensor, slots: list[Slot], vectors: dict[str, torch.Tensor],
               rows_per_layer: int | None = None) -> torch.Tensor:
    """``embeddings`` [B, L, D] with each slot's row replaced by ``vectors[placeholder][index]`` (out of place,
    so gradients reach the vectors).

    Layer-wise placeholders (P+, Voynov et al. 2023 §4; Mix-of-Show's ED-LoRA, Gu et al. 2023 §3.2) have vectors
    [layers, n, D]: the batch then holds the prompts once per cross-attention layer (``rows_per_layer`` rows
    each), and row r takes the vectors of layer ``r // rows_per_layer``. Shared [n, D] vectors serve every layer."""
    if not slots:
        return embeddings

    def vector(s: Slot) -> torch.Tensor:
        v = vectors[s.placeholder]
        return v[s.index] if v.dim() == 2 else v[s.row // rows_per_layer, s.index]

    rows = torch.tensor([s.row for s in slots], device=embeddings.device)
    pos = torch.tensor([s.pos for s in slots], device=embeddings.device)
    values = torch.stack([vector(s) for s in slots]).to(embeddings.device, embeddings.dtype)
    return embeddings.index_put((rows, pos), values)


def layer_count(vectors: dict[str, list[torch.Tensor]]) -> int:
    """How many cross-attention layers the installed placeholders address: 1 when all are shared [n, D], else the
    common ``layers`` of the layer-wise ones [layers, n, D] (a clear error when they disagree)."""
    counts = {v.shape[0] for per_encoder in vectors.values() for v in per_encoder if v.dim() == 3}
    if len(counts) > 1:
        raise ValueError(f"layer-wise placeholders for different numbers of layers: {sorted(counts)}")
    return counts.pop() if counts else 1


def add_placeholders(installed: dict[str, list], new: dict[str, list]) -> None:
    """Add ``new`` placeholders to ``installed`` (placeholder → vectors per encoder); one can be installed once."""
    clash = sorted(set(new) & set(installed))
    if clash:
        raise ValueError(f"placeholder {clash[0]!r} is already installed")
    installed.update(new)


def filler_id(bos: int, eos: int, pad: int) -> int:
    """An id for slot positions that no CLIP pooling rule can mistake for the end token."""
    return next(i for i in range(4) if i not in (bos, eos, pad))
