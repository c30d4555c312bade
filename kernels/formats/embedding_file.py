"""Textual Inversion files that ComfyUI's ``embedding:NAME`` prompt syntax and diffusers'
``load_textual_inversion`` both read.

* SD1.x / SD2.x: one tensor ``emb_params`` [n, width] (ComfyUI takes the file's only tensor; diffusers reads
  ``emb_params``).
* SDXL: ``clip_l`` [n, 768-ish] and ``clip_g`` [n, 1280-ish], one per text encoder (ComfyUI picks the key of
  each encoder; in diffusers, load each key into its encoder: ``load_textual_inversion(sd["clip_g"], token=…,
  text_encoder=pipe.text_encoder_2, tokenizer=pipe.tokenizer_2)``).

Metadata: ``fsp.*`` (:mod:`.metadata`) with ``fsp.token``, ``fsp.num_vectors``, ``fsp.encoders`` and
``fsp.width.<encoder>``. Inside a LoRA file (pivotal tuning) the same vectors go under A1111's bundled-embedding
keys ``bundle_emb.<name>.string_to_param.*`` (SD1/SD2) or ``bundle_emb.<name>.clip_l`` / ``.clip_g`` (SDXL),
which ComfyUI's embedding loader also understands.
"""

from __future__ import annotations

import os
import re

import torch

from ..core.errors import UserInputError
from .metadata import check_family, fsp_metadata
from .safetensors_io import atomic_save, load_safetensors

SINGLE_KEY = "emb_params"


def embedding_tensors(vectors: dict[str, torch.Tensor], family: str) -> dict[str, torch.Tensor]:
    """{encoder name: [n, width]} → the file's tensors (``emb_params`` for one encoder, per-encoder keys on SDXL)."""
    if family != "sdxl":
        (only,) = vectors.values()
        return {SINGLE_KEY: only.detach().float().contiguous()}
    return {name: v.detach().float().contiguous() for name, v in vectors.items()}


def embedding_metadata(*, family: str, token: str, vectors: dict[str, torch.Tensor], steps: int, method: str,
                       **fields) -> dict[str, str]:
    n = next(iter(vectors.values())).shape[0]
    meta = fsp_metadata(method=method, family=family, steps=steps, token=token, num_vectors=n,
                        encoders=",".join(vectors), **fields)
    meta.update({f"fsp.width.{name}": str(v.shape[-1]) for name, v in vectors.items()})
    return meta


def save_embedding_file(path: str | os.PathLike, vectors: dict[str, torch.Tensor], metadata: dict[str, str],
                        family: str, overwrite: bool = False):
    return atomic_save(embedding_tensors(vectors, family), path, metadata, overwrite=overwrite)


def parse_embedding(tensors: dict[str, torch.Tensor], meta: dict[str, str], encoders: dict[str, int],
                    family: str, source: str) -> dict[str, torch.Tensor]:
    """{encoder name: [n, width]} for a model whose encoders have the given widths ({name: width}).

    Reads our files and the usual single-tensor ones (``emb_params``, ``string_to_param.*``, a lone tensor).
    Refuses a file for another family, a width that does not fit, or no vectors at all, naming both sides.
    """
    check_family(meta, family, source)
    out: dict[str, torch.Tensor] = {}
    if all(name in tensors for name in encoders):
        out = {name: tensors[name] for name in encoders}
    elif len(encoders) == 1:
        candidates = [v for k, v in tensors.items() if k == SINGLE_KEY or k.startswith("string_to_param")] \
            or list(tensors.values())
        if len(candidates) != 1:
            raise UserInputError(f"{source}: expected one embedding tensor, found {len(tensors)} ({', '.join(list(tensors)[:4])})")
        out = {next(iter(encoders)): candidates[0]}
    else:
        missing = [n for n in encoders if n not in tensors]
        raise UserInputError(f"{source} has no vectors for {', '.join(missing)} (keys: {', '.join(list(tensors)[:4])}); "
                             f"a {family} embedding needs one per text encoder")
    for name, v in out.items():
        v = v.reshape(-1, v.shape[-1]) if v.ndim != 2 else v
        if v.shape[-1] != encoders[name]:
            raise UserInputError(f"{source}: its {name} vectors are {v.shape[-1]} wide but this model's {name} "
                                 f"encoder is {encoders[name]} wide (made for another model)")
        if v.shape[0] == 0:
            raise UserInputError(f"{source}: the embedding has no vectors")
        out[name] = v.float()
    return out


def load_embedding_file(path, encoders: dict[str, int], family: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    tensors, meta = load_safetensors(path)
    return parse_embedding(tensors, meta, encoders, family, str(path)), meta


def bundle_name(token: str) -> str:
    """A file-safe name for bundled embeddings (``<sks>`` → ``sks``)."""
    name = re.sub(r"[^A-Za-z0-9_-]+", "", token)
    return name or "concept"


def bundled_tensors(name: str, vectors: dict[str, torch.Tensor], family: str) -> dict[str, torch.Tensor]:
    """A1111-style bundled-embedding keys for a LoRA file (pivotal tuning)."""
    if family != "sdxl":
        (only,) = vectors.values()
        return {f"bundle_emb.{name}.string_to_param.*": only.detach().float().contiguous()}
    return {f"bundle_emb.{name}.{enc}": v.detach().float().contiguous() for enc, v in vectors.items()}


def split_bundled(tensors: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, dict[str, torch.Tensor]]]:
    """(LoRA tensors, {bundle name: {key suffix: tensor}}) of a LoRA file that may bundle embeddings."""
    lora, bundles = {}, {}
    for k, v in tensors.items():
        if k.startswith("bundle_emb."):
            name, _, key = k[len("bundle_emb."):].partition(".")
            bundles.setdefault(name, {})[key] = v
        else:
            lora[k] = v
    return lora, bundles
