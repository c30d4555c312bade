"""ED-LoRA (Mix-of-Show, Gu et al. NeurIPS 2023, §3.2): a concept as layer-wise token embeddings plus LoRA.

The placeholder stands for two words V = V_rand⁺ V_class⁺, each with its own embedding in every cross-attention
layer of the denoiser (the layer count is read from the model: 16 on SD1.x, 70 on SDXL). Initialisation as the
reference code: V_rand ~ N(0, 0.013²), V_class = the class word's embedding, copied to every layer. LoRA (rank 4,
scale 1) on the text encoders' self-attention and the denoiser's attention projections. Learning rates per part
(Mix-of-Show: embeddings 1e-3, text-encoder LoRA 1e-5, UNet LoRA 1e-4). Prompts are encoded once per layer and
each cross-attention layer reads its own context (:mod:`..adapters.layerwise_context`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from ..core.errors import UserInputError
from ..engine.config import TrainConfig
from ..engine.method import Artifact, Method, ParamGroup
from ..engine.seams import Handle
from ..formats.edlora_file import edlora_metadata, edlora_tensors
from ..formats.lora_file import lora_tensors
from .dreambooth_lora import DreamBoothLora, LoraSettings
from .textual_inversion import check_placeholder, initial_vectors, require_placeholder

#: σ of the random word's initial embedding (Mix-of-Show's reference code)
RANDOM_INIT_STD = 0.013


@dataclass
class EdLoraSettings:
    token: str = "<sks>"
    init_word: str | None = "toy"
    lora: LoraSettings = field(default_factory=lambda: LoraSettings(rank=4, train_text_encoder=True, text_lr=1e-5))
    embedding_lr: float = 1e-3

    def __post_init__(self):
        if not self.token or self.token != self.token.strip() or " " in self.token:
            raise UserInputError(f"the placeholder token must be one word without spaces, got {self.token!r}")
        if not (math.isfinite(self.embedding_lr) and self.embedding_lr > 0):
            raise UserInputError(f"the embedding learning rate must be a positive number, got {self.embedding_lr}")
        if not self.lora.train_text_encoder:
            raise UserInputError("ED-LoRA adapts the text encoder too (its LoRA is part of the method)")


def initial_layerwise_vectors(text_encoder, which: int, init_word: str | None, layers: int) -> torch.Tensor:
    """[layers, 2, width]: a random word (σ 0.013) and the class word (its tokens' mean; random without one),
    the same in every layer."""
    width = text_encoder.encoders[which].width
    rand = torch.randn(1, width) * RANDOM_INIT_STD
    cls = initial_vectors(text_encoder, which, init_word, 1) if init_word else torch.randn(1, width) * RANDOM_INIT_STD
    return torch.cat([rand, cls]).unsqueeze(0).repeat(layers, 1, 1)


class EdLora(Method):
    name = "ed-lora"
    uses_prior = True

    def __init__(self, settings: EdLoraSettings | None = None):
        super().__init__(settings or EdLoraSettings())
        self.lora = DreamBoothLora(self.settings.lora)
        self.vectors: dict[str, nn.Parameter] = {}
        self._handles: list[Handle] = []

    @property
    def changes_text(self) -> bool:
        return True

    def check_prompts(self, prompts: tuple[str, ...]) -> None:
        require_placeholder(prompts, self.settings.token)

    def preflight(self, denoiser, text_encoder) -> None:
        self.lora.preflight(denoiser, text_encoder)
        check_placeholder(text_encoder, self.settings.token)
        if denoiser.cross_attention_layers() < 1:
            raise UserInputError("this denoiser has no cross-attention layers for layer-wise tokens")
        for which in range(len(text_encoder.encoders)):
            initial_vectors(text_encoder, which, self.settings.init_word, 1)

    def attach(self, denoiser, text_encoder, cfg: TrainConfig) -> list[ParamGroup]:
        s = self.settings
        self.family = denoiser.family
        layers = denoiser.cross_attention_layers()
        with torch.no_grad():
            tokens = text_encoder.encode([""]).context.shape[1]
        groups = self.lora.attach(denoiser, text_encoder, cfg)
        self.vectors = {enc.name: nn.Parameter(initial_layerwise_vectors(text_encoder, i, s.init_word, layers))
                        for i, enc in enumerate(text_encoder.encoders)}
        self._handles = [denoiser.install_layerwise_context(tokens),
                         text_encoder.install_placeholders({s.token: list(self.vectors.values())})]
        return groups + [ParamGroup("embeddings", {f"edlora.{n}": v for n, v in self.vectors.items()}, s.embedding_lr)]

    def detach(self) -> None:
        for h in reversed(self._handles):
            h.remove()
        self._handles = []
        self.lora.detach()

    def set_training(self, on: bool) -> None:
        self.lora.set_training(on)

    def tensors(self) -> dict[str, torch.Tensor]:
        """{encoder name: [layers, 2, width]} (detached copies)."""
        return {name: v.detach().float().cpu().clone() for name, v in self.vectors.items()}

    def export(self, cfg: TrainConfig, steps: int, **info) -> dict[str, Artifact]:
        s = self.settings
        lora_meta = self.lora.metadata(cfg, steps, **info)
        meta = edlora_metadata(lora_meta, s.token, self.tensors())
        meta.update({"fsp.init_word": s.init_word or "", "fsp.embedding_lr": str(s.embedding_lr)})
        return {"ed-lora": Artifact("ed-lora", edlora_tensors(lora_tensors(self.lora.weights()), self.tensors()), meta)}
