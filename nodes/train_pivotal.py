"""Node ``FSP_TrainPivotal``: pivotal tuning, i.e. Textual Inversion and DreamBooth-LoRA trained together in one
run: the placeholder token's embeddings and LoRA layers, each at its own learning rate (optionally with class-prior
preservation). Outputs the MODEL/CLIP with the LoRA applied, the LoRA (Save adapter) and the embedding (Save
embedding); prompts then write ``embedding:NAME`` where the token was."""

from __future__ import annotations

import logging

from comfy_api.latest import io, ui

from ..kernels.engine.captions import TEMPLATE_SETS
from ..kernels.engine.config import TrainConfig
from ..kernels.engine.data import TrainData
from ..kernels.formats.lora_file import parse_lora_tensors
from ..kernels.methods import LoraSettings, PivotalSettings, PivotalTuning, TextualInversionSettings
from .backend.adapter import Adapter, AdapterSocket, apply_adapter
from .backend.images import loss_curve_image
from .backend.text_encoder import ComfyTextEncoder
from .backend.training import (check_checkpoint_inputs, checkpoint_inputs, checkpointing, class_pixels, first, instance_pixels, model_inputs, optional_inputs, preview_or_blank,
                               report_outputs, run_inputs, run_training, sample_preview, summary)
from .train_embedding import CUSTOM, EmbeddingSocket, token_inputs, training_prompts

log = logging.getLogger(__name__)


class TrainPivotal(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="FSP_TrainPivotal",
            display_name="Train concept (pivotal: Textual Inversion + LoRA)",
            category="fewshot/train",
            description="Pivotal tuning: learn a new token's embedding and a DreamBooth-LoRA together. Save the LoRA "
                        "with Save adapter and the embedding with Save embedding; prompts then use embedding:NAME "
                        "where the token was.",
            is_input_list=True,
            inputs=[
                *model_inputs(),
                *token_inputs(),
                io.Combo.Input("templates", options=[CUSTOM, *TEMPLATE_SETS], default=CUSTOM,
                               tooltip="Training captions: the custom prompt below, or Textual Inversion's templates."),
                io.Int.Input("rank", default=4, min=1, max=256, tooltip="LoRA rank."),
                io.Boolean.Input("train_text_encoder", default=False,
                                 tooltip="Also put LoRA layers on the text encoder's self-attention."),
                io.Float.Input("embedding_lr", default=5e-3, min=1e-7, max=1.0, step=1e-5,
                               tooltip="Learning rate of the token embeddings (the LoRA uses learning_rate)."),
                *run_inputs(400, 1e-4),
                io.String.Input("prompt", default="a photo of {} toy", optional=True,
                                tooltip="Custom training prompt ({} = the token)."),
                io.String.Input("preview_prompt", default="a photo of {} toy on the beach", optional=True,
                                tooltip="Prompt of the preview image ({} = the token)."),
                io.Image.Input("class_images", optional=True, tooltip="Optional class images for prior preservation."),
                io.String.Input("class_prompt", default="", optional=True,
                                tooltip="Class prompt of the class images, e.g. 'a photo of a toy'."),
                *optional_inputs(),
                *checkpoint_inputs(),
            ],
            outputs=[
                io.Model.Output(display_name="MODEL", tooltip="The model with the LoRA applied."),
                io.Clip.Output(display_name="CLIP", tooltip="The text encoder with the LoRA applied (unchanged if not trained)."),
                AdapterSocket.Output(display_name="adapter", tooltip="The LoRA, for Save adapter / Apply adapter."),
                EmbeddingSocket.Output(display_name="embedding", tooltip="The token's vectors, for Save embedding."),
                *report_outputs("A sample of the preview prompt with the LoRA and the token."),
            ],
        )

    @classmethod
    def validate_inputs(cls, checkpoint_name=None, resume=None, **kw):
        return check_checkpoint_inputs(checkpoint_name, resume)

    @classmethod
    def execute(cls, model, clip, vae, images, token, init_word, num_vectors, templates, rank, train_text_encoder,
                embedding_lr, steps, learning_rate, resolution, batch_size, seed, prompt=None, preview_prompt=None,
                class_images=None, class_prompt=None, mask=None, preview_steps=None, augmentation=None,
                checkpoint_every=None, checkpoint_name=None, resume=None) -> io.NodeOutput:
        model, clip, vae = first(model), first(clip), first(vae)
        token, resolution, preview_steps = first(token).strip(), first(resolution), first(preview_steps, 20)
        method = PivotalTuning(PivotalSettings(
            lora=LoraSettings(rank=first(rank), train_text_encoder=bool(first(train_text_encoder))),
            embedding=TextualInversionSettings(token=token, init_word=(first(init_word) or "").strip() or None,
                                               num_vectors=first(num_vectors), lr=first(embedding_lr))))
        notes: list[str] = []
        pixels, masks = instance_pixels(images, mask, resolution, notes)
        cls_pixels, class_prompt = class_pixels(class_images, class_prompt, resolution, notes)
        cfg = TrainConfig(instance_prompts=training_prompts(first(templates), first(prompt, ""), token),
                          class_prompt=class_prompt, steps=first(steps),
                          lr=first(learning_rate), resolution=resolution, batch_size=first(batch_size), seed=first(seed))
        result, artifacts, family = run_training(model, clip, vae, method, TrainData(pixels, cls_pixels, masks), cfg,
                                                 augmentation=augmentation, notes=notes,
                                            checkpoints=checkpointing(checkpoint_every, checkpoint_name, resume))
        lora = artifacts["lora"]
        adapter = Adapter(parse_lora_tensors(lora.tensors, "the trained LoRA"), family, lora.metadata)
        out_model, out_clip = apply_adapter(model, clip, adapter, 1.0, 1.0, family)

        def preview():
            text = ComfyTextEncoder(out_clip, family)
            text.install_placeholders({token: list(method.ti.tensors().values())})
            tokens = text.tokenize((first(preview_prompt) or "a photo of {}").replace("{}", token))
            return sample_preview(out_model, vae, out_clip, tokens, out_clip, cfg.seed, preview_steps, resolution)

        losses = loss_curve_image(result.losses, title=f"pivotal tuning loss over {result.steps} steps")
        text = summary(result, f"{len(adapter.weights)} LoRA layers and {method.settings.embedding.num_vectors} "
                               f"vector(s) per encoder for {token}")
        log.info(text)
        return io.NodeOutput(out_model, out_clip, adapter, artifacts["embedding"], losses,
                             preview_or_blank(preview, preview_steps), ui=ui.PreviewText("\n".join([text, *notes])))
