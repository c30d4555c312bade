"""Node ``FSP_ApplyLayerwiseConcepts``: an ED-LoRA concept or a fused multi-concept file (Mix-of-Show) on MODEL and
CLIP, for the stock CLIPTextEncode → KSampler path."""

from __future__ import annotations

import folder_paths
from comfy_api.latest import io

from ..kernels.formats.safetensors_io import load_safetensors
from .backend.files import check_in_loras, loras_path
from .backend.layerwise import apply_layerwise_file


class ApplyLayerwiseConcepts(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="FSP_ApplyLayerwiseConcepts",
            display_name="Apply ED-LoRA / fused concepts",
            category="fewshot/adapter",
            description="Apply an ED-LoRA concept or a fused multi-concept file (Mix-of-Show) from models/loras: its "
                        "LoRA on MODEL and CLIP, its tokens on CLIP (write them in the prompt, e.g. 'a <toy1> on the "
                        "beach'), and one text conditioning per cross-attention layer. Use the CLIP for both prompts.",
            inputs=[
                io.Model.Input("model", tooltip="The model the concepts were trained (or fused) on."),
                io.Clip.Input("clip", tooltip="Its text encoder."),
                io.Combo.Input("lora_name", options=folder_paths.get_filename_list("loras"),
                               tooltip="An ED-LoRA or fused file from models/loras (written by 'train --method "
                                       "ed-lora' or 'fuse')."),
                io.Float.Input("strength_model", default=1.0, min=-10.0, max=10.0, step=0.01,
                               tooltip="Strength of the LoRA on the diffusion model."),
                io.Float.Input("strength_clip", default=1.0, min=-10.0, max=10.0, step=0.01,
                               tooltip="Strength of the LoRA on the text encoder (the tokens always apply)."),
            ],
            outputs=[io.Model.Output(display_name="MODEL"), io.Clip.Output(display_name="CLIP")],
        )

    @classmethod
    def validate_inputs(cls, lora_name=None, **kw):
        return check_in_loras(lora_name)

    @classmethod
    def execute(cls, model, clip, lora_name, strength_model, strength_clip) -> io.NodeOutput:
        tensors, meta = load_safetensors(loras_path(lora_name))
        return io.NodeOutput(*apply_layerwise_file(model, clip, tensors, meta, strength_model, strength_clip, lora_name))
