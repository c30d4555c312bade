"""Training settings of DreamBooth-LoRA, checked when built (bad values raise ``UserInputError``)."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field

from .errors import UserInputError

LR_SCHEDULES = ("constant", "linear", "cosine")


@dataclass
class TrainConfig:
    instance_prompt: str
    class_prompt: str | None = None
    prior_weight: float = 1.0
    steps: int = 400
    batch_size: int = 1
    grad_accum: int = 1
    lr: float = 1e-4
    text_lr: float | None = None
    rank: int = 4
    alpha: float | None = None
    unet_targets: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0")
    text_targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "out_proj")
    train_text_encoder: bool = False
    lr_schedule: str = "constant"
    warmup_steps: int = 0
    weight_decay: float = 1e-2
    max_grad_norm: float = 1.0
    snr_gamma: float | None = None
    noise_offset: float = 0.0
    random_flip: float = 0.0
    lora_dropout: float = 0.0
    background_loss_weight: float = 0.0
    gradient_checkpointing: bool = False
    resolution: int = 512
    seed: int = 0
    checkpoint_every: int = 0
    dtype: str = "auto"
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        self.unet_targets, self.text_targets = tuple(self.unet_targets), tuple(self.text_targets)
        if not self.instance_prompt or not self.instance_prompt.strip():
            raise UserInputError("the instance prompt is empty (e.g. --prompt \"a photo of sks toy\")")
        if self.class_prompt is not None and not self.class_prompt.strip():
            raise UserInputError("the class prompt is empty (e.g. --class-prompt \"a photo of a toy\")")
        checks = [
            (self.steps >= 1, f"steps must be at least 1, got {self.steps}"),
            (self.batch_size >= 1, f"batch size must be at least 1, got {self.batch_size}"),
            (self.grad_accum >= 1, f"gradient accumulation must be at least 1, got {self.grad_accum}"),
            (self.rank >= 1, f"rank must be at least 1, got {self.rank}"),
            (self.lr > 0, f"learning rate must be positive, got {self.lr}"),
            (self.text_lr is None or self.text_lr > 0, f"text-encoder learning rate must be positive, got {self.text_lr}"),
            (self.prior_weight >= 0, f"prior weight must be ≥ 0, got {self.prior_weight}"),
            (self.lr_schedule in LR_SCHEDULES, f"lr schedule must be one of {LR_SCHEDULES}, got {self.lr_schedule!r}"),
            (0 <= self.warmup_steps, f"warmup steps must be ≥ 0, got {self.warmup_steps}"),
            (0.0 <= self.random_flip <= 1.0, f"flip probability must be in [0, 1], got {self.random_flip}"),
            (self.resolution >= 8 and self.resolution % 8 == 0, f"resolution must be a multiple of 8, got {self.resolution}"),
            (self.snr_gamma is None or self.snr_gamma > 0, f"min-SNR gamma must be positive, got {self.snr_gamma}"),
            (self.checkpoint_every >= 0, f"checkpoint interval must be ≥ 0, got {self.checkpoint_every}"),
            (self.dtype in ("auto", "fp32", "bf16", "fp16"), f"dtype must be auto, fp32, bf16 or fp16, got {self.dtype!r}"),
        ]
        for ok, message in checks:
            if not ok:
                raise UserInputError(message)

    @property
    def lora_alpha(self) -> float:
        return float(self.alpha if self.alpha is not None else self.rank)

    def fingerprint(self) -> str:
        """Hash of everything that determines the trained result except the step budget's progress."""
        d = asdict(self)
        d.pop("checkpoint_every")
        return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:16]
