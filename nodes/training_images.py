"""Training images as users bring them: ``FSP_LoadDemoConcept`` (the reference photos and masks of a bundled demo
concept) and ``FSP_LoadImageFolder`` (a folder of your own photos under ComfyUI's input directory, with masks where
present: ``NAME_mask.png``, ``masks/NAME.png`` or the photo's transparency)."""

from __future__ import annotations

import folder_paths
import numpy as np
import torch
from comfy_api.latest import io, ui

from ..kernels.core.errors import UserInputError
from ..kernels.core.images import load_masked_folder
from ..kernels.formats.safetensors_io import safe_join


def _demo_concepts() -> list[str]:
    from ..kernels.demo.concepts import CONCEPTS

    return list(CONCEPTS)


class LoadDemoConcept(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="FSP_LoadDemoConcept",
            display_name="Load demo concept images",
            category="fewshot/loaders",
            description="The few reference photos (64x64) and subject masks of a concept bundled with the demo "
                        "model, with its class word and a DreamBooth prompt. For your own photos use Load image folder.",
            inputs=[
                io.Combo.Input("concept", options=_demo_concepts(), default="checker_toy",
                               tooltip="checker_toy, twotone_ball, marked_box or creature_toy."),
                io.Int.Input("count", default=5, min=1, max=10, tooltip="How many reference photos."),
                io.Int.Input("seed", default=0, min=0, max=2**31 - 1, tooltip="Which set of photos (poses, sizes)."),
            ],
            outputs=[io.Image.Output(display_name="images"), io.Mask.Output(display_name="masks"),
                     io.String.Output(display_name="class_word", tooltip="e.g. 'toy'"),
                     io.String.Output(display_name="instance_prompt", tooltip="e.g. 'a sks toy' (DreamBooth)")],
        )

    @classmethod
    def execute(cls, concept, count, seed) -> io.NodeOutput:
        from ..kernels.demo.concepts import get_concept, reference_images

        c = get_concept(concept)
        refs = reference_images(c, n=count, seed=seed)
        images = torch.from_numpy(np.stack([np.asarray(im, dtype=np.float32) / 255.0 for im, _ in refs]))
        masks = torch.from_numpy(np.stack([m.astype(np.float32) for _, m in refs]))
        return io.NodeOutput(images, masks, c.cls, f"a {c.phrase()}")


class LoadImageFolder(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="FSP_LoadImageFolder",
            display_name="Load image folder (training photos)",
            category="fewshot/loaders",
            description="All photos of a folder under ComfyUI's input directory, resized (shorter side) and "
                        "centre-cropped to one size, with their masks: NAME_mask.png beside a photo, masks/NAME.png, "
                        "or the photo's transparency (white/opaque = subject). Photos without a mask get a full one.",
            inputs=[
                io.String.Input("folder", default="my_concept",
                                tooltip="Folder inside ComfyUI's input directory, e.g. 'my_dog' for input/my_dog."),
                io.Int.Input("size", default=512, min=8, max=4096, step=8, tooltip="Output size in pixels (square)."),
            ],
            outputs=[io.Image.Output(display_name="images"), io.Mask.Output(display_name="masks"),
                     io.Int.Output(display_name="count")],
        )

    @classmethod
    def fingerprint_inputs(cls, folder, size):
        return float("nan")  # the folder's contents may change between runs

    @classmethod
    def execute(cls, folder, size) -> io.NodeOutput:
        if not folder.strip():
            raise UserInputError("the folder name is empty")
        path = safe_join(folder_paths.get_input_directory(), folder.strip())
        pixels, masks, notes = load_masked_folder(path, size)
        images = ((pixels + 1) / 2).clamp(0, 1).movedim(1, -1).contiguous()
        mask_out = masks[:, 0] if masks is not None else torch.ones(images.shape[:3])
        text = f"{images.shape[0]} photos from {folder}" + ("" if masks is not None else " (no masks found)")
        return io.NodeOutput(images, mask_out, images.shape[0], ui=ui.PreviewText("\n".join([text, *notes])))
