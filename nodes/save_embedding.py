"""Node ``FSP_SaveEmbedding``: write a Textual Inversion embedding to ``models/embeddings`` (atomic, no overwrite
unless asked), where ComfyUI's ``embedding:NAME`` prompt syntax finds it, and hand out a prompt that uses it."""

from __future__ import annotations

import logging

from comfy_api.latest import io

from ..kernels.core.errors import UserInputError
from .backend.files import SaveToModelFolder, file_inputs, save_model_file
from .train_embedding import EmbeddingSocket

log = logging.getLogger(__name__)


def embedding_prompt(template: str, listed_name: str) -> str:
    """``template`` with {} replaced by ``embedding:NAME`` (NAME without .safetensors, as ComfyUI resolves it)."""
    ref = "embedding:" + listed_name.removesuffix(".safetensors")
    return template.replace("{}", ref)


class SaveEmbedding(SaveToModelFolder):
    FOLDER = "embeddings"

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="FSP_SaveEmbedding",
            display_name="Save embedding (Textual Inversion)",
            category="fewshot/adapter",
            description="Save a learned token to models/embeddings (ComfyUI's embedding:NAME, diffusers' "
                        "load_textual_inversion and A1111 read it). Outputs the prompt with {} replaced by "
                        "embedding:NAME, ready for a CLIP Text Encode's text input.",
            is_output_node=True,
            inputs=[
                EmbeddingSocket.Input("embedding", tooltip="The embedding from Train concept (Textual Inversion)."),
                *file_inputs("embeddings", "fewshot/sks"),
                io.String.Input("prompt", default="a photo of {} on the beach", multiline=True,
                                tooltip="A prompt in which {} becomes embedding:NAME (the text output)."),
            ],
            outputs=[io.String.Output(display_name="prompt", tooltip="The prompt using the saved embedding.")],
        )


    @classmethod
    def execute(cls, embedding, filename, overwrite, prompt) -> io.NodeOutput:
        if "{}" not in prompt:  # refused before anything is written
            raise UserInputError(f"the prompt {prompt!r} has no {{}} where the embedding goes")
        path, name = save_model_file("embeddings", filename, embedding.tensors, embedding.metadata, overwrite)
        text = embedding_prompt(prompt, name)
        log.info("saved embedding to %s", path)
        return io.NodeOutput(text, ui={"text": [f"saved {name}: {text}"]})
