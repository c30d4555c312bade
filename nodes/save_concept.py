"""Node ``FSP_SaveConcept``: write an ED-LoRA concept or fused concepts to ``models/loras`` (atomically, never over
an existing file unless asked), where Apply ED-LoRA / fused concepts and Load concept list it at once."""

from __future__ import annotations

import logging

from comfy_api.latest import io

from .backend.files import SaveToModelFolder, file_inputs, save_model_file
from .backend.fusion import ConceptSocket

log = logging.getLogger(__name__)


class SaveConcept(SaveToModelFolder):
    FOLDER = "loras"

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="FSP_SaveConcept",
            display_name="Save concept (ED-LoRA / fused)",
            category="fewshot/adapter",
            description="Save an ED-LoRA concept (Train concept (ED-LoRA)) or fused concepts (Fuse concepts) to "
                        "models/loras as one safetensors file: LoRA weights in kohya names plus the tokens.",
            is_output_node=True,
            inputs=[
                ConceptSocket.Input("concept", tooltip="From Train concept (ED-LoRA), Fuse concepts or Load concept."),
                *file_inputs("loras", "fewshot/concept_edlora"),
            ],
            outputs=[io.String.Output(display_name="lora_name", tooltip="The name the file is listed under.")],
        )

    @classmethod
    def execute(cls, concept, filename, overwrite) -> io.NodeOutput:
        path, name = save_model_file("loras", filename, concept.tensors, concept.metadata, overwrite)
        log.info("saved %s (%s) to %s", concept.source, concept.metadata.get("fsp.method", "lora"), path)
        return io.NodeOutput(name, ui={"text": [f"saved {name}"]})
