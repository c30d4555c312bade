"""What a training method is to the loop (DESIGN.md "methods as plug-ins").

A method owns where it attaches (denoiser, text encoder, both), its trainable parameters in named groups with
their learning rates, its own undo (:meth:`Method.detach`), how it changes encoding (placeholder tokens, K/V
tokens), its files and their metadata, and its settings. The loop (:mod:`.loop`) owns steps, accumulation,
schedules, SNR weighting, checkpoints, resume, cancel and NaN handling, once for all methods.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import ClassVar

import torch

from .config import TrainConfig
from .seams import Denoiser, TextEncoder


@dataclass
class ParamGroup:
    """Trainable tensors under stable names (checkpoint keys), with their learning rate and weight decay
    (None: the loop's)."""

    name: str
    params: dict[str, torch.nn.Parameter]
    lr: float
    weight_decay: float | None = None


@dataclass
class Artifact:
    """One file a method writes: its kind (``lora``, ``embedding``, ``catversion``, ``pivotal``), tensors and string
    metadata."""

    kind: str
    tensors: dict[str, torch.Tensor]
    metadata: dict[str, str] = field(default_factory=dict)


class Method(abc.ABC):
    """A personalization method as a plug-in of the training loop."""

    #: name on the command line and in file metadata (``fsp.method``)
    name: ClassVar[str]
    #: True when the method may use class images (prior preservation needs a trained denoiser)
    uses_prior: ClassVar[bool] = True

    def __init__(self, settings):
        self.settings = settings
        self.family: str | None = None

    def preflight(self, denoiser: Denoiser, text_encoder: TextEncoder) -> None:
        """Refuse settings this model cannot take (rank, layers, placeholder) before any slow work; attaches nothing."""

    @abc.abstractmethod
    def attach(self, denoiser: Denoiser, text_encoder: TextEncoder, cfg: TrainConfig) -> list[ParamGroup]:
        """Put the trainable parts on the model(s); return them grouped. May draw from the global RNG, which
        the loop has seeded."""

    @abc.abstractmethod
    def detach(self) -> None:
        """Undo :meth:`attach` completely (also after a partial attach); calling it twice is harmless."""

    @property
    @abc.abstractmethod
    def changes_text(self) -> bool:
        """Whether the text conditioning depends on trained parameters (then it is not cached)."""

    @property
    def gradient_checkpointing_text(self) -> bool:
        """Whether gradient checkpointing should also cover the text encoder."""
        return self.changes_text

    def check_prompts(self, prompts: tuple[str, ...]) -> None:
        """Refuse instance prompts the method cannot train on (e.g. without its placeholder)."""

    def set_training(self, on: bool) -> None:
        """Switch the attached modules between train and eval behaviour (dropout)."""

    @abc.abstractmethod
    def export(self, cfg: TrainConfig, steps: int, **info: str) -> dict[str, Artifact]:
        """The files of the trained method by part name (``info``: base model name, trainer, final loss…)."""
