"""Node ``FSP_EvaluateConcept``: DreamBooth's metrics (CLIP-I, CLIP-T, DINO, masked variants, PRES, DIV; see
``kernels/evaluation``) of generated images against the subject's references, on the user's own local models:
transformers folders in ``models/fewshot_eval`` and/or a CLIP_VISION from the stock Load CLIP Vision node."""

from __future__ import annotations

import json
import os
from pathlib import Path

import folder_paths
from comfy_api.latest import io, ui

from ..kernels.core.errors import UserInputError
from ..kernels.evaluation import ImageSet, load_clip, load_dino, metrics_table, score
from ..kernels.formats.safetensors_io import safe_join
from .backend.clip_vision import ComfyClipVision
from .backend.images import pil_to_image

FOLDER = "fewshot_eval"
NONE = "none"


def register_folder() -> None:
    """``models/fewshot_eval`` as a ComfyUI model folder (extra_model_paths.yaml can add more)."""
    if FOLDER not in folder_paths.folder_names_and_paths:
        folder_paths.folder_names_and_paths[FOLDER] = ([os.path.join(folder_paths.models_dir, FOLDER)], set())


def model_folders() -> list[str]:
    """Model folders (holding a config.json) in models/fewshot_eval, one or two levels deep ("org/name")."""
    names = set()
    for root in folder_paths.get_folder_paths(FOLDER):
        base = Path(root)
        for config in [*base.glob("*/config.json"), *base.glob("*/*/config.json")]:
            names.add(config.parent.relative_to(base).as_posix())
    return sorted(names)


def _folder(name: str) -> Path:
    for root in folder_paths.get_folder_paths(FOLDER):
        path = safe_join(root, name)
        if path.is_dir():
            return path
    raise UserInputError(f"model folder {name!r} is not in models/{FOLDER}")


class EvaluateConcept(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        choices = [NONE, *model_folders()]
        return io.Schema(
            node_id="FSP_EvaluateConcept",
            display_name="Evaluate concept (CLIP-I, CLIP-T, DINO)",
            category="fewshot/evaluate",
            description="DreamBooth's metrics of generated images against the subject's reference photos on your own "
                        "local models: CLIP-I and DINO (subject fidelity), CLIP-T (prompt fidelity), their masked "
                        "variants (subject only), PRES (class-prior drift, with class images) and DIV (diversity). "
                        f"Models: transformers folders in models/{FOLDER} and/or a CLIP_VISION. Nothing is downloaded.",
            inputs=[
                io.Image.Input("images", tooltip="The generated images."),
                io.Image.Input("references", tooltip="The subject's reference photos."),
                io.String.Input("prompt", default="", tooltip="The prompt the images were generated from, for CLIP-T "
                                "(needs a CLIPModel folder with its text tower). Empty: no CLIP-T."),
                io.Combo.Input("clip_model", options=choices, default=NONE,
                               tooltip=f"A folder in models/{FOLDER}: CLIPModel (CLIP-I and CLIP-T) or "
                                       "CLIPVisionModelWithProjection (CLIP-I), safetensors weights."),
                io.Combo.Input("dino_model", options=choices, default=NONE,
                               tooltip=f"A folder in models/{FOLDER}: DINO v1 (ViTModel) or DINOv2 (Dinov2Model), "
                                       "safetensors weights."),
                io.ClipVision.Input("clip_vision", optional=True,
                                    tooltip="Instead of a folder: a CLIP vision model (CLIP-I from its image embeds) "
                                            "or a DINOv2 one (DINO) from Load CLIP Vision."),
                io.Mask.Input("image_masks", optional=True, tooltip="Subject masks of the generated images (white = "
                              "subject), one per image and of its size: adds the masked scores."),
                io.Mask.Input("reference_masks", optional=True, tooltip="Subject masks of the reference photos (white "
                              "= subject), one per photo and of its size: adds the masked scores."),
                io.Image.Input("class_images", optional=True, tooltip="Images the personalised model drew from the "
                               "bare class prompt ('a photo of a dog'): adds PRES (class-prior drift)."),
            ],
            outputs=[io.String.Output(display_name="json", tooltip="All scores, which sets were masked, the models."),
                     io.Image.Output(display_name="table", tooltip="The scores as a table image.")],
        )

    @classmethod
    def execute(cls, images, references, prompt, clip_model, dino_model, clip_vision=None, image_masks=None,
                reference_masks=None, class_images=None) -> io.NodeOutput:
        import comfy.model_management as mm

        device = str(mm.get_torch_device())
        clip = load_clip(_folder(clip_model), device, "clip_model") if clip_model != NONE else None
        dino = load_dino(_folder(dino_model), device, "dino_model") if dino_model != NONE else None
        if clip_vision is not None:
            model = ComfyClipVision(clip_vision)
            if (clip if model.kind == "clip" else dino) is not None:
                raise UserInputError(f"clip_vision is a {model.kind.upper()} model and {model.kind}_model is set too: "
                                     "choose one of them")
            clip, dino = (model, dino) if model.kind == "clip" else (clip, model)
        scores = score(ImageSet.from_batch("images", images, image_masks),
                       ImageSet.from_batch("references", references, reference_masks), clip, dino, prompt,
                       ImageSet.from_batch("class images", class_images) if class_images is not None else None)
        text = json.dumps(scores, indent=1)
        return io.NodeOutput(text, pil_to_image(metrics_table(scores)), ui=ui.PreviewText(text))
