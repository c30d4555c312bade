"""A concept to fuse (Mix-of-Show, Gu et al. NeurIPS 2023, §3.3), read from any file that carries LoRA weights:
ED-LoRA (layer-wise tokens), DreamBooth-LoRA (identifier words in its prompt), pivotal tuning (bundled tokens).
Backend-independent: callers pass the model's family, text-encoder widths and cross-attention layer count."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..adapters.lora import LoraWeights
from ..core.errors import UserInputError
from .edlora_file import is_edlora, parse_edlora
from .embedding_file import parse_embedding, split_bundled
from .fused_file import is_fused
from .lora_file import parse_lora_tensors
from .metadata import check_family

#: prompts a token concept is recorded on (Mix-of-Show's text-encoder fusion uses "photo of a {c}" and "{c}")
TOKEN_TEMPLATES = ("a photo of a {}", "{}")


@dataclass
class Concept:
    """One concept to fuse: its LoRA (kohya names), its tokens ({token: {encoder: [n, w] or [layers, n, w]}}) and
    the prompts its activations are recorded on."""

    source: str
    lora: dict[str, LoraWeights]
    tokens: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    prompts: list[str] = field(default_factory=list)


def _unbundle(parts: dict[str, torch.Tensor], family: str) -> dict[str, torch.Tensor]:
    """Bundled-embedding keys (per-encoder names on SDXL, one tensor otherwise) → embedding-file tensors."""
    if family == "sdxl":
        return parts
    (only,) = parts.values()
    return {"emb_params": only}


def concept_from_tensors(tensors: dict[str, torch.Tensor], meta: dict[str, str], *, family: str,
                         widths: dict[str, int], layers: int, source: str, prompt: str | None = None) -> Concept:
    """A concept from an ED-LoRA, DreamBooth-LoRA or pivotal file's tensors and metadata. ``prompt``: what to
    record it on (default: the caption it was trained on and its token alone, when the file records a caption with
    the token; else each token in Mix-of-Show's templates ("a photo of a <t>", "<t>"); else the file's instance
    prompt)."""
    check_family(meta, family, source)
    tokens: dict[str, dict[str, torch.Tensor]] = {}
    if is_fused(meta):
        raise UserInputError(f"{source} is already a fused file: fuse the concepts' own files")
    if is_edlora(tensors, meta):
        lora_t, vectors, token = parse_edlora(tensors, meta, widths, layers, family, source)
        tokens[token] = vectors
    elif any(k.endswith(".lora_down.weight") for k in tensors):
        lora_t, bundles = split_bundled(tensors)
        for name, parts in bundles.items():
            tokens[meta.get("fsp.token", f"<{name}>")] = parse_embedding(_unbundle(parts, family), meta, widths,
                                                                         family, source)
    else:
        raise UserInputError(f"{source} has no LoRA weights to fuse (ED-LoRA, DreamBooth-LoRA or pivotal files can "
                             "be fused)")
    prompt = (prompt or "").strip()
    trained_on = meta.get("fsp.instance_prompt", "")
    if prompt:
        prompts = [prompt]
    elif tokens and any(tok in trained_on for tok in tokens):  # its own caption (a vocabulary it knows), and the token
        prompts = [trained_on, *tokens]
    elif tokens:
        prompts = [t.format(tok) for tok in tokens for t in TOKEN_TEMPLATES]
    elif meta.get("fsp.instance_prompt"):
        prompts = [meta["fsp.instance_prompt"]]
    else:
        raise UserInputError(f"{source}: the file records no instance prompt; say what the concept is called "
                             f"(e.g. {Path(source).name}=\"a sks dog\")")
    return Concept(source, parse_lora_tensors(lora_t, source), tokens, prompts)


def check_distinct_tokens(concepts: list[Concept]) -> None:
    """Refuse two concepts with the same token, naming both."""
    seen: dict[str, str] = {}
    for c in concepts:
        for t in c.tokens:
            if t in seen:
                raise UserInputError(f"{seen[t]} and {c.source} both use the token {t!r}: concepts need distinct "
                                     "tokens")
            seen[t] = c.source
