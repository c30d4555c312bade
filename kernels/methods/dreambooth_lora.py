"""DreamBooth with LoRA adapters (Ruiz et al. 2023, arXiv 2208.12242; Hu et al. 2021, arXiv 2106.09685): peft
LoRA layers on the denoiser's attention projections, optionally on the text encoders' self-attention; the loop
adds class-prior preservation (eq. 2) when class images are given."""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..adapters.lora import (ALL_LAYERS, TEXT_TARGETS, UNET_TARGETS, LoraWeights, attach_lora, check_rank, detach_lora,
                             read_lora)
from ..core.errors import UserInputError
from ..engine.config import TrainConfig
from ..engine.method import Artifact, Method, ParamGroup
from ..engine.seams import AdapterRoot
from ..formats.lora_file import lora_metadata, lora_tensors, to_kohya


@dataclass
class LoraSettings:
    rank: int = 4
    alpha: float | None = None
    train_text_encoder: bool = False
    text_lr: float | None = None
    unet_targets: tuple[str, ...] = UNET_TARGETS
    text_targets: tuple[str, ...] = TEXT_TARGETS
    dropout: float = 0.0

    def __post_init__(self):
        self.unet_targets, self.text_targets = tuple(self.unet_targets), tuple(self.text_targets)
        if self.rank < 1:
            raise UserInputError(f"rank must be at least 1, got {self.rank}")
        if self.text_lr is not None and not (math.isfinite(self.text_lr) and self.text_lr > 0):
            raise UserInputError(f"text-encoder learning rate must be a positive number, got {self.text_lr}")
        if not 0.0 <= self.dropout < 1.0:
            raise UserInputError(f"LoRA dropout must be in [0, 1), got {self.dropout}")
        if not self.unet_targets:
            raise UserInputError("no UNet layers to adapt (--unet-targets is empty)")
        if ALL_LAYERS in self.unet_targets and len(self.unet_targets) > 1:
            raise UserInputError(f"--unet-targets: '{ALL_LAYERS}' already means every layer; give it alone")

    @property
    def lora_alpha(self) -> float:
        return float(self.alpha if self.alpha is not None else self.rank)


class DreamBoothLora(Method):
    name = "dreambooth-lora"
    uses_prior = True

    def __init__(self, settings: LoraSettings | None = None):
        super().__init__(settings or LoraSettings())
        self.roots: list[AdapterRoot] = []

    @property
    def changes_text(self) -> bool:
        return self.settings.train_text_encoder

    def _roots(self, denoiser, text_encoder) -> list[AdapterRoot]:
        s = self.settings
        roots = list(denoiser.adapter_roots(s.unet_targets))
        if s.train_text_encoder:
            roots += text_encoder.adapter_roots(s.text_targets)
        for r in roots:
            if not r.paths:
                targets = s.unet_targets if r.prefix == "lora_unet_" else s.text_targets
                raise UserInputError(f"the model has no layers named {','.join(targets)}")
        return roots

    def preflight(self, denoiser, text_encoder) -> None:
        for r in self._roots(denoiser, text_encoder):
            try:
                check_rank(r.module, r.paths, self.settings.rank)
            except ValueError as e:
                raise UserInputError(str(e)) from None

    def attach(self, denoiser, text_encoder, cfg: TrainConfig) -> list[ParamGroup]:
        s = self.settings
        self.family = denoiser.family
        for r in self._roots(denoiser, text_encoder):
            for p in r.module.parameters():
                p.requires_grad_(False)
            self.roots.append(r)
            try:
                attach_lora(r.module, r.paths, s.rank, s.lora_alpha, s.dropout)
            except ValueError as e:
                raise UserInputError(str(e)) from None
        params = {f"{r.prefix}{n}": p for r in self.roots for n, p in r.module.named_parameters() if p.requires_grad}
        unet = {n: p for n, p in params.items() if n.startswith("lora_unet_")}
        text = {n: p for n, p in params.items() if not n.startswith("lora_unet_")}
        groups = [ParamGroup("unet", unet, cfg.lr)]
        if text:
            groups.append(ParamGroup("text", text, s.text_lr or cfg.lr))
        return groups

    def detach(self) -> None:
        for r in self.roots:
            detach_lora(r.module)
        self.roots = []

    def set_training(self, on: bool) -> None:
        for r in self.roots:
            r.module.train(on and self.settings.dropout > 0)

    def weights(self) -> dict[str, LoraWeights]:
        """The trained adapter, keyed by kohya names (canonical, diffusers-style module paths)."""
        out: dict[str, LoraWeights] = {}
        for r in self.roots:
            out.update(to_kohya(read_lora(r.module), r.prefix, r.canonical))
        return out

    def metadata(self, cfg: TrainConfig, steps: int, **info) -> dict[str, str]:
        s = self.settings
        return lora_metadata(family=self.family, method=self.name, rank=s.rank, alpha=s.lora_alpha, steps=steps,
                             instance_prompt=cfg.instance_prompt, class_prompt=cfg.class_prompt,
                             prior_weight=cfg.prior_weight if cfg.class_prompt else None, resolution=cfg.resolution,
                             seed=cfg.seed, train_text_encoder=s.train_text_encoder, unet_targets=s.unet_targets,
                             lr=cfg.lr, text_lr=(s.text_lr or cfg.lr) if s.train_text_encoder else None, **info)

    def export(self, cfg: TrainConfig, steps: int, **info) -> dict[str, Artifact]:
        return {"lora": Artifact("lora", lora_tensors(self.weights()), self.metadata(cfg, steps, **info))}
