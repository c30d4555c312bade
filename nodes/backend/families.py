"""What kind of model a ComfyUI MODEL is, and how its UNet module paths are named in diffusers."""

from __future__ import annotations

import comfy.model_base
import comfy.utils

from ...kernels.core.errors import UserInputError


def model_family(model) -> str:
    """``sd1`` / ``sd2`` / ``sdxl`` for a ComfyUI MODEL (ModelPatcher); ValueError for other models."""
    bm = model.model
    if isinstance(bm, comfy.model_base.SDXL):
        return "sdxl"
    if type(bm) is not comfy.model_base.BaseModel or not hasattr(bm, "diffusion_model"):
        raise UserInputError(f"this trainer supports SD1.x, SD2.x and SDXL UNet models; got {type(bm).__name__}")
    # the architecture, not the schedule: an SD1 UNet fine-tuned for v-prediction (the demo model) stays sd1
    if bm.model_config.unet_config.get("context_dim") == 1024:
        return "sd2"
    return "sd1"


def prediction_type(model) -> str:
    t = model.model.model_type
    if t == comfy.model_base.ModelType.EPS:
        return "epsilon"
    if t == comfy.model_base.ModelType.V_PREDICTION:
        return "v_prediction"
    raise UserInputError(f"model type {t.name} is not supported for training (only eps and v-prediction)")


def ldm_to_diffusers_paths(unet_config: dict) -> dict[str, str]:
    """LDM module path (``input_blocks.1.1.transformer_blocks.0.attn1.to_q``) → diffusers module path
    (``down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q``), from ComfyUI's own table."""
    out = {}
    for diff, ldm in comfy.utils.unet_to_diffusers(unet_config).items():
        if diff.endswith(".weight") and ldm.endswith(".weight"):
            out[ldm[: -len(".weight")]] = diff[: -len(".weight")]
    return out


def clip_family(clip) -> str:
    """``sdxl`` (clip_l + clip_g), ``sd2`` (clip_h) or ``sd1`` (clip_l) for a ComfyUI CLIP."""
    csm = clip.cond_stage_model
    if hasattr(csm, "clip_g"):
        return "sdxl"
    if hasattr(csm, "clip_h"):
        return "sd2"
    if hasattr(csm, "clip_l"):
        return "sd1"
    raise UserInputError(f"this CLIP ({type(csm).__name__}) is not an SD1.x, SD2.x or SDXL text encoder")
