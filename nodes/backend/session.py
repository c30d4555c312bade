"""Training on ComfyUI objects: clones loaded for training, and ComfyUI left clean afterwards.

Methods attach their parts (peft LoRA layers, placeholder vectors, K/V tokens) in place on the torch modules
that ComfyUI's MODEL/CLIP clones share, and undo them themselves (``Trainer.close``). The session owns what is
ComfyUI's business: loading the clones, making their weights usable by autograd (nodes run under inference
mode), and, when the text side is trained, the non-in-place ``CLIPLayer.forward`` object patches on its CLIP
clone, which it releases again however the block ends (success, error, Cancel).

Usage::

    with TrainingSession(model, clip, vae, train_text=method.changes_text) as s, \\
            Trainer(s.denoiser, s.text_encoder, method, data, cfg) as trainer:
        result = trainer.train(...)
"""

from __future__ import annotations

import contextlib
import logging

import comfy.model_management
from torch import nn

from ...kernels.adapters.lora import lora_layers
from .denoiser import ComfyDenoiser
from .text_encoder import ComfyTextEncoder

log = logging.getLogger(__name__)


def detach_inference_params(root: nn.Module) -> int:
    """Replace parameters/buffers created under ``torch.inference_mode`` (every node runs there, so a model
    loaded by a loader node has them) by ordinary tensors: autograd cannot save inference tensors for backward.
    Values are unchanged; returns how many were replaced."""
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


class TrainingSession(contextlib.AbstractContextManager):
    """Clones of MODEL and CLIP, loaded for training, with the engine's seams over them."""

    def __init__(self, model, clip, vae, train_text: bool):
        self.model, self.clip = model.clone(), clip.clone()
        self.train_text = train_text
        self.denoiser = ComfyDenoiser(self.model, vae)
        self.text_encoder = ComfyTextEncoder(self.clip, self.denoiser.family)
        if train_text:
            for k, f in self.text_encoder.clip_layer_patches().items():
                self.clip.patcher.add_object_patch(k, f)
        self._roots: list[nn.Module] = []

    def __enter__(self):
        comfy.model_management.load_models_gpu([self.model, self.clip.patcher], force_full_load=True)
        self._roots = [self.model.model.diffusion_model] + [e.transformer for e in self.text_encoder.modules.values()]
        for r in self._roots:
            detach_inference_params(r)
        return self

    def __exit__(self, *exc):
        if self.train_text:
            release(self.clip.patcher)  # undoes the object patches on the shared CLIP modules
            for enc in self.text_encoder.modules.values():
                for layer in enc.transformer.text_model.encoder.layers:
                    f = layer.__dict__.get("forward")
                    if f is not None and getattr(f, "__func__", None) is type(layer).forward:
                        del layer.__dict__["forward"]  # ComfyUI restores the bound method as an attribute
        left = sum(len(lora_layers(r)) for r in self._roots)
        if left:
            log.error("%d LoRA layers are still attached after training (a method did not undo itself)", left)
        return False


def leftover_lora_layers(model=None, clip=None) -> int:
    """How many peft LoRA layers sit on the torch modules of ``model`` / ``clip`` (0 after a clean run)."""
    n = 0
    if model is not None:
        n += len(lora_layers(model.model.diffusion_model))
    if clip is not None:
        n += len(lora_layers(clip.cond_stage_model))
    return n
