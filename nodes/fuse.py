"""Node ``FSP_FuseConcepts``: several concepts in one MODEL + CLIP (Mix-of-Show gradient fusion, Gu et al. 2023
§3.3), or the plain-sum / weight-average baselines, for the stock sampler and for Save concept."""

from __future__ import annotations

import json
import logging
import time

import comfy.model_management
import comfy.utils
from comfy_api.latest import io, ui

from ..kernels.core.errors import UserInputError
from .backend.fusion import FUSIONS, ConceptFile, ConceptSocket, fuse_on_comfy

log = logging.getLogger(__name__)


class FuseConcepts(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="FSP_FuseConcepts",
            display_name="Fuse concepts (Mix-of-Show)",
            category="fewshot/adapter",
            description="Merge 2-4 concepts (ED-LoRA, DreamBooth-LoRA or pivotal) into one model without their "
                        "identities bleeding: 'gradient' solves, per layer, for the weights that reproduce each "
                        "concept's own layer outputs on its own inputs (recorded while encoding and sampling each "
                        "concept's prompts); 'sum' and 'average' are the plain LoRA merges, for comparison. Use the "
                        "CLIP for both prompts.",
            inputs=[
                io.Model.Input("model", tooltip="The base model the concepts were trained on."),
                io.Clip.Input("clip", tooltip="Its text encoder."),
                io.Latent.Input("latent", tooltip="The size to record sampling at (e.g. Empty Latent Image); the "
                                                  "batch size is not used."),
                ConceptSocket.Input("concept_1", tooltip="A concept (Train concept (ED-LoRA) or Load concept)."),
                ConceptSocket.Input("concept_2", tooltip="Another concept, with a different token."),
                io.Combo.Input("fusion", options=list(FUSIONS), default="gradient",
                               tooltip="gradient: Mix-of-Show's fusion; sum / average: plain LoRA merges."),
                io.Int.Input("samples", default=2, min=1, max=16,
                             tooltip="Images sampled per prompt while recording the UNet's inputs."),
                io.Int.Input("steps", default=20, min=1, max=200, tooltip="Sampling steps of the recording."),
                io.Float.Input("cfg", default=7.5, min=0.0, max=30.0, step=0.1, tooltip="CFG of the recording."),
                io.Int.Input("seed", default=0, min=0, max=2**31 - 1, tooltip="Seed of the recording's noise."),
                io.Int.Input("save_rank", default=0, min=0, max=1024,
                             tooltip="Rank of the weight difference kept for Save concept (0 = the summed concept "
                                     "ranks: exact). The outputs MODEL / CLIP use the exact difference."),
                ConceptSocket.Input("concept_3", optional=True, tooltip="A third concept."),
                ConceptSocket.Input("concept_4", optional=True, tooltip="A fourth concept."),
            ],
            outputs=[
                io.Model.Output(display_name="MODEL", tooltip="The model with every concept fused in."),
                io.Clip.Output(display_name="CLIP", tooltip="The text encoder with every concept's token."),
                ConceptSocket.Output(display_name="fused", tooltip="The fused concepts, for Save concept."),
            ],
        )

    @classmethod
    def execute(cls, model, clip, latent, concept_1, concept_2, fusion, samples, steps, cfg, seed, save_rank,
                concept_3=None, concept_4=None) -> io.NodeOutput:
        sources = [c for c in (concept_1, concept_2, concept_3, concept_4) if c is not None]
        if "samples" not in latent:
            raise UserInputError("the latent input carries no samples (connect an Empty Latent Image)")
        pbar = comfy.utils.ProgressBar(2 * len(sources))

        def progress(stage: str, done: int, total: int) -> None:
            comfy.model_management.throw_exception_if_processing_interrupted()  # ComfyUI's Cancel
            pbar.update_absolute(done + (total if stage == "unet" else 0), 2 * total)

        start = time.perf_counter()
        fused = fuse_on_comfy(model, clip, sources, fusion, latent=latent["samples"][:1].float(), samples=samples,
                              sample_steps=steps, cfg=cfg, seed=seed, rank=save_rank, progress=progress)
        tokens = ", ".join(json.loads(fused.metadata["fsp.tokens"])) or "no tokens"
        text = (f"fused {len(sources)} concepts ({fusion}; {len(fused.differences)} layers; {tokens}) in "
                f"{time.perf_counter() - start:.1f} s")
        log.info(text)
        out = ConceptFile(fused.tensors, fused.metadata, f"fused ({', '.join(s.source for s in sources)})")
        return io.NodeOutput(fused.model, fused.clip, out, ui=ui.PreviewText(text))
