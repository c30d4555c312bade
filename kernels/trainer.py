"""The DreamBooth-LoRA training loop, written against the Denoiser / TextEncoder seams.

One optimizer step = ``grad_accum`` micro-batches of ``batch_size`` instance samples (+ as many class
samples with prior preservation, DreamBooth eq. 2). All randomness of step s comes from a generator seeded
with (seed, s), so a run interrupted at any step and resumed from its checkpoint ends bit-identical to an
uninterrupted one on the CPU.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .checkpoint import load_checkpoint, save_checkpoint
from .diffusers_backend import pick_dtype
from .errors import TrainingDiverged, TrainingInterrupted, UserInputError
from .lora import LoraWeights, attach_lora, read_lora
from .lora_format import to_kohya
from .losses import min_snr_weights, offset_noise, per_sample_mse, prior_preservation_loss
from .seams import AdapterRoot, Conditioning, Denoiser, TextEncoder
from .train_config import TrainConfig

log = logging.getLogger(__name__)


@dataclass
class TrainData:
    """Instance images [N,3,R,R] in [-1,1], optional instance masks [N,1,R,R] in [0,1] (loss mask), optional
    class (prior) images [M,3,R,R]."""

    instance: torch.Tensor
    class_images: torch.Tensor | None = None
    masks: torch.Tensor | None = None

    def __post_init__(self):
        if self.instance.ndim != 4 or self.instance.shape[0] == 0:
            raise UserInputError("no instance images to train on")
        if self.masks is not None and self.masks.shape[-2:] != self.instance.shape[-2:]:
            raise UserInputError(f"masks are {tuple(self.masks.shape[-2:])} but images are {tuple(self.instance.shape[-2:])}")


@dataclass
class TrainResult:
    adapter: dict[str, LoraWeights]  # kohya name → weights
    losses: list[float]
    steps: int
    seconds: float
    prior_losses: list[float] = field(default_factory=list)

    def final_loss(self, last: int = 10) -> str:
        """``"0.1234 (mean of last 10)"``: the loss to report at the end of a run (one step's loss is noise)."""
        tail = self.losses[-last:]
        return f"{sum(tail) / len(tail):.4f} (mean of last {len(tail)})"


def step_generator(seed: int, step: int, micro: int = 0) -> torch.Generator:
    """The generator of one micro-batch: a pure function of (seed, step, micro)."""
    return torch.Generator().manual_seed((seed * 1_000_003 + step * 9_176 + micro) % (2**63))


def epoch_indices(n: int, count: int, start: int, seed: int) -> torch.Tensor:
    """Indices ``start … start+count-1`` of an endless sequence of seeded permutations of range(n)
    (every image is seen once per epoch)."""
    out = []
    for pos in range(start, start + count):
        epoch, i = divmod(pos, n)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 7_919 + epoch))
        out.append(int(perm[i]))
    return torch.tensor(out)


