"""Files that nodes write into ComfyUI's model folders: a safe path inside the folder (no escaping it), no
overwriting unless asked, atomic writes, and the folder's listing refreshed so loaders see the file at once."""

from __future__ import annotations

import os

import folder_paths
import torch
from comfy_api.latest import io

from ...kernels.core.errors import UserInputError
from ...kernels.formats.safetensors_io import atomic_save, safe_join


def model_file_target(folder: str, name: str) -> tuple[str, str]:
    """(absolute path, name as ComfyUI lists it) for ``name`` inside the first ``folder`` directory
    (``loras``, ``embeddings``, ``catversion``); subfolders allowed, ``.safetensors`` added."""
    name = name.strip().replace("\\", "/")
    if not name:
        raise UserInputError("the file name is empty")
    if not name.endswith(".safetensors"):
        name += ".safetensors"
    root = folder_paths.get_folder_paths(folder)[0]
    path = safe_join(root, name)
    return str(path), os.path.relpath(path, os.path.realpath(root)).replace(os.sep, "/")


def check_new(folder: str, name: str, overwrite: bool | None) -> str | bool:
    """``validate_inputs`` helper: an error message, or True."""
    if name is None:
        return True
    try:
        path, _ = model_file_target(folder, name)
    except UserInputError as e:
        return str(e)
    if os.path.exists(path) and overwrite is False:
        return f"{path} already exists: choose another name or set overwrite"
    return True


def save_model_file(folder: str, name: str, tensors: dict[str, torch.Tensor], metadata: dict[str, str],
                    overwrite: bool) -> tuple[str, str]:
    """Write the file; returns (path, listed name)."""
    path, listed = model_file_target(folder, name)
    if os.path.exists(path) and not overwrite:
        raise UserInputError(f"{path} already exists: choose another name or set overwrite")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    atomic_save(tensors, path, metadata, overwrite=bool(overwrite))
    folder_paths.filename_list_cache.pop(folder, None)  # listed without a restart
    return path, listed


def loras_path(name: str) -> str:
    """The full path of a file ComfyUI lists in models/loras (a clear error for any other name)."""
    path = folder_paths.get_full_path("loras", name)
    if path is None:
        raise UserInputError(f"file {name!r} is not in models/loras")
    return path


def check_in_loras(name: str | None) -> str | bool:
    """``validate_inputs`` helper: an error message, or True."""
    if name is not None and folder_paths.get_full_path("loras", name) is None:
        return f"file {name!r} is not in models/loras"
    return True


def file_inputs(folder: str, default: str) -> list:
    """The ``filename`` and ``overwrite`` inputs of a save node."""
    return [io.String.Input("filename", default=default,
                            tooltip=f"File name inside models/{folder} (subfolders allowed, '.safetensors' is added)."),
            io.Boolean.Input("overwrite", default=False, tooltip="Replace an existing file of this name.")]


class SaveToModelFolder(io.ComfyNode):
    """Base of the nodes that write one file into a model folder (``FOLDER``): refuse an existing file at queue
    time unless overwrite is set, and always run (the file may have been deleted since the last run)."""

    FOLDER = ""

    @classmethod
    def validate_inputs(cls, filename=None, overwrite=None, **kw):
        return check_new(cls.FOLDER, filename, overwrite)

    @classmethod
    def fingerprint_inputs(cls, **kw):
        return float("nan")
