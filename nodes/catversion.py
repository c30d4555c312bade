"""Nodes ``FSP_LoadCatVersion`` (the KV-concatenation embedding loader) and ``FSP_SaveCatVersion``.

The loader puts a CatVersion adapter (a file from ``models/catversion`` or an in-graph one) on a CLIP clone with a
strength; use that CLIP for the positive prompt and the original CLIP for the negative one (CatVersion's
adapter-free unconditional branch). A file made for another model family or width is refused, naming both.
"""

from __future__ import annotations

import logging

import folder_paths
from comfy_api.latest import io

from ..kernels.core.errors import UserInputError
from ..kernels.formats.safetensors_io import load_safetensors
from .backend.catversion import FOLDER, apply_catversion
from .backend.files import SaveToModelFolder, file_inputs, save_model_file
from .train_catversion import CatVersionSocket

log = logging.getLogger(__name__)

NONE = "(use the catversion input)"


class LoadCatVersion(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="FSP_LoadCatVersion",
            display_name="Load CatVersion (KV-concatenation)",
            category="fewshot/adapter",
            description="Apply a CatVersion adapter to CLIP: learned key/value tokens concatenated in the "
                        "self-attention of its layers, acting on every prompt. Use the output for the positive "
                        "prompt only; encode the negative prompt with the original CLIP.",
            inputs=[
                io.Clip.Input("clip", tooltip="The text encoder of the model the adapter was trained on."),
                io.Combo.Input("catversion_name", options=[NONE] + folder_paths.get_filename_list(FOLDER),
                               default=NONE, tooltip="A file from models/catversion (used when the catversion input "
                                                     "is not connected)."),
                io.Float.Input("strength", default=1.0, min=-2.0, max=4.0, step=0.01,
                               tooltip="0 = plain CLIP, 1 = the trained adapter (scales the attention residual)."),
                CatVersionSocket.Input("catversion", optional=True,
                                       tooltip="An in-graph adapter from Train concept (CatVersion); wins over the file."),
            ],
            outputs=[io.Clip.Output(display_name="CLIP", tooltip="CLIP with the adapter: for the positive prompt.")],
        )

    @classmethod
    def validate_inputs(cls, catversion_name=None, **kw):
        if catversion_name not in (None, NONE) and folder_paths.get_full_path(FOLDER, catversion_name) is None:
            return f"CatVersion file {catversion_name!r} is not in models/{FOLDER}"
        return True

    @classmethod
    def execute(cls, clip, catversion_name, strength, catversion=None) -> io.NodeOutput:
        if catversion is not None:
            tensors, meta, source = catversion.tensors, catversion.metadata, "the in-graph CatVersion adapter"
        else:
            if catversion_name == NONE:
                raise UserInputError("connect a catversion input or choose a file from models/catversion")
            path = folder_paths.get_full_path(FOLDER, catversion_name)
            if path is None:
                raise UserInputError(f"CatVersion file {catversion_name!r} is not in models/{FOLDER}")
            (tensors, meta), source = load_safetensors(path), catversion_name
        return io.NodeOutput(apply_catversion(clip, tensors, meta, strength, source))


class SaveCatVersion(SaveToModelFolder):
    FOLDER = FOLDER

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="FSP_SaveCatVersion",
            display_name="Save CatVersion",
            category="fewshot/adapter",
            description="Save a CatVersion adapter to models/catversion (atomic; the loader lists it at once).",
            is_output_node=True,
            inputs=[
                CatVersionSocket.Input("catversion", tooltip="The adapter from Train concept (CatVersion)."),
                *file_inputs("catversion", "fewshot/concept"),
            ],
            outputs=[io.String.Output(display_name="catversion_name", tooltip="The name the loader lists it under.")],
        )


    @classmethod
    def execute(cls, catversion, filename, overwrite) -> io.NodeOutput:
        path, name = save_model_file(FOLDER, filename, catversion.tensors, catversion.metadata, overwrite)
        log.info("saved CatVersion adapter to %s", path)
        return io.NodeOutput(name, ui={"text": [f"saved {name}"]})
