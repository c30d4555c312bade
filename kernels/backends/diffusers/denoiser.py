"""Denoiser seam over a diffusers pipeline: UNet2DConditionModel + the pipeline's noise schedule + AutoencoderKL."""

from __future__ import annotations

import torch

from ...adapters.layerwise_context import routing_pre_hook
from ...adapters.lora import UNET_TARGETS, adapter_paths
from ...core.noise_schedule import NoiseSchedule
from ...engine.seams import AdapterRoot, Conditioning, Handle
from .pipeline import detect_family, vae_scale


class DiffusersDenoiser:
    def __init__(self, pipe, family: str | None = None):
        self.unet, self.vae = pipe.unet, pipe.vae
        self.family = family or detect_family(pipe)
        sched = pipe.scheduler
        self.schedule = NoiseSchedule(sched.alphas_cumprod, sched.config.get("prediction_type", "epsilon"))
        self.scaling_factor = float(self.vae.config.scaling_factor)
        self.shift_factor = float(getattr(self.vae.config, "shift_factor", None) or 0.0)
        self.vae_scale = vae_scale(pipe)

    @property
    def device(self) -> torch.device:
        return self.unet.device

    def add_noise(self, x0, noise, t):
        return self.schedule.add_noise(x0, noise, t)

    def target(self, x0, noise, t):
        return self.schedule.target(x0, noise, t)

    @torch.no_grad()
    def encode_images(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        dist = self.vae.encode(pixels.to(self.vae.device, self.vae.dtype)).latent_dist
        mean = (dist.mean - self.shift_factor) * self.scaling_factor
        return mean.float(), (dist.std * self.scaling_factor).float()

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents (as :meth:`encode_images` returns them) → pixels [N,3,H,W] in [-1,1]."""
        z = latents.to(self.vae.device, self.vae.dtype) / self.scaling_factor + self.shift_factor
        return self.vae.decode(z).sample.float().clamp(-1, 1).cpu()

    def predict(self, x_t: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        added = None
        if self.family == "sdxl":
            h, w = x_t.shape[-2] * self.vae_scale, x_t.shape[-1] * self.vae_scale
            # add_time_ids = (original size, crop top-left, target size): SDXL report §2.2
            time_ids = torch.tensor([h, w, 0, 0, h, w], dtype=x_t.dtype, device=x_t.device).expand(x_t.shape[0], 6)
            added = {"text_embeds": cond.pooled.to(x_t.dtype), "time_ids": time_ids}
        return self.unet(x_t, t.to(x_t.device), encoder_hidden_states=cond.context.to(x_t.dtype),
                         added_cond_kwargs=added).sample

    def adapter_roots(self, targets: tuple[str, ...] = UNET_TARGETS) -> list[AdapterRoot]:
        return [AdapterRoot("lora_unet_", self.unet, adapter_paths(self.unet, targets, within="attn"))]

    def set_gradient_checkpointing(self, on: bool) -> None:
        if on:
            self.unet.enable_gradient_checkpointing()
        else:
            self.unet.disable_gradient_checkpointing()

    def cross_attention_modules(self) -> list[torch.nn.Module]:
        """The UNet's ``attn2`` modules in forward order: down blocks, mid block, up blocks (the UNet registers its
        mid block last, so registration order alone is not forward order)."""
        stage = {"down_blocks": 0, "mid_block": 1, "up_blocks": 2}
        named = [(stage.get(n.split(".")[0], 3), i, m) for i, (n, m) in enumerate(self.unet.named_modules())
                 if n.endswith(".attn2")]
        return [m for _, _, m in sorted(named, key=lambda e: e[:2])]

    def cross_attention_layers(self) -> int:
        return len(self.cross_attention_modules())

    def install_layerwise_context(self, tokens: int) -> Handle:
        modules = self.cross_attention_modules()
        hooks = [m.register_forward_pre_hook(routing_pre_hook(i, len(modules), tokens), with_kwargs=True)
                 for i, m in enumerate(modules)]
        return Handle(lambda: [h.remove() for h in hooks])

