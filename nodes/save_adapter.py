"""Node ``FSP_SaveAdapter``: write a trained adapter to ``models/loras`` as a kohya LoRA file.

The file is written atomically (temporary file + rename), never replaces an existing file unless asked, and is
listed by the stock LoraLoader right away (its folder listing cache is invalidated).
"""

from __future__ import annotations

import logging

from comfy_api.latest import io

from ..kernels.formats.lora_file import lora_tensors
from .backend.adapter import AdapterSocket
from .backend.files import SaveToModelFolder, file_inputs, save_model_file

log = logging.getLogger(__name__)


class SaveAdapter(SaveToModelFolder):
    FOLDER = "loras"

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
                *file_inputs("loras", "fewshot/concept"),
            ],
            outputs=[io.String.Output(display_name="lora_name", tooltip="The name LoraLoader lists the file under.")],
        )


    @classmethod
    def execute(cls, adapter, filename, overwrite) -> io.NodeOutput:
        path, name = save_model_file("loras", filename, lora_tensors(adapter.weights), adapter.metadata, overwrite)
        log.info("saved adapter (%d layers) to %s", len(adapter.weights), path)
        return io.NodeOutput(name, ui={"text": [f"saved {name}"]})
