"""Node ``FSP_TrainEdLora``: learn a concept as an ED-LoRA (Mix-of-Show, Gu et al. 2023 §3.2): layer-wise token
embeddings (one set per cross-attention layer) and LoRA on the text encoder and the UNet. Outputs the MODEL/CLIP
with the concept applied (write the token in prompts), and the concept for Save concept or Fuse concepts."""

from __future__ import annotations

import logging

from comfy_api.latest import io, ui

from ..kernels.engine.captions import TEMPLATE_SETS
from ..kernels.engine.config import TrainConfig
from ..kernels.engine.data import TrainData
from ..kernels.methods import EdLora, EdLoraSettings, LoraSettings
from .backend.fusion import ConceptFile, ConceptSocket
from .backend.images import loss_curve_image
from .backend.layerwise import apply_layerwise_file
from .backend.training import (check_checkpoint_inputs, checkpoint_inputs, checkpointing, class_pixels, first, instance_pixels, model_inputs, optional_inputs, preview_or_blank,
                               report_outputs, run_inputs, run_training, sample_preview, summary)
from .train_embedding import CUSTOM, training_prompts

log = logging.getLogger(__name__)


class TrainEdLora(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="FSP_TrainEdLora",
            display_name="Train concept (ED-LoRA, for fusion)",
            category="fewshot/train",
            description="Learn a concept as Mix-of-Show's ED-LoRA: a token with its own embedding in every "
                        "cross-attention layer, plus LoRA on the text encoder and the UNet. Several such concepts "
                        "fuse into one model without bleeding (Fuse concepts). Write the token in prompts, e.g. "
                        "'a photo of a <toy1> on the beach'; use the returned CLIP for both prompts.",
            is_input_list=True,
            inputs=[
                *model_inputs(),
                io.String.Input("token", default="<toy1>",
                                tooltip="The concept's token; must not be a word the tokenizer knows. Each concept "
                                        "to be fused needs its own."),
                io.String.Input("init_word", default="toy",
                                tooltip="The class word the token's second word starts from (Mix-of-Show: random "
                                        "word + class word)."),
                io.Combo.Input("templates", options=[CUSTOM, *TEMPLATE_SETS], default=CUSTOM,
                               tooltip="Training captions: the custom prompt below, or a template set ({} = token)."),
                io.Int.Input("rank", default=4, min=1, max=256, tooltip="LoRA rank (Mix-of-Show: 4)."),
                io.Float.Input("embedding_lr", default=1e-3, min=1e-7, max=1.0, step=1e-5,
                               tooltip="Learning rate of the layer-wise embeddings (Mix-of-Show: 1e-3)."),
                io.Float.Input("text_lr", default=1e-5, min=1e-8, max=1.0, step=1e-6,
                               tooltip="Learning rate of the text encoder's LoRA (Mix-of-Show: 1e-5)."),
                *run_inputs(400, 1e-4),
                io.String.Input("prompt", default="a photo of a {}", optional=True,
                                tooltip="Custom training prompt ({} = the token)."),
                io.String.Input("preview_prompt", default="a photo of a {} on the beach", optional=True,
                                tooltip="Prompt of the preview image ({} = the token)."),
                io.Image.Input("class_images", optional=True, tooltip="Optional class images for prior preservation."),
                io.String.Input("class_prompt", default="", optional=True,
                                tooltip="Class prompt of the class images, e.g. 'a photo of a toy'."),
                *optional_inputs(),
                *checkpoint_inputs(),
            ],
            outputs=[
                io.Model.Output(display_name="MODEL", tooltip="The model with the concept's LoRA and per-layer routing."),
                io.Clip.Output(display_name="CLIP", tooltip="The text encoder with the concept's LoRA and token."),
                ConceptSocket.Output(display_name="concept", tooltip="The ED-LoRA, for Save concept or Fuse concepts."),
                *report_outputs("A sample of the preview prompt with the concept."),
            ],
        )

    @classmethod
    def validate_inputs(cls, checkpoint_name=None, resume=None, **kw):
        return check_checkpoint_inputs(checkpoint_name, resume)

    @classmethod
    def execute(cls, model, clip, vae, images, token, init_word, templates, rank, embedding_lr, text_lr, steps,
                learning_rate, resolution, batch_size, seed, prompt=None, preview_prompt=None, class_images=None,
                class_prompt=None, mask=None, preview_steps=None, augmentation=None,
                checkpoint_every=None, checkpoint_name=None, resume=None) -> io.NodeOutput:
        model, clip, vae = first(model), first(clip), first(vae)
        token, resolution, preview_steps = first(token).strip(), first(resolution), first(preview_steps, 20)
        method = EdLora(EdLoraSettings(
            token=token, init_word=(first(init_word) or "").strip() or None, embedding_lr=first(embedding_lr),
            lora=LoraSettings(rank=first(rank), train_text_encoder=True, text_lr=first(text_lr))))
        notes: list[str] = []
        pixels, masks = instance_pixels(images, mask, resolution, notes)
        cls_pixels, class_prompt = class_pixels(class_images, class_prompt, resolution, notes)
        cfg = TrainConfig(instance_prompts=training_prompts(first(templates), first(prompt, ""), token),
                          class_prompt=class_prompt, steps=first(steps),
                          lr=first(learning_rate), resolution=resolution, batch_size=first(batch_size), seed=first(seed))
        result, artifacts, _ = run_training(model, clip, vae, method, TrainData(pixels, cls_pixels, masks), cfg,
                                            augmentation=augmentation, notes=notes,
                                            checkpoints=checkpointing(checkpoint_every, checkpoint_name, resume))
        art = artifacts["ed-lora"]
        concept = ConceptFile(art.tensors, art.metadata, f"ED-LoRA {token}")
        out_model, out_clip = apply_layerwise_file(model, clip, art.tensors, art.metadata, 1.0, 1.0, concept.source)

        def preview():
            tokens = out_clip.tokenize((first(preview_prompt) or "a photo of a {}").replace("{}", token))
            return sample_preview(out_model, vae, out_clip, tokens, out_clip, cfg.seed, preview_steps, resolution)

        losses = loss_curve_image(result.losses, title=f"ED-LoRA loss over {result.steps} steps")
        layers = art.metadata.get("fsp.layers", "?")
        text = summary(result, f"{token}: 2 words in each of {layers} cross-attention layers, LoRA rank "
                               f"{method.settings.lora.rank} on text encoder and UNet")
        log.info(text)
        return io.NodeOutput(out_model, out_clip, concept, losses, preview_or_blank(preview, preview_steps),
                             ui=ui.PreviewText("\n".join([text, *notes])))
