"""Node ``FSP_LoadDemoModel``: MODEL, CLIP and VAE of the shipped demo model (no downloads), or of a tiny random
model built in code (for tests and quick wiring checks)."""

from __future__ import annotations

import folder_paths
from comfy_api.latest import io

from .backend.diffusers_loader import demo_model_folder, load_diffusers_folder, tiny_model_folder

CHOICES = ["demo", "tiny (test)"]


class LoadDemoModel(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="FSP_LoadDemoModel",
            display_name="Load demo model",
            category="fewshot/loaders",
            description="The small demo model shipped with the pack (32x32 pixels, CPU friendly). Replace it with "
                        "Load Checkpoint to use a real SD1.5/SDXL model. 'tiny (test)' is an untrained random model "
                        "for tests.",
            inputs=[io.Combo.Input("model_name", options=CHOICES, default="demo",
                                   tooltip="'demo': the shipped demo model; 'tiny (test)': an untrained tiny model.")],
            outputs=[io.Model.Output(display_name="MODEL"), io.Clip.Output(display_name="CLIP"),
                     io.Vae.Output(display_name="VAE")],
        )

    @classmethod
    def execute(cls, model_name) -> io.NodeOutput:
        folder = tiny_model_folder(0) if model_name == "tiny (test)" else demo_model_folder()
        model, clip, vae = load_diffusers_folder(folder, folder_paths.get_folder_paths("embeddings"))
        return io.NodeOutput(model, clip, vae)
