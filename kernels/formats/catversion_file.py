"""CatVersion adapter files (this project's own layout; documented in README "Files").

Tensors: ``<encoder>.<layer>.k`` and ``<encoder>.<layer>.v`` [n, width] for each adapted self-attention layer
(layer indices count from 0 at the encoder's first layer; encoders ``clip_l`` / ``clip_h`` / ``clip_g``).
Metadata: ``fsp.*`` (:mod:`.metadata`) with ``fsp.catversion_version``, ``fsp.encoders``, ``fsp.tokens`` and per
encoder ``fsp.layers.<enc>`` (comma-separated), ``fsp.width.<enc>`` and ``fsp.num_layers.<enc>``.
Loading checks all of them against the model and refuses with a message naming both sides.
"""

from __future__ import annotations

import os

import torch

from ..core.errors import UserInputError
from .metadata import check_family, fsp_metadata
from .safetensors_io import atomic_save, load_safetensors

CATVERSION_VERSION = "1"

#: {encoder name: {layer: (k [n, D], v [n, D])}}
KV = dict[str, dict[int, tuple[torch.Tensor, torch.Tensor]]]


def catversion_tensors(kv: KV) -> dict[str, torch.Tensor]:
    out = {}
    for enc, layers in kv.items():
        for layer, (k, v) in sorted(layers.items()):
            out[f"{enc}.{layer}.k"] = k.detach().float().contiguous()
            out[f"{enc}.{layer}.v"] = v.detach().float().contiguous()
    return out


def catversion_metadata(*, family: str, kv: KV, num_layers: dict[str, int], steps: int, **fields) -> dict[str, str]:
    tokens = {k.shape[0] for layers in kv.values() for k, _ in layers.values()}
    meta = fsp_metadata(method="catversion", family=family, steps=steps, catversion_version=CATVERSION_VERSION,
                        encoders=",".join(kv), tokens=max(tokens), **fields)
    for enc, layers in kv.items():
        meta[f"fsp.layers.{enc}"] = ",".join(str(i) for i in sorted(layers))
        meta[f"fsp.width.{enc}"] = str(next(iter(layers.values()))[0].shape[-1])
        meta[f"fsp.num_layers.{enc}"] = str(num_layers[enc])
    return meta


def save_catversion_file(path: str | os.PathLike, kv: KV, metadata: dict[str, str], overwrite: bool = False):
    return atomic_save(catversion_tensors(kv), path, metadata, overwrite=overwrite)


def parse_catversion(tensors: dict[str, torch.Tensor], meta: dict[str, str], encoders: dict[str, tuple[int, int]],
                     family: str, source: str) -> KV:
    """The K/V tokens of a CatVersion file for a model whose encoders are {name: (width, number of layers)}.

    Refuses a file that is not a CatVersion adapter, one for another family, an encoder the model lacks, a width
    that differs, or layer indices beyond the model."""
    if meta.get("fsp.method") != "catversion" or "fsp.catversion_version" not in meta:
        raise UserInputError(f"{source} is not a CatVersion adapter (its metadata has no fsp.method=catversion)")
    if meta["fsp.catversion_version"] != CATVERSION_VERSION:
        raise UserInputError(f"{source} is CatVersion format version {meta['fsp.catversion_version']}; "
                             f"this version reads {CATVERSION_VERSION}")
    check_family(meta, family, source)
    kv: KV = {}
    for enc in filter(None, meta.get("fsp.encoders", "").split(",")):
        if enc not in encoders:
            raise UserInputError(f"{source} adapts text encoder {enc}, which this {family} model does not have "
                                 f"(it has {', '.join(encoders)})")
        width, n_layers = encoders[enc]
        file_width = int(meta.get(f"fsp.width.{enc}", -1))
        if file_width != width:
            raise UserInputError(f"{source}: its {enc} tokens are {file_width} wide but this model's {enc} encoder "
                                 f"is {width} wide (made for another model)")
        layers = [int(i) for i in meta.get(f"fsp.layers.{enc}", "").split(",") if i != ""]
        beyond = [i for i in layers if not 0 <= i < n_layers]
        if beyond:
            raise UserInputError(f"{source}: layer {beyond[0]} of {enc} is beyond this model's {n_layers} layers "
                                 f"(the file was made for a {meta.get(f'fsp.num_layers.{enc}', '?')}-layer encoder)")
        kv[enc] = {}
        for i in layers:
            k, v = tensors.get(f"{enc}.{i}.k"), tensors.get(f"{enc}.{i}.v")
            if k is None or v is None or k.ndim != 2 or k.shape != v.shape or k.shape[-1] != width:
                raise UserInputError(f"{source}: tensors {enc}.{i}.k / .v are missing or malformed")
            kv[enc][i] = (k.float(), v.float())
    if not kv:
        raise UserInputError(f"{source} holds no K/V tokens")
    return kv


def load_catversion_file(path, encoders: dict[str, tuple[int, int]], family: str) -> tuple[KV, dict[str, str]]:
    tensors, meta = load_safetensors(path)
    return parse_catversion(tensors, meta, encoders, family, str(path)), meta
