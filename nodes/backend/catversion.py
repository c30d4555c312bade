"""CatVersion adapters in the graph: the ``models/catversion`` folder, and a CLIP clone carrying K/V tokens as
object patches on its self-attention layers (they compose with every other CLIP patch and with the stock
CLIPTextEncode → KSampler path; the caller's CLIP is never changed)."""

from __future__ import annotations

import logging
import os

import folder_paths
import torch

from ...kernels.formats.catversion_file import parse_catversion
from .families import clip_family
from .text_encoder import ComfyTextEncoder

log = logging.getLogger(__name__)

FOLDER = "catversion"


def register_folder() -> None:
    """``models/catversion`` as a ComfyUI model folder (listed in combos, extra_model_paths.yaml can add more)."""
    if FOLDER not in folder_paths.folder_names_and_paths:
        folder_paths.folder_names_and_paths[FOLDER] = ([os.path.join(folder_paths.models_dir, FOLDER)], {".safetensors"})


def encoder_shapes(text: ComfyTextEncoder) -> dict[str, tuple[int, int]]:
    return {e.name: (e.width, e.num_layers) for e in text.encoders}


def apply_catversion(clip, tensors: dict[str, torch.Tensor], metadata: dict[str, str], strength: float, source: str):
    """A clone of ``clip`` with the file's K/V tokens concatenated in its self-attention (strength s scales the
    residual: 0 = plain CLIP, 1 = the trained adapter). Refuses a file for another family or width, naming both."""
    family = clip_family(clip)
    text = ComfyTextEncoder(clip, family)
    kv = parse_catversion(tensors, metadata, encoder_shapes(text), family, source)
    out = clip.clone()
    for key, fn in text.kv_object_patches(kv, strength).items():
        out.patcher.add_object_patch(key, fn)
    return out
