"""Node ``FSP_ApplyAdapter``: put a concept adapter (in-graph, or a LoRA file from models/loras) on MODEL/CLIP."""

from __future__ import annotations

import folder_paths
from comfy_api.latest import io

from ..kernels.core.errors import UserInputError
from ..kernels.formats.safetensors_io import load_safetensors
from .backend.adapter import AdapterSocket, adapter_from_file_tensors, apply_adapter
from .backend.families import model_family

NONE = "(use the adapter input)"


class ApplyAdapter(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="FSP_ApplyAdapter",
            display_name="Apply adapter",
            category="fewshot/adapter",
            description="Apply a trained concept to a model: the adapter input if connected, otherwise the chosen "
                        "LoRA file. Refuses files that are not LoRAs or were made for another model family.",
            inputs=[
                io.Model.Input("model", tooltip="The model to apply the concept to."),
                io.Clip.Input("clip", optional=True, tooltip="Its text encoder (needed for adapters that trained it)."),
                io.Combo.Input("lora_name", options=[NONE] + folder_paths.get_filename_list("loras"), default=NONE,
                               tooltip="A LoRA file from models/loras (used when the adapter input is not connected)."),
                io.Float.Input("strength_model", default=1.0, min=-10.0, max=10.0, step=0.01,
                               tooltip="Strength on the diffusion model."),
                io.Float.Input("strength_clip", default=1.0, min=-10.0, max=10.0, step=0.01,
                               tooltip="Strength on the text encoder."),
                AdapterSocket.Input("adapter", optional=True, tooltip="An in-graph adapter from Train concept (wins over the file)."),
            ],
            outputs=[io.Model.Output(display_name="MODEL"), io.Clip.Output(display_name="CLIP")],
        )

    @classmethod
    def validate_inputs(cls, lora_name=None, **kw):
        if lora_name not in (None, NONE) and folder_paths.get_full_path("loras", lora_name) is None:
            return f"LoRA file {lora_name!r} is not in models/loras"
        return True

    @classmethod
    def execute(cls, model, lora_name, strength_model, strength_clip, clip=None, adapter=None) -> io.NodeOutput:
        family = model_family(model)
        if adapter is not None:
            source = "the in-graph adapter"
        else:
            if lora_name == NONE:
                raise UserInputError("connect an adapter or choose a LoRA file")
            path = folder_paths.get_full_path("loras", lora_name)
            if path is None:
                raise UserInputError(f"LoRA file {lora_name!r} is not in models/loras")
            tensors, meta = load_safetensors(path)
            source = lora_name
            adapter = adapter_from_file_tensors(tensors, meta, source)
        m, c = apply_adapter(model, clip, adapter, strength_model, strength_clip, family, source)
        return io.NodeOutput(m, c)
