"""Denoiser seam over a ComfyUI MODEL (ModelPatcher) + VAE.

ComfyUI works in k-diffusion form (x = x0 + σ·ε, ``apply_model`` returns the denoised x0). The engine works in
DDPM form (x_t = √ᾱ x0 + √(1-ᾱ) ε with ᾱ = 1/(1+σ²)), so ``predict`` feeds x_t·√(1+σ²) at σ_t and converts the
denoised x0 back into the model's own prediction type: ε̂ = (x − x̂0)/σ, v̂ = (ε̂ − σ·x̂0)/√(1+σ²) (Salimans & Ho
2022, §4; σ_data = 1). The engine's target is then exactly what the diffusers back end trains towards.
"""

from __future__ import annotations

import logging

import comfy.model_management
import torch

from ...kernels.adapters.lora import UNET_TARGETS, adapter_paths
from ...kernels.core.errors import UserInputError
from ...kernels.core.noise_schedule import NoiseSchedule
from ...kernels.engine.seams import AdapterRoot, Conditioning, Handle
from .families import ldm_to_diffusers_paths, model_family, prediction_type

log = logging.getLogger(__name__)


class ComfyDenoiser:
    """Denoiser seam over a ComfyUI MODEL (ModelPatcher) + VAE."""

    def __init__(self, model, vae):
        self.patcher = model
        self.vae = vae
        self.family = model_family(model)
        self.base = model.model
        self.sampling = model.get_model_object("model_sampling")
        self.schedule = NoiseSchedule.from_sigmas(self.sampling.sigmas.detach().cpu(), prediction_type(model))
        self.unet_config = self.base.model_config.unet_config
        to = model.model_options.get("transformer_options", {})
        self.transformer_options = to.copy()

    @property
    def device(self) -> torch.device:
        return self.patcher.load_device

    def add_noise(self, x0, noise, t):
        return self.schedule.add_noise(x0, noise, t)

    def target(self, x0, noise, t):
        return self.schedule.target(x0, noise, t)

    def _sigma(self, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return self.sampling.sigmas.to(like.device)[t.to(like.device).long()].to(torch.float32)

    def predict(self, x_t: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        sigma = self._sigma(t, x_t)
        s = sigma.view(-1, *([1] * (x_t.ndim - 1)))
        x = x_t.float() * torch.sqrt(1 + s ** 2)  # DDPM x_t → k-diffusion x = x0 + σ ε
        extra = {}
        if self.family == "sdxl":
            extra["y"] = self.adm(cond.pooled, x_t.shape)
        den = self.base.apply_model(x, sigma, c_crossattn=cond.context, transformer_options=self.transformer_options,
                                    **extra).float()
        eps = (x - den) / s
        if self.schedule.prediction_type == "epsilon":
            return eps
        return (eps - s * den) / torch.sqrt(1 + s ** 2)

    def adm(self, pooled: torch.Tensor, shape) -> torch.Tensor:
        """SDXL's ``y``: pooled text + (size, crop, target size) embeddings, as ComfyUI's sampler builds it."""
        if pooled is None:
            raise UserInputError("SDXL needs the pooled text embedding (CLIP-G)")
        h, w = shape[-2] * 8, shape[-1] * 8
        rows = [self.base.encode_adm(pooled_output=pooled[i:i + 1], width=w, height=h, target_width=w, target_height=h)
                for i in range(pooled.shape[0])]
        return torch.cat(rows).to(pooled.device)

    @torch.no_grad()
    def encode_images(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Pixels [N,3,H,W] in [-1,1] → (mean, std) of the latent distribution in the model's latent space."""
        comfy.model_management.throw_exception_if_processing_interrupted()  # Cancel between VAE batches
        vae = self.vae
        fsm = vae.first_stage_model
        comfy.model_management.load_models_gpu([vae.patcher])
        x = pixels.to(vae.device, vae.vae_dtype)
        h = fsm.encoder(x)
        if getattr(fsm, "quant_conv", None) is not None:
            h = fsm.quant_conv(h)
        mean, logvar = torch.chunk(h.float(), 2, dim=1)
        std = torch.exp(0.5 * torch.clamp(logvar, -30.0, 20.0))
        lf = self.base.latent_format
        scaled_mean = lf.process_in(mean)
        return scaled_mean.cpu(), (std * lf.scale_factor).cpu()

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents (as :meth:`encode_images` returns them) → pixels [N,3,H,W] in [-1,1]."""
        comfy.model_management.throw_exception_if_processing_interrupted()
        images = self.vae.decode(self.base.latent_format.process_out(latents.float()))  # [N,H,W,C] in [0,1]
        return (images.float().movedim(-1, 1)[:, :3] * 2 - 1).clamp(-1, 1).cpu()

    def adapter_roots(self, targets: tuple[str, ...] = UNET_TARGETS) -> list[AdapterRoot]:
        """ComfyUI's LDM module paths, with their diffusers names as canonical names (what files carry)."""
        unet = self.base.diffusion_model
        return [AdapterRoot("lora_unet_", unet, adapter_paths(unet, targets, within="attn"),
                            canonical=ldm_to_diffusers_paths(self.unet_config))]

    def cross_attention_layers(self) -> int:
        from .layerwise import cross_attention_order

        return len(cross_attention_order(self.patcher))

    def install_layerwise_context(self, tokens: int) -> Handle:
        """The layer-wise routing (an ``attn2_patch``) in the options this seam samples with; undone by the handle."""
        from .layerwise import cross_attention_order, layerwise_context_patch

        to = self.transformer_options
        before = to.get("patches")
        patches = {k: list(v) for k, v in (before or {}).items()}
        patches.setdefault("attn2_patch", []).append(layerwise_context_patch(cross_attention_order(self.patcher), tokens))
        to["patches"] = patches

        def undo():
            if before is None:
                to.pop("patches", None)
            else:
                to["patches"] = before

        return Handle(undo)

    def set_gradient_checkpointing(self, on: bool) -> None:
        if on:
            log.info("gradient checkpointing is not used by the ComfyUI back end")
