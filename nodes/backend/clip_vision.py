"""A stock CLIP_VISION (``comfy.clip_vision.ClipVisionModel``, from Load CLIP Vision) as an image feature model of the
evaluation: CLIP-I from the ``image_embeds`` of a CLIP vision model with its projection, DINO from a DINOv2 one (its
``image_embeds`` are the CLS token after the final layer norm). Images go through ComfyUI's own preprocessing
(``encode_image``: shorter side to the model's size, centre crop, the model's mean/std)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ...kernels.core.errors import UserInputError

BATCH = 16


def clip_vision_kind(clip_vision) -> str:
    """"clip" or "dino" for a CLIP_VISION object; a clear error for the other image encoders ComfyUI loads."""
    model = getattr(clip_vision, "model", None)
    model_type = getattr(clip_vision, "model_type", None)  # recorded by newer ComfyUI only
    if model_type is None:
        name = type(model).__name__
        if name == "Dinov2Model":
            model_type = "dinov2"
        elif name == "CLIPVisionModelProjection":
            siglip = model.vision_model.embeddings.class_embedding is None
            model_type = "siglip_vision_model" if siglip else "clip_vision_model"
        else:
            model_type = name
    if model_type == "clip_vision_model":
        if not isinstance(model.visual_projection, torch.nn.Module):
            raise UserInputError("the CLIP_VISION model has no visual projection: CLIP-I compares CLIP's projected "
                                 "image embeddings")
        return "clip"
    if model_type == "dinov2":
        return "dino"
    raise UserInputError(f"the CLIP_VISION input is a {model_type} image encoder: the evaluation takes a CLIP vision "
                         "model (CLIP-I) or a DINOv2 one (DINO)")


class ComfyClipVision:
    """The evaluation's feature-model interface over a CLIP_VISION object (``kernels.evaluation.ImageFeatureModel``)."""

    text_problem = "a CLIP_VISION model has no text tower: CLIP-T needs a CLIPModel folder as clip_model"

    def __init__(self, clip_vision):
        self.clip_vision = clip_vision
        self.kind = clip_vision_kind(clip_vision)
        self.name = f"CLIP_VISION ({'CLIP' if self.kind == 'clip' else 'DINOv2'})"
        self.background = tuple(float(v) for v in clip_vision.image_mean)

    def image_features(self, images: Sequence[torch.Tensor]) -> torch.Tensor:
        """Features of images [H,W,3] in 0..1; images of one size are encoded together."""
        out: list[torch.Tensor | None] = [None] * len(images)
        by_size: dict[tuple, list[int]] = {}
        for i, im in enumerate(images):
            by_size.setdefault(tuple(im.shape), []).append(i)
        for idx in by_size.values():
            for start in range(0, len(idx), BATCH):
                part = idx[start:start + BATCH]
                batch = torch.stack([images[i] for i in part])
                embeds = self.clip_vision.encode_image(batch, crop=True)["image_embeds"].float().cpu()
                for i, e in zip(part, embeds):
                    out[i] = e
        return torch.stack(out)

    def text_features(self, prompts: Sequence[str]) -> torch.Tensor:
        raise UserInputError(self.text_problem)
