"""The two interfaces the training loop and the methods talk to (DESIGN.md "The engine's seams").

The engine never knows whether it runs on diffusers modules or inside ComfyUI: a back end provides a
``Denoiser`` and a ``TextEncoder``. Adapters are placed on the modules these name, by module path under their
``root`` modules; kohya prefixes say how those paths are written in LoRA files.

Text-side methods change *encoding*, not weights: placeholder tokens whose input embeddings are learned
(Textual Inversion) and learned key/value tokens concatenated in self-attention layers (CatVersion). A text
encoder installs both on request and returns a :class:`Handle` whose ``remove()`` undoes it, so every method
owns its undo.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import nn

from ..core.noise_schedule import NoiseSchedule

FAMILIES = ("sd1", "sd2", "sdxl")


@dataclass
class Conditioning:
    """Text conditioning: ``context`` [B, L, D] for cross-attention; ``pooled`` [B, P] (SDXL) or None."""

    context: torch.Tensor
    pooled: torch.Tensor | None = None

    def select(self, index: torch.Tensor) -> "Conditioning":
        return Conditioning(self.context[index], None if self.pooled is None else self.pooled[index])

    def to(self, device) -> "Conditioning":
        return Conditioning(self.context.to(device), None if self.pooled is None else self.pooled.to(device))

    def detached(self) -> "Conditioning":
        return Conditioning(self.context.detach().float(), None if self.pooled is None else self.pooled.detach().float())

    @staticmethod
    def cat(parts: list["Conditioning"]) -> "Conditioning":
        pooled = None if parts[0].pooled is None else torch.cat([p.pooled for p in parts])
        return Conditioning(torch.cat([p.context for p in parts]), pooled)


@dataclass
class AdapterRoot:
    """A module tree adapters may be placed in: its kohya key prefix, the paths of its adaptable layers and,
    where the back end's module paths differ from the diffusers names files use, the canonical name of each."""

    prefix: str
    module: nn.Module
    paths: list[str]
    canonical: dict[str, str] | None = None


@dataclass(frozen=True)
class EncoderInfo:
    """One CLIP text encoder as methods see it.

    ``name`` is the key files use (``clip_l`` for SD1.x and SDXL's first encoder, ``clip_h`` for SD2.x, ``clip_g``
    for SDXL's second); ``width`` the hidden size (= input-embedding and K/V width); ``num_layers`` the
    transformer layers; ``used_layers`` how many of them feed the conditioning (all, or one fewer when the model
    reads the penultimate layer: SD2.x, SDXL, "CLIP skip 2")."""

    name: str
    width: int
    num_layers: int
    heads: int
    used_layers: int


class Handle:
    """Undo for something installed on a model (placeholder embeddings, K/V tokens): ``remove()`` is idempotent."""

    def __init__(self, undo: Callable[[], None]):
        self._undo: Callable[[], None] | None = undo

    def remove(self) -> None:
        if self._undo is not None:
            undo, self._undo = self._undo, None
            undo()


def replace_forwards(replacements: list[tuple[nn.Module, Callable]]) -> Handle:
    """Give each module a new ``forward`` on the instance (the class is untouched); the handle puts back what was
    there before, in reverse order."""
    previous = [(m, m.__dict__.get("forward")) for m, _ in replacements]
    for m, fn in replacements:
        m.forward = fn

    def undo():
        for m, prev in reversed(previous):
            if prev is None:
                m.__dict__.pop("forward", None)
            else:
                m.forward = prev

    return Handle(undo)


#: learned K/V tokens per encoder (index into ``TextEncoder.encoders``) and layer: (k [n, D], v [n, D])
KVTokens = dict[int, dict[int, tuple[torch.Tensor, torch.Tensor]]]


class Denoiser(Protocol):
    family: str
    schedule: NoiseSchedule

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor: ...
    def target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor: ...
    def predict(self, x_t: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor: ...
    def encode_images(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Pixels [N,3,H,W] in [-1,1] → (mean, std) of the scaled latent distribution."""
        ...
    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents → pixels [N,3,H,W] in [-1,1] (the VAE decoder)."""
        ...
    def adapter_roots(self, targets: tuple[str, ...]) -> list[AdapterRoot]: ...
    def set_gradient_checkpointing(self, on: bool) -> None: ...

    def cross_attention_layers(self) -> int:
        """How many cross-attention layers the denoiser has (16 on SD1.x, 70 on SDXL: read from the model)."""
        ...

    def install_layerwise_context(self, tokens: int) -> Handle:
        """Route stacked layer-wise contexts [B, layers·tokens, D] (:mod:`..adapters.layerwise_context`): each
        cross-attention layer, in forward order, sees its own ``tokens``; other contexts pass unchanged."""
        ...


class TextEncoder(Protocol):
    family: str
    encoders: list[EncoderInfo]

    def encode(self, prompts: list[str]) -> Conditioning:
        """Conditioning of ``prompts`` with whatever placeholders and K/V tokens are installed."""
        ...

    def token_ids(self, text: str, which: int = 0) -> list[int]:
        """Token ids of ``text`` alone (no start/end tokens) in encoder ``which``'s vocabulary."""
        ...

    def input_embeddings(self, ids: list[int], which: int = 0) -> torch.Tensor:
        """The input (token) embeddings [len(ids), width] of encoder ``which`` (detached copies)."""
        ...

    def install_placeholders(self, vectors: dict[str, list[torch.Tensor]]) -> Handle:
        """Make ``encode`` replace each placeholder string in a prompt by its learned input embeddings:
        ``vectors[placeholder][which]`` is [n, width of encoder which], or [layers, n, width] for layer-wise
        tokens (ED-LoRA): then ``encode`` returns one context per cross-attention layer, stacked along the token
        axis (:mod:`..adapters.layerwise_context`)."""
        ...

    def install_kv_tokens(self, tokens: KVTokens, strength: float = 1.0) -> Handle:
        """Concatenate learned K/V tokens in the self-attention of the given layers (CatVersion)."""
        ...

    def adapter_roots(self, targets: tuple[str, ...]) -> list[AdapterRoot]: ...
    def set_gradient_checkpointing(self, on: bool) -> None: ...
