"""The engine's Denoiser / TextEncoder seams (kernels/seams.py) over ComfyUI's MODEL, CLIP and VAE objects.

* Noise: ComfyUI works in k-diffusion form (x = x0 + σ·ε, ``apply_model`` returns the denoised x0). The
  engine works in DDPM form (x_t = √ᾱ x0 + √(1-ᾱ) ε with ᾱ = 1/(1+σ²)), so ``predict`` feeds
  x_t·√(1+σ²) at σ_t and converts the denoised x0 back into the model's own prediction type:
  ε̂ = (x − x̂0)/σ, v̂ = (ε̂ − σ·x̂0)/√(1+σ²) (Salimans & Ho 2022, §4; σ_data = 1). The engine's target is then
  exactly what the diffusers back end trains towards.
* Adapters: peft LoRA layers go *in place* on the torch modules ComfyUI's MODEL/CLIP share between clones;
  :class:`TrainingSession` loads a clone first, lets the engine attach them, and removes them again in
  ``finally`` (even on Cancel). Module paths are ComfyUI's LDM paths; :func:`kohya_to_diffusers_names`
  renames the trained adapter to the diffusers-style kohya keys the diffusers back end writes.
* CLIP: ``CLIPLayer.forward`` adds in place (``x += …``), which breaks back-propagation; when the text
  encoder is trained, the layers' ``forward`` is replaced on the *clone* through object patches.
"""

from __future__ import annotations

import contextlib
import logging

import comfy.model_base
import comfy.model_management
import comfy.utils
import torch
from torch import nn

from ..kernels.errors import UserInputError
from ..kernels.lora import detach_lora, lora_layers
from ..kernels.noise_schedule import NoiseSchedule
from ..kernels.seams import AdapterRoot, Conditioning

log = logging.getLogger(__name__)

UNET_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
TEXT_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")
# Text encoders inside comfy's cond_stage_model and their kohya prefixes, per family.
TEXT_PREFIXES = {"sd1": {"clip_l": "lora_te_", "clip_h": "lora_te_"}, "sd2": {"clip_h": "lora_te_", "clip_l": "lora_te_"},
                 "sdxl": {"clip_l": "lora_te1_", "clip_g": "lora_te2_"}}


def model_family(model) -> str:
    """``sd1`` / ``sd2`` / ``sdxl`` for a ComfyUI MODEL (ModelPatcher); ValueError for other models."""
    bm = model.model
    if isinstance(bm, comfy.model_base.SDXL):
        return "sdxl"
    if type(bm) is not comfy.model_base.BaseModel or not hasattr(bm, "diffusion_model"):
        raise UserInputError(f"this trainer supports SD1.x, SD2.x and SDXL UNet models; got {type(bm).__name__}")
    ctx = bm.model_config.unet_config.get("context_dim")
    if ctx == 1024 or bm.model_type == comfy.model_base.ModelType.V_PREDICTION:
        return "sd2"
    return "sd1"


def prediction_type(model) -> str:
    t = model.model.model_type
    if t == comfy.model_base.ModelType.EPS:
        return "epsilon"
    if t == comfy.model_base.ModelType.V_PREDICTION:
        return "v_prediction"
    raise UserInputError(f"model type {t.name} is not supported for training (only eps and v-prediction)")


def linear_paths(root: nn.Module, targets: tuple[str, ...], within: str) -> list[str]:
    return [n for n, m in root.named_modules()
            if isinstance(m, nn.Linear) and within in n and any(n == t or n.endswith("." + t) for t in targets)]


def ldm_to_diffusers_paths(unet_config: dict) -> dict[str, str]:
    """LDM module path (``input_blocks.1.1.transformer_blocks.0.attn1.to_q``) → diffusers module path
    (``down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q``), from ComfyUI's own table."""
    out = {}
    for diff, ldm in comfy.utils.unet_to_diffusers(unet_config).items():
        if diff.endswith(".weight") and ldm.endswith(".weight"):
            out[ldm[: -len(".weight")]] = diff[: -len(".weight")]
    return out


def kohya_to_diffusers_names(adapter: dict, unet_config: dict) -> dict:
    """Rename ``lora_unet_<ldm path>`` entries of a trained adapter to ``lora_unet_<diffusers path>``
    (the key names the diffusers back end writes); text-encoder entries already use HF CLIP names."""
    table = {"lora_unet_" + k.replace(".", "_"): "lora_unet_" + v.replace(".", "_")
             for k, v in ldm_to_diffusers_paths(unet_config).items()}
    out = {}
    for name, w in adapter.items():
        if name.startswith("lora_unet_"):
            if name not in table:
                raise UserInputError(f"no diffusers name for adapted layer {name}")
            name = table[name]
        out[name] = w
    return out


def _detach_inference_params(root: nn.Module) -> int:
    """Replace parameters/buffers created under ``torch.inference_mode`` (every node runs there, so a model
    loaded by a loader node has them) by ordinary tensors *with the same storage semantics*: autograd cannot
    save inference tensors for backward. Values are unchanged; returns how many were replaced."""
    n = 0
    for mod in root.modules():
        for name, p in list(mod._parameters.items()):
            if p is not None and p.is_inference():
                mod._parameters[name] = nn.Parameter(p.clone(), requires_grad=p.requires_grad)
                n += 1
        for name, b in list(mod._buffers.items()):
            if b is not None and b.is_inference():
                mod._buffers[name] = b.clone()
                n += 1
    return n


