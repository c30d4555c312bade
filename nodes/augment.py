"""Nodes ``FSP_Augmentation`` (the augmentation every trainer node takes) and ``FSP_AugmentationPreview`` (the views
a trainer will see: images, masks, captions)."""

from __future__ import annotations

import torch
from comfy_api.latest import io, ui

from ..kernels.augment.settings import MAX_SCALE, MIN_SCALE, PRESETS, AugmentSettings
from ..kernels.augment.settings import preset as preset_settings
from ..kernels.core.errors import UserInputError
from ..kernels.engine.augmented import training_views
from ..kernels.engine.config import TrainConfig
from ..kernels.engine.data import TrainData
from .backend.augmentation import Augmentation, AugmentSocket, augmentation_parts
from .backend.training import first, instance_pixels

CUSTOM = "custom"
_STANDARD = PRESETS["standard"]


class AugmentationNode(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        f = lambda name, default, top, tip, step=0.01, low=0.0: io.Float.Input(  # noqa: E731
            name, default=default, min=low, max=top, step=step, tooltip=tip + " (used when preset is 'custom')")
        return io.Schema(
            node_id="FSP_Augmentation",
            display_name="Augmentation",
            category="fewshot/train",
            description="How a trainer varies the few photos every step so it learns the subject, not its "
                        "surroundings: rescale with caption tags (Custom Diffusion), rotation, light, new backgrounds "
                        "behind masked subjects, caption shuffle/dropout. Connect to any trainer's 'augmentation' "
                        "input; see what it does with Augmentation preview.",
            inputs=[
                io.Combo.Input("preset", options=[*PRESETS, CUSTOM], default="standard",
                               tooltip="; ".join(f"{k}: {v.describe()}" for k, v in PRESETS.items())
                                       + "; custom: the values below"),
                f("flip", _STANDARD.flip, 1.0, "Probability of a mirror image."),
                f("rescale", _STANDARD.rescale, 1.0, "Probability of a random rescale."),
                f("scale_min", _STANDARD.scale_min, MAX_SCALE, "Smallest size of the photo in the frame (< 1: shrunk "
                  "onto a canvas).", low=MIN_SCALE),
                f("scale_max", _STANDARD.scale_max, MAX_SCALE, "Largest size (> 1: enlarged and cropped; at most 2).",
                  low=MIN_SCALE),
                io.Boolean.Input("scale_tags", default=True, tooltip="Caption tags of rescaled views ('far away', "
                                 "'very small', 'zoomed in', 'close up') (used when preset is 'custom')"),
                f("rotate", _STANDARD.rotate, 45.0, "Largest rotation in degrees.", step=0.5),
                f("brightness", _STANDARD.brightness, 0.5, "Largest relative brightness change."),
                f("contrast", _STANDARD.contrast, 0.5, "Largest relative contrast change."),
                f("saturation", _STANDARD.saturation, 1.0, "Largest relative saturation change (0 for concepts "
                                                           "defined by their colours)."),
                f("hue", _STANDARD.hue, 0.5, "Largest hue turn (0 keeps identity colours)."),
                f("background", _STANDARD.background, 1.0, "Probability of a new background behind the subject "
                                                            "(needs the trainer's mask input)."),
                io.Boolean.Input("shuffle_tags", default=False, tooltip="Shuffle comma-separated caption tags after "
                                 "the first keep_tags (used when preset is 'custom')"),
                io.Int.Input("keep_tags", default=1, min=0, max=32, tooltip="Leading tags never shuffled or dropped "
                                                                           "(used when preset is 'custom')"),
                f("tag_dropout", 0.0, 1.0, "Probability of dropping each other tag."),
                f("caption_dropout", 0.0, 1.0, "Probability of an empty caption (an unconditional sample)."),
                io.Int.Input("views", default=0, min=0, max=1000, tooltip="0: fresh views encoded every step; K: a pool "
                             "of K views per photo encoded once (for slow VAEs). Applies to every preset."),
                io.Image.Input("backgrounds", optional=True,
                               tooltip="Optional background photos to put the subjects on (default: generated textures)."),
            ],
            outputs=[AugmentSocket.Output(display_name="augmentation")],
        )

    @classmethod
    def execute(cls, preset, flip, rescale, scale_min, scale_max, scale_tags, rotate, brightness, contrast, saturation,
                hue, background, shuffle_tags, keep_tags, tag_dropout, caption_dropout, views,
                backgrounds=None) -> io.NodeOutput:
        if preset == CUSTOM:
            settings = AugmentSettings(flip=flip, rescale=rescale, scale_min=scale_min, scale_max=scale_max,
                                       scale_tags=scale_tags, rotate=rotate, brightness=brightness, contrast=contrast,
                                       saturation=saturation, hue=hue, background=background, shuffle_tags=shuffle_tags,
                                       keep_tags=keep_tags, tag_dropout=tag_dropout, caption_dropout=caption_dropout,
                                       views=views)
        else:
            settings = preset_settings(preset, views=views)
        if backgrounds is not None and backgrounds.shape[0] == 0:
            raise UserInputError("the backgrounds input is an empty batch: connect at least one image, or nothing "
                                 "to use generated textures")
        text = f"augmentation: {settings.describe()}"
        if backgrounds is not None:
            text += f"; {backgrounds.shape[0]} background photo(s)"
        return io.NodeOutput(Augmentation(settings, backgrounds), ui=ui.PreviewText(text))


class AugmentationPreview(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="FSP_AugmentationPreview",
            display_name="Augmentation preview",
            category="fewshot/train",
            description="The first views a trainer with these inputs will train on, exactly: the images, their subject "
                        "masks, their valid regions (where the loss looks) and their captions. Look before training.",
            is_input_list=True,
            inputs=[
                io.Image.Input("images", tooltip="The training photos (as connected to the trainer)."),
                AugmentSocket.Input("augmentation", tooltip="From the Augmentation node."),
                io.String.Input("instance_prompt", default="a photo of sks toy",
                                tooltip="The trainer's prompt (captions start from it)."),
                io.Int.Input("count", default=16, min=1, max=256, tooltip="How many views."),
                io.Int.Input("resolution", default=512, min=8, max=4096, step=8, tooltip="The trainer's resolution."),
                io.Int.Input("batch_size", default=1, min=1, max=64, tooltip="The trainer's batch size (view order)."),
                io.Int.Input("seed", default=0, min=0, max=2**31 - 1, tooltip="The trainer's seed."),
                io.Mask.Input("mask", optional=True, tooltip="The subject masks connected to the trainer."),
            ],
            outputs=[io.Image.Output(display_name="views"), io.Mask.Output(display_name="masks"),
                     io.Mask.Output(display_name="valid"), io.String.Output(display_name="captions")],
        )

    @classmethod
    def execute(cls, images, augmentation, instance_prompt, count, resolution, batch_size, seed,
                mask=None) -> io.NodeOutput:
        resolution = first(resolution)
        notes: list[str] = []
        pixels, masks = instance_pixels(images, mask, resolution, notes)
        settings, backgrounds = augmentation_parts(augmentation, resolution, masks is not None, notes)
        cfg = TrainConfig(instance_prompts=first(instance_prompt), resolution=resolution, batch_size=first(batch_size),
                          seed=first(seed), augment=settings)
        views = training_views(TrainData(pixels, None, masks, backgrounds), cfg, first(count))
        out = torch.stack([((p + 1) / 2).clamp(0, 1).movedim(0, -1) for p, _, _, _ in views])
        valid = torch.stack([v[0] for _, _, v, _ in views])
        subject = torch.stack([m[0] if m is not None else v[0] for _, m, v, _ in views])
        captions = "\n".join(c for _, _, _, c in views)
        return io.NodeOutput(out, subject, valid, captions, ui=ui.PreviewText("\n".join([*notes, captions])))
