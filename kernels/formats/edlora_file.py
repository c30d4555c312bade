"""ED-LoRA files (Mix-of-Show, Gu et al. 2023 §3.2): one safetensors file holding a concept's LoRA and its
layer-wise token embeddings.

* LoRA: kohya keys (:mod:`.lora_file`), so any LoRA loader reads the weight part (without the tokens the concept
  is not addressable, so use this project's loaders).
* Tokens: ``edlora_emb.<encoder>`` [layers, n, width]: for each cross-attention layer of the denoiser (forward
  order), the n input embeddings that the placeholder stands for (Mix-of-Show: n = 2, a random word and a class
  word).
* Metadata (``fsp.*``): method ``ed-lora``, base family, ``fsp.token``, ``fsp.layers`` (cross-attention layers of
  the model it was trained on), ``fsp.num_vectors``, ``fsp.encoders``, ``fsp.width.<encoder>``, LoRA rank/alpha,
  format version. Loading refuses another family or layer count, naming both.
"""

from __future__ import annotations

import torch

from ..core.errors import UserInputError
from .metadata import check_family

EMBEDDING_PREFIX = "edlora_emb."
METHOD = "ed-lora"


def edlora_tensors(lora: dict[str, torch.Tensor], vectors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """LoRA file tensors + {encoder: [layers, n, width]} → the file's tensors."""
    return {**lora, **{EMBEDDING_PREFIX + name: v.detach().float().contiguous() for name, v in vectors.items()}}


def edlora_metadata(lora_meta: dict[str, str], token: str, vectors: dict[str, torch.Tensor]) -> dict[str, str]:
    layers, n, _ = next(iter(vectors.values())).shape
    meta = {**lora_meta, "fsp.method": METHOD, "fsp.token": token, "fsp.layers": str(layers),
            "fsp.num_vectors": str(n), "fsp.encoders": ",".join(vectors)}
    meta.update({f"fsp.width.{name}": str(v.shape[-1]) for name, v in vectors.items()})
    return meta


def is_edlora(tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> bool:
    return meta.get("fsp.method") == METHOD or any(k.startswith(EMBEDDING_PREFIX) for k in tensors)


def parse_edlora(tensors: dict[str, torch.Tensor], meta: dict[str, str], widths: dict[str, int], layers: int,
                 family: str, source: str) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], str]:
    """(LoRA tensors, {encoder: [layers, n, width]}, token) of an ED-LoRA file, for a model whose text encoders
    have ``widths`` ({name: width}) and whose denoiser has ``layers`` cross-attention layers."""
    check_family(meta, family, source)
    token = meta.get("fsp.token")
    if not token:
        raise UserInputError(f"{source}: an ED-LoRA file without its token (fsp.token)")
    vectors = {k[len(EMBEDDING_PREFIX):]: v for k, v in tensors.items() if k.startswith(EMBEDDING_PREFIX)}
    missing = sorted(set(widths) - set(vectors))
    if missing:
        raise UserInputError(f"{source}: no token embeddings for text encoder {', '.join(missing)}")
    for name, width in widths.items():
        v = vectors[name]
        if v.dim() != 3:
            raise UserInputError(f"{source}: {EMBEDDING_PREFIX}{name} has shape {tuple(v.shape)}, "
                                 "expected [layers, vectors, width]")
        if v.shape[0] != layers:
            raise UserInputError(f"{source} was trained on a model with {v.shape[0]} cross-attention layers; "
                                 f"this model has {layers}")
        if v.shape[2] != width:
            raise UserInputError(f"{source}: {name} embeddings are {v.shape[2]} wide; this model's {name} is {width}")
    lora = {k: v for k, v in tensors.items() if not k.startswith(EMBEDDING_PREFIX)}
    return lora, {name: vectors[name].float() for name in widths}, token
