"""Node ``FSP_TrainConcept``: DreamBooth-LoRA on the MODEL / CLIP / VAE already in the graph.

The engine (``kernels.engine.loop.Trainer`` with the ``DreamBoothLora`` method) trains on clones through the
ComfyUI seams of ``backend``; the outputs carry the trained adapter as ordinary weight patches.
"""

from __future__ import annotations

import logging

from comfy_api.latest import io, ui

from ..kernels.core.errors import UserInputError
from ..kernels.engine.config import DTYPES, TrainConfig
from ..kernels.engine.data import TrainData
from ..kernels.formats.lora_file import parse_lora_tensors
from ..kernels.adapters.lora import ALL_LAYERS, UNET_TARGETS
from ..kernels.methods import DreamBoothLora, LoraSettings
from .backend.adapter import Adapter, AdapterSocket, apply_adapter
from .backend.augmentation import augmentation_input
from .backend.images import images_to_training, loss_curve_image
from .backend.training import (check_checkpoint_inputs, checkpoint_inputs, checkpointing, first as _first,
                               instance_pixels, preview_or_blank, report_outputs, run_training, sample_preview, summary)

log = logging.getLogger(__name__)
#: the node's choices of UNet LoRA placement → the trainer's targets
LORA_LAYERS = {"attention": UNET_TARGETS, "all": (ALL_LAYERS,)}

