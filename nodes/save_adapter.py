"""Node ``FSP_SaveAdapter``: write a trained adapter to ``models/loras`` as a kohya LoRA file.

The file is written atomically (temporary file + rename), never replaces an existing file unless asked, and is
listed by the stock LoraLoader right away (its folder listing cache is invalidated).
"""

from __future__ import annotations

import logging
import os

import folder_paths
from comfy_api.latest import io

from ..kernels.core.errors import UserInputError
from ..kernels.formats.lora_file import save_lora_file
from ..kernels.formats.safetensors_io import safe_join
from .backend.adapter import AdapterSocket

log = logging.getLogger(__name__)


def lora_target(name: str) -> tuple[str, str]:
    """(absolute path, name as LoraLoader lists it) for ``name`` inside the first models/loras folder."""
    name = name.strip().replace("\\", "/")
    if not name:
        raise UserInputError("the file name is empty")
    if not name.endswith(".safetensors"):
        name += ".safetensors"
    folder = folder_paths.get_folder_paths("loras")[0]
    path = safe_join(folder, name)
    return str(path), os.path.relpath(path, os.path.realpath(folder)).replace(os.sep, "/")


class SaveAdapter(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="FSP_SaveAdapter",
            display_name="Save adapter (LoRA)",
            category="fewshot/adapter",
            description="Save a trained concept to models/loras as a kohya-format LoRA (the stock LoraLoader, "
                        "A1111/Forge and diffusers read it).",
            is_output_node=True,
            inputs=[
                AdapterSocket.Input("adapter", tooltip="The adapter from Train concept."),
                io.String.Input("filename", default="fewshot/concept",
                                tooltip="File name inside models/loras (subfolders allowed, '.safetensors' is added)."),
                io.Boolean.Input("overwrite", default=False, tooltip="Replace an existing file of this name."),
            ],
            outputs=[io.String.Output(display_name="lora_name", tooltip="The name LoraLoader lists the file under.")],
        )

    @classmethod
    def validate_inputs(cls, filename=None, overwrite=None, **kw):
        if filename is None:
            return True
        try:
            path, _ = lora_target(filename)
        except UserInputError as e:
            return str(e)
        if os.path.exists(path) and overwrite is False:
            return f"{path} already exists: choose another name or set overwrite"
        return True

    @classmethod
    def fingerprint_inputs(cls, **kw):
        return float("nan")  # always write (the file may have been deleted since the last run)

    @classmethod
    def execute(cls, adapter, filename, overwrite) -> io.NodeOutput:
        path, name = lora_target(filename)
        if os.path.exists(path) and not overwrite:
            raise UserInputError(f"{path} already exists: choose another name or set overwrite")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        save_lora_file(path, adapter.weights, adapter.metadata, overwrite=bool(overwrite))
        folder_paths.filename_list_cache.pop("loras", None)  # LoraLoader lists it without a restart
        log.info("saved adapter (%d layers) to %s", len(adapter.weights), path)
        return io.NodeOutput(name, ui={"text": [f"saved {name}"]})
