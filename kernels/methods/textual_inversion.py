"""Textual Inversion (Gal et al. 2022, arXiv 2208.01618, §3): a placeholder token S* whose n input embeddings are
learned (eq. 2: v* = argmin_v E‖ε − ε_θ(z_t, t, c_θ(y with S*→v))‖²); the model itself stays frozen. On SDXL
each text encoder gets its own vectors (clip_l and clip_g)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from ..core.errors import UserInputError
from ..engine.config import TrainConfig
from ..engine.method import Artifact, Method, ParamGroup
from ..engine.seams import Handle, TextEncoder
from ..formats.embedding_file import embedding_metadata, embedding_tensors


@dataclass
class TextualInversionSettings:
    token: str = "<sks>"
    init_word: str | None = "toy"
    num_vectors: int = 1
    lr: float | None = None  # None: the loop's learning rate

    def __post_init__(self):
        if self.num_vectors < 1:
            raise UserInputError(f"--num-vectors must be at least 1, got {self.num_vectors}")
        if not self.token or self.token != self.token.strip() or " " in self.token:
            raise UserInputError(f"the placeholder token must be one word without spaces, got {self.token!r}")
        if self.init_word is not None and not self.init_word.strip():
            raise UserInputError("--init-word is empty")
        if self.lr is not None and not (math.isfinite(self.lr) and self.lr > 0):
            raise UserInputError(f"the embedding learning rate must be a positive number, got {self.lr}")


def check_placeholder(text_encoder: TextEncoder, token: str) -> None:
    """Policy: refuse a placeholder that the vocabulary already knows as one word (it would silently replace that
    word in every prompt), and suggest a fresh string."""
    for which, enc in enumerate(text_encoder.encoders):
        ids = text_encoder.token_ids(token, which)
        if len(ids) == 1:
            raise UserInputError(f"placeholder token {token!r} is already a word of the {enc.name} vocabulary "
                                 f"(token id {ids[0]}); choose a string it does not know, e.g. '<{token.strip('<>')}>'")


def require_placeholder(prompts: tuple[str, ...], token: str) -> None:
    """Refuse instance prompts without the placeholder (nothing would train it)."""
    missing = [p for p in prompts if token not in p]
    if missing:
        raise UserInputError(f"instance prompt {missing[0]!r} does not contain the placeholder {token!r}")


def initial_vectors(text_encoder: TextEncoder, which: int, init_word: str | None, n: int) -> torch.Tensor:
    """[n, width]: the init word's token embeddings (in order when it has n tokens, else their mean repeated),
    or small random vectors (σ = 0.017, CLIP's typical embedding scale) without one."""
    width = text_encoder.encoders[which].width
    if init_word is None:
        return torch.randn(n, width) * 0.017
    ids = text_encoder.token_ids(init_word, which)
    if not ids:
        raise UserInputError(f"--init-word {init_word!r} gives no tokens")
    emb = text_encoder.input_embeddings(ids, which)
    return emb.clone() if emb.shape[0] == n else emb.mean(0, keepdim=True).repeat(n, 1)


class TextualInversion(Method):
    name = "textual-inversion"
    uses_prior = False

    def __init__(self, settings: TextualInversionSettings | None = None):
        super().__init__(settings or TextualInversionSettings())
        self.vectors: dict[str, nn.Parameter] = {}
        self._handle: Handle | None = None

    @property
    def changes_text(self) -> bool:
        return True

    def check_prompts(self, prompts: tuple[str, ...]) -> None:
        require_placeholder(prompts, self.settings.token)

    def preflight(self, denoiser, text_encoder) -> None:
        check_placeholder(text_encoder, self.settings.token)
        for which in range(len(text_encoder.encoders)):
            initial_vectors(text_encoder, which, self.settings.init_word, self.settings.num_vectors)

    def attach(self, denoiser, text_encoder, cfg: TrainConfig) -> list[ParamGroup]:
        s = self.settings
        self.family = text_encoder.family
        self.vectors = {enc.name: nn.Parameter(initial_vectors(text_encoder, i, s.init_word, s.num_vectors))
                        for i, enc in enumerate(text_encoder.encoders)}
        self._handle = text_encoder.install_placeholders({s.token: list(self.vectors.values())})
        return [ParamGroup("embeddings", {f"ti.{name}": v for name, v in self.vectors.items()}, s.lr or cfg.lr)]

    def detach(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    def tensors(self) -> dict[str, torch.Tensor]:
        """{encoder name: [n, width]} (detached copies)."""
        return {name: v.detach().float().cpu().clone() for name, v in self.vectors.items()}

    def metadata(self, cfg: TrainConfig, steps: int, **info) -> dict[str, str]:
        s = self.settings
        return embedding_metadata(family=self.family, token=s.token, vectors=self.tensors(), steps=steps,
                                  method=self.name, init_word=s.init_word, instance_prompt=cfg.instance_prompt,
                                  resolution=cfg.resolution, seed=cfg.seed, lr=s.lr or cfg.lr, **info)

    def export(self, cfg: TrainConfig, steps: int, **info) -> dict[str, Artifact]:
        return {"embedding": Artifact("embedding", embedding_tensors(self.tensors(), self.family),
                                      self.metadata(cfg, steps, **info))}
