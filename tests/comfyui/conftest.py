"""ComfyUI suite setup: needs a ComfyUI source checkout in ``COMFYUI_PATH`` (skipped, with the reason shown,
without one).

ComfyUI is put first on ``sys.path`` and forced to the CPU *before* ``comfy.model_management`` is imported
(that module initialises the device at import). The pack is only ever imported as ``fewshot_personalize``:
ComfyUI has a top-level module named ``nodes`` too, and pytest runs with ``--import-mode=importlib`` so the
repository root is never put on ``sys.path``.
"""

from __future__ import annotations

import os
import sys

import pytest

COMFYUI_PATH = os.environ.get("COMFYUI_PATH")
SKIP_REASON = "COMFYUI_PATH is not set: the ComfyUI suite needs a ComfyUI source checkout (v0.3.64 or newer)"

if COMFYUI_PATH:
    COMFYUI_PATH = os.path.abspath(COMFYUI_PATH)
    if COMFYUI_PATH not in sys.path:
        sys.path.insert(0, COMFYUI_PATH)
    # ComfyUI's own `utils` package must win over comfy/utils.py, which `nodes` later puts on sys.path
    from comfy.cli_args import args  # noqa: E402

    args.cpu = True
    args.fp32_text_enc = True
    args.disable_auto_launch = True
    import utils.extra_config  # noqa: E402,F401
    import utils.install_util  # noqa: E402,F401


def pytest_collection_modifyitems(config, items):
    here = os.path.dirname(__file__)
    for item in items:
        if str(item.fspath).startswith(here):
            item.add_marker(pytest.mark.comfyui)
            if not COMFYUI_PATH:
                item.add_marker(pytest.mark.skip(reason=SKIP_REASON))


@pytest.fixture(scope="session")
def comfy_nodes():
    """ComfyUI's top-level ``nodes`` module with the built-in extra nodes (LoraLoader, KSampler, TrainLoraNode…)."""
    import asyncio

    import nodes  # ComfyUI's, not ours: ours is only reachable as fewshot_personalize.nodes

    if not getattr(nodes, "_fsp_extra_loaded", False):
        asyncio.run(nodes.init_extra_nodes(init_custom_nodes=False, init_api_nodes=False))
        nodes._fsp_extra_loaded = True
    return nodes


@pytest.fixture(scope="session")
def tiny_folder():
    from fewshot_personalize.nodes.backend.diffusers_loader import tiny_model_folder

    return tiny_model_folder(0)


@pytest.fixture(scope="session")
def tiny_objects(tiny_folder):
    """(MODEL, CLIP, VAE) built from the tiny diffusers folder, as the loader node makes them (inference mode,
    like every node ComfyUI runs)."""
    import torch

    from fewshot_personalize.nodes.backend.diffusers_loader import load_diffusers_folder

    with torch.inference_mode():
        return load_diffusers_folder(tiny_folder)


@pytest.fixture(scope="session")
def tiny_sdxl_folder(tmp_path_factory):
    """A tiny SDXL-style diffusers folder (two CLIP encoders, 'text_time' UNet), built in code."""
    from fewshot_personalize.kernels.testing.tiny_models import build_tiny_sdxl

    return build_tiny_sdxl(tmp_path_factory.mktemp("tiny_sdxl") / "model", seed=0)


@pytest.fixture(scope="session")
def tiny_sdxl_objects(tiny_sdxl_folder):
    """(MODEL, CLIP, VAE) of the tiny SDXL folder, loaded in inference mode like ``tiny_objects``."""
    import torch

    from fewshot_personalize.nodes.backend.diffusers_loader import load_diffusers_folder

    with torch.inference_mode():
        return load_diffusers_folder(tiny_sdxl_folder)


@pytest.fixture(params=["sd1", "sdxl"])
def family_case(request):
    """(family, diffusers folder, (MODEL, CLIP, VAE)) of the tiny SD1 model and of the tiny SDXL model."""
    suffix = "" if request.param == "sd1" else "_sdxl"
    return (request.param, request.getfixturevalue(f"tiny{suffix}_folder"),
            request.getfixturevalue(f"tiny{suffix}_objects"))


@pytest.fixture
def loras_dir(tmp_path, monkeypatch):
    import folder_paths

    d = tmp_path / "loras"
    d.mkdir()
    monkeypatch.setitem(folder_paths.folder_names_and_paths, "loras", ([str(d)], {".safetensors"}))
    folder_paths.filename_list_cache.pop("loras", None)
    out = tmp_path / "output"
    out.mkdir()
    old = folder_paths.get_output_directory()
    folder_paths.set_output_directory(str(out))
    yield d
    folder_paths.set_output_directory(old)
    folder_paths.filename_list_cache.pop("loras", None)