class _LatentCache:
    """VAE latent distributions of the training images (+ their mirror images when flipping), encoded once."""

    def __init__(self, denoiser: Denoiser, pixels: torch.Tensor, flip: bool, batch: int = 8):
        self.mean, self.std = self._encode(denoiser, pixels, batch)
        self.flip_mean = self.flip_std = None
        if flip:
            self.flip_mean, self.flip_std = self._encode(denoiser, pixels.flip(-1), batch)

    @staticmethod
    def _encode(denoiser, pixels, batch):
        parts = [denoiser.encode_images(pixels[i:i + batch]) for i in range(0, pixels.shape[0], batch)]
        return torch.cat([p[0] for p in parts]).cpu(), torch.cat([p[1] for p in parts]).cpu()

    def sample(self, idx: torch.Tensor, flipped: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        mean, std = self.mean[idx].clone(), self.std[idx].clone()
        if flipped.any():
            mean[flipped], std[flipped] = self.flip_mean[idx[flipped]], self.flip_std[idx[flipped]]
        return mean + std * torch.randn(mean.shape, generator=gen)


class DreamBoothLoraTrainer:
    """Attaches LoRA layers (peft) to the denoiser (and optionally the text encoder), then trains them."""

    def __init__(self, denoiser: Denoiser, text_encoder: TextEncoder, data: TrainData, cfg: TrainConfig,
                 device: str | torch.device = "cpu"):
        self.denoiser, self.text_encoder, self.data, self.cfg = denoiser, text_encoder, data, cfg
        self.device = torch.device(device)
        self.compute_dtype = pick_dtype(self.device, cfg.dtype)
        self.use_prior = data.class_images is not None and cfg.class_prompt is not None and cfg.prior_weight > 0
        if data.class_images is not None and cfg.class_prompt is None:
            raise UserInputError("class images were given without a class prompt (e.g. --class-prompt \"a toy\")")
        if cfg.class_prompt is not None and cfg.prior_weight > 0 and data.class_images is None:
            raise UserInputError("prior preservation needs class images: give a folder or a number to generate")

        torch.manual_seed(cfg.seed)  # peft's Kaiming init of lora_A draws from the global generator
        self.roots: list[AdapterRoot] = list(denoiser.adapter_roots(cfg.unet_targets))
        if cfg.train_text_encoder:
            self.roots += text_encoder.adapter_roots(cfg.text_targets)
        for r in self.roots:
            if not r.paths:
                raise UserInputError(f"no layers named {cfg.unet_targets if r.prefix == 'lora_unet_' else cfg.text_targets} in the model")
            for m in r.module.parameters():
                m.requires_grad_(False)
            try:
                attach_lora(r.module, r.paths, cfg.rank, cfg.lora_alpha, cfg.lora_dropout)
            except ValueError as e:
                raise UserInputError(str(e)) from None
        self.params = {f"{r.prefix}{n}": p for r in self.roots for n, p in r.module.named_parameters() if p.requires_grad}
        unet_params = [p for n, p in self.params.items() if n.startswith("lora_unet_")]
        text_params = [p for n, p in self.params.items() if not n.startswith("lora_unet_")]
        groups = [{"params": unet_params, "lr": cfg.lr}]
        if text_params:
            groups.append({"params": text_params, "lr": cfg.text_lr or cfg.lr})
        self.optimizer = torch.optim.AdamW(groups, weight_decay=cfg.weight_decay)
        from diffusers.optimization import get_scheduler

        name = "constant_with_warmup" if cfg.lr_schedule == "constant" and cfg.warmup_steps else cfg.lr_schedule
        self.scheduler = get_scheduler(name, self.optimizer, num_warmup_steps=cfg.warmup_steps,
                                       num_training_steps=cfg.steps)
        if cfg.gradient_checkpointing:
            denoiser.set_gradient_checkpointing(True)
            if cfg.train_text_encoder:
                text_encoder.set_gradient_checkpointing(True)

        self.instance_latents = _LatentCache(denoiser, data.instance, cfg.random_flip > 0)
        self.class_latents = _LatentCache(denoiser, data.class_images, cfg.random_flip > 0) if self.use_prior else None
        self.masks = None
        if data.masks is not None:
            lat = self.instance_latents.mean.shape[-2:]
            self.masks = F.interpolate(data.masks.float(), size=lat, mode="area").cpu()
        self.prompts = [cfg.instance_prompt] + ([cfg.class_prompt] if self.use_prior else [])
        self.cached_cond = None
        if not cfg.train_text_encoder:
            with torch.no_grad(), self._autocast():
                self.cached_cond = self._detach(text_encoder.encode(self.prompts))
        self.step = 0
        self.losses: list[float] = []

    def _autocast(self):
        if self.compute_dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.compute_dtype)

    @staticmethod
    def _detach(c: Conditioning) -> Conditioning:
        return Conditioning(c.context.detach().float(), None if c.pooled is None else c.pooled.detach().float())

    # ------------------------------------------------------------------ one step
    def _micro_batch_loss(self, step: int, micro: int) -> tuple[torch.Tensor, torch.Tensor]:
        cfg = self.cfg
        gen = step_generator(cfg.seed, step, micro)
        bs = cfg.batch_size
        pos = (step * cfg.grad_accum + micro) * bs
        idx = epoch_indices(self.data.instance.shape[0], bs, pos, cfg.seed)
        flipped = torch.rand(bs, generator=gen) < cfg.random_flip
        latents = [self.instance_latents.sample(idx, flipped, gen)]
        masks = None
        if self.masks is not None:
            m = self.masks[idx].clone()
            m[flipped] = m[flipped].flip(-1)
            masks = [m + cfg.background_loss_weight * (1 - m)]
        if self.use_prior:
            cidx = epoch_indices(self.data.class_images.shape[0], bs, pos, cfg.seed + 1)
            cflip = torch.rand(bs, generator=gen) < cfg.random_flip
            latents.append(self.class_latents.sample(cidx, cflip, gen))
            if masks is not None:
                masks.append(torch.ones_like(masks[0]))
        x0 = torch.cat(latents)
        n = x0.shape[0]
        is_prior = torch.arange(n) >= bs
        noise = offset_noise(tuple(x0.shape), gen, cfg.noise_offset)
        t = torch.randint(0, self.denoiser.schedule.num_timesteps, (n,), generator=gen)

        cond = self.cached_cond
        if cond is None:
            with self._autocast():
                cond = self.text_encoder.encode(self.prompts)
        cond = cond.select(is_prior.long())  # row 0 = instance prompt, row 1 = class prompt

        dev = self.device
        x0, noise, t_dev = x0.to(dev), noise.to(dev), t.to(dev)
        x_t = self.denoiser.add_noise(x0, noise, t_dev)
        with self._autocast():
            pred = self.denoiser.predict(x_t, t_dev, Conditioning(cond.context.to(dev),
                                                                  None if cond.pooled is None else cond.pooled.to(dev)))
        target = self.denoiser.target(x0, noise, t_dev)
        per = per_sample_mse(pred, target, None if masks is None else torch.cat(masks).to(dev))
        weights = None
        if cfg.snr_gamma:
            snr = self.denoiser.schedule.snr(t)
            weights = min_snr_weights(snr, cfg.snr_gamma, self.denoiser.schedule.prediction_type).to(dev)
        total, _, prior = prior_preservation_loss(per, is_prior.to(dev), cfg.prior_weight, weights)
        return total, prior

    def train(self, *, on_step: Callable[[int, int, float], None] | None = None,
              checkpoint_path: str | None = None, resume: bool = False) -> TrainResult:
        """Run until ``cfg.steps``. ``on_step(step, total, loss)`` is called after every optimizer step (it may
        raise to cancel). Checkpoints go to ``checkpoint_path`` every ``cfg.checkpoint_every`` steps, on
        Ctrl-C / cancel, and before stopping on a NaN/inf loss."""
        cfg = self.cfg
        if resume:
            if not checkpoint_path:
                raise UserInputError("--resume needs a checkpoint path")
            if os.path.exists(checkpoint_path):
                self.step, self.losses, _ = load_checkpoint(checkpoint_path, params=self.params,
                                                            optimizer=self.optimizer, scheduler=self.scheduler,
                                                            fingerprint=cfg.fingerprint())
                log.info("resumed from %s at step %d", checkpoint_path, self.step)
            else:
                log.info("no checkpoint at %s: starting from step 0", checkpoint_path)
        for r in self.roots:
            r.module.train(cfg.lora_dropout > 0)
        start = time.perf_counter()

        def checkpoint() -> str | None:
            if checkpoint_path is None:
                return None
            return save_checkpoint(checkpoint_path, step=self.step, params=self.params, optimizer=self.optimizer,
                                   scheduler=self.scheduler, losses=self.losses, fingerprint=cfg.fingerprint())

        try:
            while self.step < cfg.steps:
                step_loss = 0.0
                for micro in range(cfg.grad_accum):
                    loss, _ = self._micro_batch_loss(self.step, micro)
                    if not torch.isfinite(loss):
                        self.optimizer.zero_grad(set_to_none=True)
                        raise TrainingDiverged(self.step, loss.item(), checkpoint())
                    (loss / cfg.grad_accum).backward()
                    step_loss += loss.item() / cfg.grad_accum
                if cfg.max_grad_norm:
                    torch.nn.utils.clip_grad_norm_(list(self.params.values()), cfg.max_grad_norm)
                self.optimizer.step()
                self.scheduler.step()
                self.optimizer.zero_grad(set_to_none=True)
                self.step += 1
                self.losses.append(step_loss)
                if cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0 and self.step < cfg.steps:
                    checkpoint()
                if on_step is not None:
                    on_step(self.step, cfg.steps, step_loss)
        except KeyboardInterrupt:
            self.optimizer.zero_grad(set_to_none=True)
            raise TrainingInterrupted(self.step, checkpoint()) from None
        except (TrainingDiverged, UserInputError):
            raise
        except BaseException:
            # e.g. ComfyUI's Cancel (raised by the progress hook): keep the last completed step, then re-raise
            self.optimizer.zero_grad(set_to_none=True)
            if checkpoint_path is not None and self.step > 0:
                checkpoint()
            raise
        finally:
            for r in self.roots:
                r.module.eval()
        return TrainResult(self.adapter(), list(self.losses), self.step, time.perf_counter() - start)

    def adapter(self) -> dict[str, LoraWeights]:
        """The trained adapter, keyed by kohya names."""
        out: dict[str, LoraWeights] = {}
        for r in self.roots:
            out.update(to_kohya(read_lora(r.module), r.prefix))
        return out