def release(patcher) -> None:
    """Unload one ModelPatcher from ComfyUI's model manager (undoing its weight and object patches)."""
    mm = comfy.model_management
    for lm in list(mm.current_loaded_models):
        if lm.model is patcher:
            lm.model_unload()
            mm.current_loaded_models.remove(lm)


def _clip_layer_forward(layer):
    """``CLIPLayer.forward`` without the in-place additions (same math), bound to one layer."""

    def forward(x, mask=None, optimized_attention=None):
        x = x + layer.self_attn(layer.layer_norm1(x), mask, optimized_attention)
        return x + layer.mlp(layer.layer_norm2(x))

    return forward


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

    def adapter_roots(self, targets: tuple[str, ...] = UNET_TARGETS) -> list[AdapterRoot]:
        unet = self.base.diffusion_model
        return [AdapterRoot("lora_unet_", unet, linear_paths(unet, targets, within="attn"))]

    def set_gradient_checkpointing(self, on: bool) -> None:
        if on:
            log.info("gradient checkpointing is not used by the ComfyUI back end")


class ComfyTextEncoder:
    """TextEncoder seam over a ComfyUI CLIP (SD1: clip_l; SD2: clip_h; SDXL: clip_l + clip_g with pooled)."""

    def __init__(self, clip, family: str):
        self.clip = clip
        self.family = family
        csm = clip.cond_stage_model
        self.encoders = {name: getattr(csm, name) for name in TEXT_PREFIXES[family] if hasattr(csm, name)}
        if family != "sdxl":
            self.encoders = dict(list(self.encoders.items())[:1])  # SD1/SD2 have exactly one (clip_l or clip_h)
        if not self.encoders:
            raise UserInputError(f"the CLIP does not match a {family} model (expected {'/'.join(TEXT_PREFIXES[family])})")

    def encode(self, prompts: list[str]) -> Conditioning:
        csm = self.clip.cond_stage_model
        csm.reset_clip_options()
        if self.clip.layer_idx is not None:
            csm.set_clip_options({"layer": self.clip.layer_idx})
        ctx, pooled = [], []
        for p in prompts:
            out = csm.encode_token_weights(self.clip.tokenize(p))
            ctx.append(out[0])
            pooled.append(out[1])
        pooled_t = torch.cat(pooled) if self.family == "sdxl" and pooled[0] is not None else None
        return Conditioning(torch.cat(ctx), pooled_t)

    def adapter_roots(self, targets: tuple[str, ...] = TEXT_TARGETS) -> list[AdapterRoot]:
        roots = []
        for name, enc in self.encoders.items():
            root = enc.transformer
            roots.append(AdapterRoot(TEXT_PREFIXES[self.family][name], root, linear_paths(root, targets, "self_attn")))
        return roots

    def object_patches(self) -> dict:
        """Non-in-place ``CLIPLayer.forward`` for every layer, keyed as ModelPatcher object patches."""
        patches = {}
        for name, enc in self.encoders.items():
            for i, layer in enumerate(enc.transformer.text_model.encoder.layers):
                patches[f"{name}.transformer.text_model.encoder.layers.{i}.forward"] = _clip_layer_forward(layer)
        return patches

    def set_gradient_checkpointing(self, on: bool) -> None:
        if on:
            log.info("gradient checkpointing is not used by the ComfyUI back end")


class TrainingSession(contextlib.AbstractContextManager):
    """Loads clones of MODEL (and CLIP) for training and guarantees that no LoRA layer or object patch is left
    on the shared torch modules afterwards, however the block ends (success, error, Cancel).

    Usage::

        with TrainingSession(model, clip, vae, train_text=True) as s:
            trainer = DreamBoothLoraTrainer(s.denoiser, s.text_encoder, data, cfg)   # attaches peft layers
            result = trainer.train(...)
    """

    def __init__(self, model, clip, vae, train_text: bool):
        self.model, self.clip = model.clone(), clip.clone()
        self.train_text = train_text
        self.denoiser = ComfyDenoiser(self.model, vae)
        self.text_encoder = ComfyTextEncoder(self.clip, self.denoiser.family)
        if train_text:
            for k, f in self.text_encoder.object_patches().items():
                self.clip.patcher.add_object_patch(k, f)
        self._roots: list[nn.Module] = []

    def __enter__(self):
        mm = comfy.model_management
        mm.load_models_gpu([self.model, self.clip.patcher], force_full_load=True)
        self._roots = [self.model.model.diffusion_model] + [e.transformer for e in self.text_encoder.encoders.values()]
        for r in self._roots:
            _detach_inference_params(r)
        return self

    def __exit__(self, *exc):
        removed = 0
        for r in self._roots:
            removed += detach_lora(r)
            r.__dict__.pop("peft_config", None)  # peft's bookkeeping attribute on the (shared) root module
            for p in r.parameters():
                p.requires_grad_(False)
        if self.train_text:
            release(self.clip.patcher)  # undoes the object patches on the shared CLIP modules
            for enc in self.text_encoder.encoders.values():
                for layer in enc.transformer.text_model.encoder.layers:
                    f = layer.__dict__.get("forward")
                    if f is not None and getattr(f, "__func__", None) is type(layer).forward:
                        del layer.__dict__["forward"]  # ComfyUI restores the bound method as an attribute
        log.debug("removed %d LoRA layers after training", removed)
        return False


def leftover_lora_layers(model=None, clip=None) -> int:
    """How many peft LoRA layers sit on the torch modules of ``model`` / ``clip`` (0 after a clean run)."""
    n = 0
    if model is not None:
        n += len(lora_layers(model.model.diffusion_model))
    if clip is not None:
        n += len(lora_layers(clip.cond_stage_model))
    return n