class TrainConcept(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="FSP_TrainConcept",
            display_name="Train concept (DreamBooth-LoRA)",
            category="fewshot/train",
            description="Teach the model a new subject or style from 3-10 images (DreamBooth with a LoRA adapter, "
                        "optional class-prior preservation). Images of any size are scaled (shorter side) to the "
                        "training resolution and centre-cropped.",
            is_input_list=True,
            inputs=[
                io.Model.Input("model", tooltip="The base model to personalise (e.g. from Load Checkpoint). It is not changed."),
                io.Clip.Input("clip", tooltip="The text encoder of the same checkpoint."),
                io.Vae.Input("vae", tooltip="The VAE of the same checkpoint (encodes the training images)."),
                io.Image.Input("images", tooltip="3-10 photos of the concept. Several batches of different sizes may be "
                                                 "connected; each image is resized (shorter side) and centre-cropped."),
                io.String.Input("instance_prompt", default="a photo of sks toy",
                                tooltip="Prompt with a rare identifier for the concept, e.g. 'a photo of sks toy'."),
                io.Int.Input("steps", default=200, min=1, max=100000, tooltip="Optimizer steps."),
                io.Float.Input("learning_rate", default=1e-4, min=1e-7, max=1.0, step=1e-5,
                               tooltip="AdamW learning rate of the LoRA weights."),
                io.Int.Input("rank", default=4, min=1, max=256, tooltip="LoRA rank (size of the adapter)."),
                io.Boolean.Input("train_text_encoder", default=False,
                                 tooltip="Also put LoRA layers on the text encoder's self-attention."),
                io.Int.Input("resolution", default=512, min=8, max=4096, step=8,
                             tooltip="Training resolution in pixels (multiple of 8); the model's native size is best."),
                io.Int.Input("batch_size", default=1, min=1, max=64, tooltip="Instance images per step."),
                io.Int.Input("seed", default=0, min=0, max=2**31 - 1, control_after_generate=True,
                             tooltip="Seed of all training randomness."),
                io.Mask.Input("mask", optional=True,
                              tooltip="Optional loss mask (1 = subject): one for all images or one per image. A mask of "
                                      "another size than its image is resized to it."),
                io.Image.Input("class_images", optional=True,
                               tooltip="Optional class images for prior preservation, e.g. made by a KSampler from the "
                                       "class prompt in the same graph."),
                io.String.Input("class_prompt", default="", optional=True,
                                tooltip="Class prompt of the class images, e.g. 'a photo of a toy' (needed with class images)."),
                io.Float.Input("prior_weight", default=1.0, min=0.0, max=10.0, step=0.05, optional=True,
                               tooltip="λ of the prior-preservation loss."),
                *checkpoint_inputs(),
                io.Int.Input("preview_steps", default=20, min=0, max=200, optional=True,
                             tooltip="Sampling steps of the preview image (0 = no preview)."),
                augmentation_input(),
                io.Combo.Input("lora_layers", options=list(LORA_LAYERS), default="attention", optional=True,
                               tooltip="Where the UNet's LoRA goes: 'attention' = the attention projections (DreamBooth-"
                                       "LoRA's default), 'all' = every linear layer and convolution (kohya's LoCon, "
                                       "what ComfyUI's Train LoRA adapts): a larger adapter, slower steps."),
                io.Combo.Input("precision", options=list(DTYPES), default="auto", optional=True,
                               tooltip="Compute precision of training: 'auto' = bf16 autocast on GPUs that have it, fp32 "
                                       "on CPUs ('bf16' speeds up large models on CPUs with AMX); the LoRA weights stay fp32."),
            ],
            outputs=[
                io.Model.Output(display_name="MODEL", tooltip="The model with the trained adapter applied."),
                io.Clip.Output(display_name="CLIP", tooltip="The text encoder with the adapter applied (unchanged if not trained)."),
                AdapterSocket.Output(display_name="adapter", tooltip="The trained adapter, for Save adapter / Apply adapter."),
                *report_outputs("A sample of the instance prompt from the trained model."),
            ],
        )

    @classmethod
    def validate_inputs(cls, instance_prompt=None, class_prompt=None, checkpoint_name=None, resume=None, **kw):
        prompt = _first(instance_prompt)
        if isinstance(prompt, str) and not prompt.strip():
            return "the instance prompt is empty: write one with a rare identifier, e.g. 'a photo of sks toy'"
        return check_checkpoint_inputs(checkpoint_name, resume)

    @classmethod
    def execute(cls, model, clip, vae, images, instance_prompt, steps, learning_rate, rank, train_text_encoder,
                resolution, batch_size, seed, mask=None, class_images=None, class_prompt=None, prior_weight=None,
                checkpoint_every=None, checkpoint_name=None, resume=None, preview_steps=None, augmentation=None,
                lora_layers=None, precision=None) -> io.NodeOutput:
        model, clip, vae = _first(model), _first(clip), _first(vae)
        instance_prompt, class_prompt = _first(instance_prompt), (_first(class_prompt, "") or "").strip()
        resolution = _first(resolution)
        preview_steps = _first(preview_steps, 20)
        notes: list[str] = []  # what was done to the inputs, shown in the node's UI text
        pixels, masks = instance_pixels(images, mask, resolution, notes)
        cls_pixels = (images_to_training(class_images, resolution, notes)
                      if class_images and any(c is not None for c in class_images) else None)
        if cls_pixels is not None and not class_prompt:
            raise UserInputError("class images are connected but the class prompt is empty (e.g. 'a photo of a toy')")
        cfg = TrainConfig(
            instance_prompts=instance_prompt, class_prompt=class_prompt if cls_pixels is not None else None,
            prior_weight=_first(prior_weight, 1.0), steps=_first(steps), lr=_first(learning_rate), resolution=resolution,
            batch_size=_first(batch_size), seed=_first(seed), background_loss_weight=0.0,
            dtype=_first(precision, "auto") or "auto")
        layers = _first(lora_layers, "attention") or "attention"
        if layers not in LORA_LAYERS:
            raise UserInputError(f"lora_layers must be one of {', '.join(LORA_LAYERS)}, got {layers!r}")
        method = DreamBoothLora(LoraSettings(rank=_first(rank), train_text_encoder=bool(_first(train_text_encoder)),
                                             unet_targets=LORA_LAYERS[layers]))
        data = TrainData(pixels, cls_pixels, masks)

        result, artifacts, family = run_training(model, clip, vae, method, data, cfg,
                                                 augmentation=augmentation, notes=notes,
                                                 checkpoints=checkpointing(checkpoint_every, checkpoint_name, resume))
        lora = artifacts["lora"]
        adapter = Adapter(parse_lora_tensors(lora.tensors, "the trained adapter"), family, lora.metadata)
        out_model, out_clip = apply_adapter(model, clip, adapter, 1.0, 1.0, family)
        losses = loss_curve_image(result.losses, title=f"loss over {result.steps} steps ({result.seconds:.1f} s)")
        preview = preview_or_blank(lambda: sample_preview(out_model, vae, out_clip, out_clip.tokenize(cfg.instance_prompt),
                                                          out_clip, cfg.seed, preview_steps, resolution), preview_steps)
        text = summary(result, f"{len(adapter.weights)} adapted layers")
        log.info(text)
        return io.NodeOutput(out_model, out_clip, adapter, losses, preview, ui=ui.PreviewText("\n".join([text, *notes])))
