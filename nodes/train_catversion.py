"""Node ``FSP_TrainCatVersion``: learn CatVersion K/V tokens (concatenated in the self-attention of the last CLIP
layers) from a few images, with the model frozen. Outputs a CLIP for the positive prompt; encode the negative
prompt with the original CLIP (the paper's adapter-free unconditional branch)."""

from __future__ import annotations

import logging

from comfy_api.latest import io, ui

from ..kernels.core.errors import UserInputError
from ..kernels.engine.captions import TEMPLATE_SETS
from ..kernels.engine.config import TrainConfig
from ..kernels.engine.data import TrainData
from ..kernels.methods import CatVersion, CatVersionSettings
from ..kernels.methods.catversion import parse_layer_spec
from .backend.catversion import apply_catversion
from .backend.images import loss_curve_image
from .backend.training import (check_checkpoint_inputs, checkpoint_inputs, checkpointing, first, instance_pixels, model_inputs, optional_inputs, preview_or_blank,
                               report_outputs, run_inputs, run_training, sample_preview, summary)
from .train_embedding import CUSTOM, training_prompts

log = logging.getLogger(__name__)

CatVersionSocket = io.Custom("FSP_CATVERSION")


class TrainCatVersion(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="FSP_TrainCatVersion",
            display_name="Train concept (CatVersion)",
            category="fewshot/train",
            description="Learn a concept as key/value tokens concatenated in the self-attention of the last CLIP "
                        "layers (CatVersion, Zhao et al. 2023); the model stays frozen. The tokens act on every "
                        "prompt: use the class word ('a photo of a toy on the beach') with the returned CLIP for the "
                        "positive prompt and the original CLIP for the negative one.",
            is_input_list=True,
            inputs=[
                *model_inputs(),
                io.String.Input("class_word", default="toy",
                                tooltip="The concept's class word, put into the training captions ('a photo of a toy')."),
                io.Combo.Input("templates", options=[*TEMPLATE_SETS, CUSTOM], default="object",
                               tooltip="Training captions with {} = the class word, or the custom prompt below."),
                io.String.Input("layers", default="",
                                tooltip="CLIP layers that get K/V tokens, e.g. '9,10,11' or '-3,-2,-1', or per encoder "
                                        "'clip_l:9,10,11;clip_g:-4,-3,-2'; empty = the last 3 layers whose output "
                                        "the model reads (the paper's default)."),
                io.Int.Input("tokens", default=1, min=1, max=16, tooltip="Learned K/V tokens per layer (paper: 1)."),
                *run_inputs(400, 1e-2),
                io.String.Input("prompt", default="a photo of a {}", optional=True,
                                tooltip="Custom training prompt ({} = the class word), used when templates is 'custom prompt'."),
                io.String.Input("preview_prompt", default="a photo of a {} on the beach", optional=True,
                                tooltip="Prompt of the preview image ({} = the class word)."),
                *optional_inputs(),
                *checkpoint_inputs(),
            ],
            outputs=[
                io.Clip.Output(display_name="CLIP", tooltip="The text encoder with the K/V tokens: for the positive prompt."),
                CatVersionSocket.Output(display_name="catversion", tooltip="The learned tokens, for Save CatVersion "
                                                                           "or the KV-concatenation loader."),
                *report_outputs("A sample of the preview prompt with the adapter."),
            ],
        )

    @classmethod
    def validate_inputs(cls, checkpoint_name=None, resume=None, **kw):
        return check_checkpoint_inputs(checkpoint_name, resume)

    @classmethod
    def execute(cls, model, clip, vae, images, class_word, templates, layers, tokens, steps, learning_rate,
                resolution, batch_size, seed, prompt=None, preview_prompt=None, mask=None,
                preview_steps=None, augmentation=None,
                checkpoint_every=None, checkpoint_name=None, resume=None) -> io.NodeOutput:
        model, clip, vae = first(model), first(clip), first(vae)
        word, resolution, preview_steps = first(class_word).strip(), first(resolution), first(preview_steps, 20)
        if not word:
            raise UserInputError("the class word is empty (e.g. 'toy')")
        method = CatVersion(CatVersionSettings(layers=parse_layer_spec(first(layers)), num_tokens=first(tokens)))
        cfg = TrainConfig(instance_prompts=training_prompts(first(templates), first(prompt, ""), word),
                          steps=first(steps), lr=first(learning_rate), resolution=resolution,
                          batch_size=first(batch_size), seed=first(seed))
        notes: list[str] = []
        pixels, masks = instance_pixels(images, mask, resolution, notes)
        result, artifacts, _ = run_training(model, clip, vae, method, TrainData(pixels, None, masks), cfg,
                                            augmentation=augmentation, notes=notes,
                                            checkpoints=checkpointing(checkpoint_every, checkpoint_name, resume))
        kv = artifacts["catversion"]
        out_clip = apply_catversion(clip, kv.tensors, kv.metadata, 1.0, "the trained CatVersion adapter")

        def preview():
            tokens = out_clip.tokenize((first(preview_prompt) or "a photo of a {}").replace("{}", word))
            return sample_preview(model, vae, out_clip, tokens, clip, cfg.seed, preview_steps, resolution)

        losses = loss_curve_image(result.losses, title=f"CatVersion loss over {result.steps} steps")
        layers_text = "; ".join(f"{enc} layers {kv.metadata[f'fsp.layers.{enc}']}" for enc in method.kv)
        text = summary(result, f"{method.settings.num_tokens} K/V token(s) in {layers_text}")
        log.info(text)
        return io.NodeOutput(out_clip, kv, losses, preview_or_blank(preview, preview_steps),
                             ui=ui.PreviewText("\n".join([text, *notes])))
