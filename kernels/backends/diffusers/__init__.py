"""The diffusers back end: the engine's seams over a diffusers pipeline (SD1.x, SD2.x v-prediction, SDXL)."""

from .denoiser import DiffusersDenoiser
from .pipeline import detect_family, load_pipeline, native_resolution, text_transformer, vae_scale
from .text_encoder import DiffusersTextEncoder

__all__ = ["DiffusersDenoiser", "DiffusersTextEncoder", "detect_family", "load_pipeline", "native_resolution",
           "text_transformer", "vae_scale"]
