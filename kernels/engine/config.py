"""Settings of the training loop, shared by every method (methods carry their own settings); checked when built
(bad values raise ``UserInputError``)."""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass

from ..augment.settings import AugmentSettings
from ..core.errors import UserInputError

LR_SCHEDULES = ("constant", "linear", "cosine")
DTYPES = ("auto", "fp32", "bf16", "fp16")


@dataclass
class TrainConfig:
    """``instance_prompts``: one prompt, or several drawn at random per sample (caption templates);
    ``class_prompt`` with class images turns on prior preservation (DreamBooth eq. 2) for methods that train the
    denoiser. ``lr`` is the base learning rate; a method may give some of its parameter groups their own.
    ``augment``: the views the instance photos are seen through (kernels/augment); with it, instance flips are
    the augmentation's and ``random_flip`` mirrors class images only."""

    instance_prompts: tuple[str, ...] | str
    class_prompt: str | None = None
    prior_weight: float = 1.0
    steps: int = 400
    batch_size: int = 1
    grad_accum: int = 1
    lr: float = 1e-4
    lr_schedule: str = "constant"
    warmup_steps: int = 0
    weight_decay: float = 1e-2
    max_grad_norm: float = 1.0
    snr_gamma: float | None = None
    noise_offset: float = 0.0
    random_flip: float = 0.0
    background_loss_weight: float = 0.0
    gradient_checkpointing: bool = False
    resolution: int = 512
    seed: int = 0
    checkpoint_every: int = 0
    dtype: str = "auto"
    augment: AugmentSettings | None = None

    def __post_init__(self):
        if isinstance(self.instance_prompts, str):
            self.instance_prompts = (self.instance_prompts,)
        self.instance_prompts = tuple(self.instance_prompts)
        if not self.instance_prompts or any(not p or not p.strip() for p in self.instance_prompts):
            raise UserInputError("the instance prompt is empty (e.g. --prompt \"a photo of sks toy\")")
        if self.class_prompt is not None and not self.class_prompt.strip():
            raise UserInputError("the class prompt is empty (e.g. --class-prompt \"a photo of a toy\")")
        checks = [
            (self.steps >= 1, f"steps must be at least 1, got {self.steps}"),
            (self.batch_size >= 1, f"batch size must be at least 1, got {self.batch_size}"),
            (self.grad_accum >= 1, f"gradient accumulation must be at least 1, got {self.grad_accum}"),
            (math.isfinite(self.lr) and self.lr > 0, f"learning rate must be a positive number, got {self.lr}"),
            (math.isfinite(self.prior_weight) and self.prior_weight >= 0,
             f"prior weight must be a number ≥ 0, got {self.prior_weight}"),
            (self.lr_schedule in LR_SCHEDULES, f"lr schedule must be one of {LR_SCHEDULES}, got {self.lr_schedule!r}"),
            (0 <= self.warmup_steps, f"warmup steps must be ≥ 0, got {self.warmup_steps}"),
            (0.0 <= self.random_flip <= 1.0, f"flip probability must be in [0, 1], got {self.random_flip}"),
            (0.0 <= self.background_loss_weight <= 1.0,
             f"background loss weight must be in [0, 1], got {self.background_loss_weight}"),
            (self.resolution >= 8 and self.resolution % 8 == 0, f"resolution must be a multiple of 8, got {self.resolution}"),
            (self.snr_gamma is None or (math.isfinite(self.snr_gamma) and self.snr_gamma > 0),
             f"min-SNR gamma must be a positive number, got {self.snr_gamma}"),
            (self.checkpoint_every >= 0, f"checkpoint interval must be ≥ 0, got {self.checkpoint_every}"),
            (self.dtype in DTYPES, f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}"),
        ]
        for ok, message in checks:
            if not ok:
                raise UserInputError(message)

    @property
    def instance_prompt(self) -> str:
        """The first (or only) instance prompt: what previews and file metadata show."""
        return self.instance_prompts[0]


def fingerprint(*settings) -> str:
    """Hash of everything that determines a trained result (loop and method settings) except the checkpoint
    interval, which only decides when state is written."""
    parts = []
    for s in settings:
        d = asdict(s)
        d.pop("checkpoint_every", None)
        parts.append({"type": type(s).__name__, **d})
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]
