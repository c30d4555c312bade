"""Node ``FSP_LoadConcept``: a concept file from ``models/loras`` (ED-LoRA, DreamBooth-LoRA or pivotal) as the
input of Fuse concepts, with the prompt its activations are recorded on."""

from __future__ import annotations

import folder_paths
from comfy_api.latest import io

from ..kernels.formats.safetensors_io import load_safetensors
from .backend.files import check_in_loras, loras_path
from .backend.fusion import ConceptFile, ConceptSocket


class LoadConcept(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="FSP_LoadConcept",
            display_name="Load concept (for fusion)",
            category="fewshot/loaders",
            description="Load an ED-LoRA, DreamBooth-LoRA or pivotal file from models/loras for Fuse concepts.",
            inputs=[
                io.Combo.Input("lora_name", options=folder_paths.get_filename_list("loras"),
                               tooltip="The concept's file in models/loras."),
                io.String.Input("prompt", default="",
                                tooltip="What the concept is called, e.g. 'a sks dog': the prompt fusion records it "
                                        "on. Empty: the file's token in Mix-of-Show's templates, or the instance "
                                        "prompt the file records (DreamBooth-LoRA files need one of the two)."),
            ],
            outputs=[ConceptSocket.Output(display_name="concept")],
        )

    @classmethod
    def validate_inputs(cls, lora_name=None, **kw):
        return check_in_loras(lora_name)

    @classmethod
    def execute(cls, lora_name, prompt) -> io.NodeOutput:
        tensors, meta = load_safetensors(loras_path(lora_name))
        return io.NodeOutput(ConceptFile(tensors, meta, lora_name, (prompt or "").strip() or None))
