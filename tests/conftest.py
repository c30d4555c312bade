"""Shared fixtures: tiny diffusers models built in code (no downloads), cached per test session."""

from __future__ import annotations

import os

import pytest
import torch

torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(scope="session")
def tiny_sd(tmp_path_factory) -> str:
    from fewshot_personalize.kernels.testing.tiny_models import build_tiny_sd

    return build_tiny_sd(tmp_path_factory.mktemp("tiny_sd"))


@pytest.fixture(scope="session")
def tiny_sd_v(tmp_path_factory) -> str:
    from fewshot_personalize.kernels.testing.tiny_models import build_tiny_sd

    return build_tiny_sd(tmp_path_factory.mktemp("tiny_sd_v"), prediction_type="v_prediction")


@pytest.fixture(scope="session")
def tiny_sdxl(tmp_path_factory) -> str:
    from fewshot_personalize.kernels.testing.tiny_models import build_tiny_sdxl

    return build_tiny_sdxl(tmp_path_factory.mktemp("tiny_sdxl"))


@pytest.fixture()
def image_folder(tmp_path):
    """Four small random RGB images of different sizes."""
    import numpy as np
    from PIL import Image

    d = tmp_path / "images"
    d.mkdir()
    rng = np.random.default_rng(0)
    for i, (h, w) in enumerate([(40, 40), (48, 36), (64, 80), (33, 50)]):
        Image.fromarray((rng.random((h, w, 3)) * 255).astype("uint8")).save(d / f"{i}.png")
    return d


@pytest.fixture(scope="session")
def tiny_clip(tmp_path_factory) -> str:
    """A tiny random CLIPModel folder (both towers, tokenizer, image processor at 32 px)."""
    from fewshot_personalize.kernels.testing.tiny_feature_models import build_tiny_clip

    return build_tiny_clip(tmp_path_factory.mktemp("tiny_clip") / "clip")


@pytest.fixture(scope="session")
def tiny_dino(tmp_path_factory) -> str:
    """A tiny random Dinov2Model folder (image processor at 28 px)."""
    from fewshot_personalize.kernels.testing.tiny_feature_models import build_tiny_dino

    return build_tiny_dino(tmp_path_factory.mktemp("tiny_dino") / "dinov2")
