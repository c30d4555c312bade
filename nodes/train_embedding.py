"""Node ``FSP_TrainTextualInversion``: learn a placeholder token's input embeddings from a few images (Textual
Inversion; both of SDXL's encoders), with the model frozen. Its output is saved by ``FSP_SaveEmbedding`` under
``models/embeddings`` and then used in any prompt as ``embedding:NAME``."""

from __future__ import annotations

import logging

from comfy_api.latest import io, ui

from ..kernels.core.errors import UserInputError
from ..kernels.engine.captions import TEMPLATE_SETS, captions
from ..kernels.engine.config import TrainConfig
from ..kernels.engine.data import TrainData
from ..kernels.methods import TextualInversion, TextualInversionSettings
from .backend.families import model_family
from .backend.images import loss_curve_image
from .backend.text_encoder import ComfyTextEncoder
from .backend.training import (check_checkpoint_inputs, checkpoint_inputs, checkpointing, first, instance_pixels, model_inputs, optional_inputs, preview_or_blank,
                               report_outputs, run_inputs, run_training, sample_preview, summary)

log = logging.getLogger(__name__)

EmbeddingSocket = io.Custom("FSP_EMBEDDING")
CUSTOM = "custom prompt"


def token_inputs() -> list:
    """The placeholder token's inputs (Textual Inversion and pivotal tuning)."""
    return [io.String.Input("token", default="<sks>",
                            tooltip="Placeholder in the training prompts; must not be a word the tokenizer knows."),
            io.String.Input("init_word", default="toy",
                            tooltip="Word whose embedding the vectors start from (the class, e.g. 'toy', 'dog')."),
            io.Int.Input("num_vectors", default=1, min=1, max=75, tooltip="Vectors per token (more = more capacity).")]


def training_prompts(templates: str, prompt: str, subject: str) -> tuple[str, ...]:
    """The node's caption choice: a template set with {} = subject, or the user's prompt (with {} or the subject)."""
    if templates != CUSTOM:
        return captions(templates, subject)
    prompt = (prompt or "").strip()
    if not prompt:
        raise UserInputError("templates is 'custom prompt' but the prompt is empty (e.g. 'a photo of {}')")
    return (prompt.format(subject) if "{}" in prompt else prompt,)


class TrainTextualInversion(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="FSP_TrainTextualInversion",
            display_name="Train concept (Textual Inversion)",
            category="fewshot/train",
            description="Learn a new word for a subject or style from 3-10 images: the placeholder token's input "
                        "embeddings are trained, the model stays frozen (Gal et al. 2022). Save the result with "
                        "Save embedding and write embedding:NAME in any prompt.",
            is_input_list=True,
            inputs=[
                *model_inputs(),
                *token_inputs(),
                io.Combo.Input("templates", options=[*TEMPLATE_SETS, CUSTOM], default="object",
                               tooltip="Training captions: Textual Inversion's object or style templates with {} = "
                                       "the token, or the custom prompt below."),
                *run_inputs(400, 5e-3),
                io.String.Input("prompt", default="a photo of {}", optional=True,
                                tooltip="Custom training prompt ({} = the token), used when templates is 'custom prompt'."),
                io.String.Input("preview_prompt", default="a photo of {} on the beach", optional=True,
                                tooltip="Prompt of the preview image ({} = the token)."),
                *optional_inputs(),
                *checkpoint_inputs(),
            ],
            outputs=[
                EmbeddingSocket.Output(display_name="embedding", tooltip="The learned vectors, for Save embedding."),
                *report_outputs("A sample of the preview prompt with the new token."),
            ],
        )

    @classmethod
    def validate_inputs(cls, checkpoint_name=None, resume=None, **kw):
        return check_checkpoint_inputs(checkpoint_name, resume)

    @classmethod
    def execute(cls, model, clip, vae, images, token, init_word, num_vectors, templates, steps, learning_rate,
                resolution, batch_size, seed, prompt=None, preview_prompt=None, mask=None,
                preview_steps=None, augmentation=None,
                checkpoint_every=None, checkpoint_name=None, resume=None) -> io.NodeOutput:
        model, clip, vae = first(model), first(clip), first(vae)
        token, init_word, resolution = first(token).strip(), (first(init_word) or "").strip() or None, first(resolution)
        preview_steps = first(preview_steps, 20)
        method = TextualInversion(TextualInversionSettings(token=token, init_word=init_word,
                                                           num_vectors=first(num_vectors)))
        cfg = TrainConfig(instance_prompts=training_prompts(first(templates), first(prompt, ""), token),
                          steps=first(steps), lr=first(learning_rate), resolution=resolution,
                          batch_size=first(batch_size), seed=first(seed))
        notes: list[str] = []
        pixels, masks = instance_pixels(images, mask, resolution, notes)
        result, artifacts, family = run_training(model, clip, vae, method, TrainData(pixels, None, masks), cfg,
                                                 augmentation=augmentation, notes=notes,
                                            checkpoints=checkpointing(checkpoint_every, checkpoint_name, resume))
        embedding = artifacts["embedding"]

        def preview():
            text = ComfyTextEncoder(clip, model_family(model))
            text.install_placeholders({token: list(method.tensors().values())})
            tokens = text.tokenize((first(preview_prompt) or "a photo of {}").replace("{}", token))
            return sample_preview(model, vae, clip, tokens, clip, cfg.seed, preview_steps, resolution)

        losses = loss_curve_image(result.losses, title=f"Textual Inversion loss over {result.steps} steps")
        text = summary(result, f"{method.settings.num_vectors} vector(s) per encoder for {token}")
        log.info(text)
        return io.NodeOutput(embedding, losses, preview_or_blank(preview, preview_steps),
                             ui=ui.PreviewText("\n".join([text, *notes])))
