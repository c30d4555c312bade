"""Tiny random CLIP and DINO models built in code and saved as transformers folders (safetensors weights, image
processor, tokenizer), for tests of the evaluation metrics: real architectures at toy widths, no downloads."""

from __future__ import annotations

import os

import torch

from .tiny_models import TINY_WORDS
from .word_tokenizer import write_clip_tokenizer

IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
_TOWER = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)


def build_tiny_clip(out_dir: str | os.PathLike, *, seed: int = 0, vision_only: bool = False, image_size: int = 32,
                    processor: bool = True) -> str:
    """A ``CLIPModel`` folder (both towers, projection 16, the word-list tokenizer) or, with ``vision_only``, a
    ``CLIPVisionModelWithProjection`` one; ``processor`` adds a CLIPImageProcessor at ``image_size``."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(seed)
    os.makedirs(out_dir, exist_ok=True)
    vision = dict(_TOWER, image_size=image_size, patch_size=8, hidden_act="quick_gelu")
    if vision_only:
        model = CLIPVisionModelWithProjection(CLIPVisionConfig(**vision, projection_dim=16))
    else:
        ids = write_clip_tokenizer(TINY_WORDS, out_dir)
        text = dict(_TOWER, vocab_size=ids["vocab_size"], max_position_embeddings=77, hidden_act="quick_gelu",
                    bos_token_id=ids["bos_token_id"], eos_token_id=ids["eos_token_id"],
                    pad_token_id=ids["pad_token_id"])
        model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16))
    model.save_pretrained(out_dir, safe_serialization=True)
    if processor:
        CLIPImageProcessor(size={"shortest_edge": image_size},
                           crop_size={"height": image_size, "width": image_size}).save_pretrained(out_dir)
    return str(out_dir)


def build_tiny_dino(out_dir: str | os.PathLike, *, kind: str = "dinov2", seed: int = 0, image_size: int = 28,
                    patch_size: int = 14, processor: bool = True) -> str:
    """A DINO folder: ``kind`` "dinov2" (``Dinov2Model`` with DINOv2's BitImageProcessor settings),
    "dinov2_with_registers" or "vit" (DINO v1 as a ``ViTModel`` without pooler, ViTImageProcessor)."""
    import transformers

    torch.manual_seed(seed)
    os.makedirs(out_dir, exist_ok=True)
    common = dict(_TOWER, image_size=image_size, patch_size=patch_size)
    if kind == "vit":
        model = transformers.ViTModel(transformers.ViTConfig(**common), add_pooling_layer=False)
        proc = transformers.ViTImageProcessor(size={"height": image_size, "width": image_size},
                                              image_mean=IMAGENET_MEAN, image_std=IMAGENET_STD)
    else:
        common.pop("intermediate_size")  # DINOv2 sizes its MLP by mlp_ratio (4)
        cls, config = {"dinov2": ("Dinov2Model", "Dinov2Config"),
                       "dinov2_with_registers": ("Dinov2WithRegistersModel", "Dinov2WithRegistersConfig")}[kind]
        model = getattr(transformers, cls)(getattr(transformers, config)(**common))
        proc = transformers.BitImageProcessor(size={"shortest_edge": image_size},
                                              crop_size={"height": image_size, "width": image_size},
                                              image_mean=IMAGENET_MEAN, image_std=IMAGENET_STD, do_convert_rgb=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    if processor:
        proc.save_pretrained(out_dir)
    return str(out_dir)
