"""The training loop, written against the Denoiser / TextEncoder seams, with methods as plug-ins.

One optimizer step = ``grad_accum`` micro-batches of ``batch_size`` instance samples (+ as many class samples
with prior preservation, DreamBooth eq. 2). Each instance sample gets one of the instance prompts (drawn per
sample when there are several: caption templates). The loop owns steps, accumulation, the learning-rate
schedule, min-SNR weighting, augmentation draws (engine/augmented.py), checkpoints, resume, cancel and NaN
handling; the method owns what is trained. Under ``accelerate launch`` (engine/distributed.py) ``batch_size`` stays the
global batch: each process trains its shard of every micro-batch, gradients are averaged over the processes before
the step, and only the main process writes checkpoints.
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

from ..core.devices import pick_dtype
from ..core.errors import TrainingDiverged, TrainingInterrupted, UserInputError
from ..core.losses import min_snr_weights, offset_noise, per_sample_mse, prior_preservation_loss
from ..core.round_trip import round_trip_report
from ..formats.checkpoint import load_checkpoint, save_checkpoint
from .config import TrainConfig, fingerprint
from .augmented import AugmentedInstances, instance_draw
from .data import LatentCache, TrainData, encode, epoch_indices, step_generator
from .distributed import SINGLE, Processes
from .method import Artifact, Method, ParamGroup
from .seams import Conditioning, Denoiser, TextEncoder

log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    losses: list[float]
    steps: int
    seconds: float
    prior_losses: list[float] = field(default_factory=list)
    #: :meth:`Trainer.vae_round_trip` of the instance images, when the caller measured it
    vae_round_trip: dict | None = None

    def final_loss(self, last: int = 10) -> str:
        """``"0.1234 (mean of last 10)"``: the loss to report at the end of a run (one step's loss is noise)."""
        tail = self.losses[-last:]
        return f"{sum(tail) / len(tail):.4f} (mean of last {len(tail)})"


class Trainer:
    """Trains one method on a denoiser + text encoder. The method stays attached after :meth:`train` (sample
    with it in memory); :meth:`close` (or leaving a ``with Trainer(...)`` block) detaches it.

    ``processes``: the processes training together (engine/distributed.py ``launched()``); one by default."""

    def __init__(self, denoiser: Denoiser, text_encoder: TextEncoder, method: Method, data: TrainData,
                 cfg: TrainConfig, device: str | torch.device = "cpu", processes: Processes = SINGLE):
        self.denoiser, self.text_encoder, self.method, self.data, self.cfg = denoiser, text_encoder, method, data, cfg
        self.device = torch.device(device)
        self.processes = processes
        #: this process's rows of each global micro-batch (all of them in one process)
        self.shard = processes.rows(cfg.batch_size)
        self.compute_dtype = pick_dtype(self.device, cfg.dtype)
        self.use_prior = data.class_images is not None and cfg.class_prompt is not None and cfg.prior_weight > 0
        if data.class_images is not None and cfg.class_prompt is None:
            raise UserInputError("class images were given without a class prompt (e.g. --class-prompt \"a toy\")")
        if cfg.class_prompt is not None and cfg.prior_weight > 0 and data.class_images is None:
            raise UserInputError("prior preservation needs class images: give a folder or a number to generate")
        if self.use_prior and not method.uses_prior:
            raise UserInputError(f"{method.name} does not train the denoiser, so class images (prior preservation) "
                                 "have nothing to preserve: leave out the class prompt and class images")
        method.check_prompts(cfg.instance_prompts)
        method.preflight(denoiser, text_encoder)

        torch.manual_seed(cfg.seed)  # initialisations (peft's Kaiming init of lora_A, …) draw from the global RNG
        try:
            self._setup(denoiser, text_encoder, method, data, cfg)
        except BaseException:  # a failure (or Cancel) after attaching must not leave the method on the model
            method.detach()
            raise

    def _setup(self, denoiser, text_encoder, method, data, cfg) -> None:
        self.groups: list[ParamGroup] = method.attach(denoiser, text_encoder, cfg)
        self.params = {n: p for g in self.groups for n, p in g.params.items()}
        if not self.params:
            raise UserInputError(f"{method.name} has nothing to train on this model")
        self.optimizer = torch.optim.AdamW(
            [{"params": list(g.params.values()), "lr": g.lr,
              **({} if g.weight_decay is None else {"weight_decay": g.weight_decay})} for g in self.groups],
            weight_decay=cfg.weight_decay,
            foreach=True)  # one batched update for all adapter tensors (the CPU default is a Python loop over them)
        from diffusers.optimization import get_scheduler

        name = "constant_with_warmup" if cfg.lr_schedule == "constant" and cfg.warmup_steps else cfg.lr_schedule
        self.scheduler = get_scheduler(name, self.optimizer, num_warmup_steps=cfg.warmup_steps,
                                       num_training_steps=cfg.steps)
        self.fingerprint = fingerprint(cfg, method.settings)
        if cfg.gradient_checkpointing:
            denoiser.set_gradient_checkpointing(True)
            if method.gradient_checkpointing_text:
                text_encoder.set_gradient_checkpointing(True)

        # with augmentation, instance views are drawn (and encoded) per step or from a pool: engine/augmented.py
        self.augmented = AugmentedInstances(data, cfg, denoiser) if cfg.augment is not None else None
        self.instance_latents = None
        self.masks = None
        if self.augmented is None:
            self.instance_latents = LatentCache(denoiser, data.instance, cfg.random_flip > 0)
            if data.masks is not None:
                lat = self.instance_latents.mean.shape[-2:]
                self.masks = F.interpolate(data.masks.float(), size=lat, mode="area").cpu()
        self.class_latents = LatentCache(denoiser, data.class_images, cfg.random_flip > 0) if self.use_prior else None
        # prompt rows: the instance prompts, then the class prompt
        self.prompts = list(cfg.instance_prompts) + ([cfg.class_prompt] if self.use_prior else [])
        self.cached_cond = None
        self.caption_cond: dict[str, Conditioning] = {}  # augmented captions, encoded once each (frozen text)
        if not method.changes_text:
            with torch.no_grad(), self._autocast():
                self.cached_cond = text_encoder.encode(self.prompts).detached()
        self.step = 0
        self.losses: list[float] = []

    # ------------------------------------------------------------------ lifetime
    def close(self) -> None:
        """Detach the method (its own undo) and switch off gradient checkpointing again: the models are as
        before training."""
        self.method.detach()
        if self.cfg.gradient_checkpointing:
            self.denoiser.set_gradient_checkpointing(False)
            if self.method.gradient_checkpointing_text:
                self.text_encoder.set_gradient_checkpointing(False)

    def __enter__(self) -> "Trainer":
        return self

    def __exit__(self, *exc) -> bool:
        self.close()
        return False

    def vae_round_trip(self, batch: int = 8) -> dict:
        """What the model's VAE keeps of the instance images (their cached latent means decoded again), over the
        subject masks when given: the ceiling of any method on this model (core/round_trip.py)."""
        mean = self.instance_latents.mean if self.instance_latents is not None else encode(self.denoiser, self.data.instance)[0]
        rec = torch.cat([self.denoiser.decode_latents(mean[i:i + batch]) for i in range(0, mean.shape[0], batch)])
        return round_trip_report(self.data.instance, rec, self.data.masks)

    def export(self, steps: int | None = None, **info: str) -> dict[str, Artifact]:
        """The method's files for the current state."""
        return self.method.export(self.cfg, self.step if steps is None else steps, **info)

    def _autocast(self):
        if self.compute_dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.compute_dtype)

    # ------------------------------------------------------------------ one step
    def _conditioning(self, rows: torch.Tensor) -> Conditioning:
        """Conditioning for each sample's prompt row (encoded once, or every step when it is being trained)."""
        if self.cached_cond is not None:
            return self.cached_cond.select(rows)
        used = sorted(set(rows.tolist()))
        with self._autocast():
            cond = self.text_encoder.encode([self.prompts[i] for i in used])
        where = {r: k for k, r in enumerate(used)}
        return cond.select(torch.tensor([where[int(r)] for r in rows]))

    def _caption_conditioning(self, captions: list[str]) -> Conditioning:
        """Conditioning of each sample's own caption (augmented captions vary per step): encoded once per distinct
        caption when the text encoder is frozen, else every step with gradients."""
        if self.method.changes_text:
            used = sorted(set(captions))
            with self._autocast():
                cond = self.text_encoder.encode(used)
            where = {c: k for k, c in enumerate(used)}
            return cond.select(torch.tensor([where[c] for c in captions]))
        missing = sorted(set(captions) - set(self.caption_cond))
        if missing:
            with torch.no_grad(), self._autocast():
                cond = self.text_encoder.encode(missing).detached()
            for k, c in enumerate(missing):
                self.caption_cond[c] = cond.select(torch.tensor([k]))
        return Conditioning.cat([self.caption_cond[c] for c in captions])

    def _micro_batch_loss(self, step: int, micro: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Loss of this process's shard of micro-batch ``micro`` of step ``step``. Every draw is made for the whole
        global batch (so the samples do not depend on the number of processes); ``mine`` are this process's rows of
        the instance half and of the class half (all rows in one process), ``keep`` the same rows of the whole."""
        cfg = self.cfg
        gen = step_generator(cfg.seed, step, micro)
        bs = cfg.batch_size
        mine = self.shard
        pos = (step * cfg.grad_accum + micro) * bs
        idx = epoch_indices(self.data.instance.shape[0], bs, pos, cfg.seed)
        n_inst = len(cfg.instance_prompts)
        captions = None
        if self.augmented is not None:
            idx, base = instance_draw(cfg, self.data.instance.shape[0], step, micro, gen)
            views, weight, captions = self.augmented.sample(idx, base, step, micro, keep=mine)
            latents, masks = [views], [weight]
        else:
            flipped = torch.rand(bs, generator=gen) < cfg.random_flip
            latents = [self.instance_latents.sample(idx, flipped, gen)[mine]]
            masks = None
            if self.masks is not None:
                m = self.masks[idx].clone()
                m[flipped] = m[flipped].flip(-1)
                masks = [(m + cfg.background_loss_weight * (1 - m))[mine]]
        if self.use_prior:
            cidx = epoch_indices(self.data.class_images.shape[0], bs, pos, cfg.seed + 1)
            cflip = torch.rand(bs, generator=gen) < cfg.random_flip
            latents.append(self.class_latents.sample(cidx, cflip, gen)[mine])
            if masks is not None:
                masks.append(torch.ones_like(masks[0]))
        x0 = torch.cat(latents)
        n = x0.shape[0]  # samples trained here
        local = latents[0].shape[0]
        n_global = bs * len(latents)
        keep = torch.arange(n_global).view(len(latents), bs)[:, mine].flatten()
        is_prior = torch.arange(n) >= local
        noise = offset_noise((n_global,) + tuple(x0.shape[1:]), gen, cfg.noise_offset)[keep]
        t = torch.randint(0, self.denoiser.schedule.num_timesteps, (n_global,), generator=gen)[keep]
        if captions is not None:
            cond = self._caption_conditioning(captions + [cfg.class_prompt] * (n - local))
        else:
            rows = torch.full((n_global,), n_inst, dtype=torch.long)  # class-prompt row for prior samples
            rows[:bs] = torch.randint(0, n_inst, (bs,), generator=gen) if n_inst > 1 else 0
            cond = self._conditioning(rows[keep])

        dev = self.device
        x0, noise, t_dev = x0.to(dev), noise.to(dev), t.to(dev)
        x_t = self.denoiser.add_noise(x0, noise, t_dev)
        with self._autocast():
            pred = self.denoiser.predict(x_t, t_dev, cond.to(dev))
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
        Ctrl-C / cancel, and before stopping on a NaN/inf loss (written by the main process; under several processes
        the others wait for the periodic ones, and every process reads the checkpoint to resume)."""
        cfg = self.cfg
        procs = self.processes
        if resume:
            if not checkpoint_path:
                raise UserInputError("--resume needs a checkpoint path")
            if os.path.exists(checkpoint_path):
                self.step, self.losses, _ = load_checkpoint(checkpoint_path, params=self.params,
                                                            optimizer=self.optimizer, scheduler=self.scheduler,
                                                            fingerprint=self.fingerprint)
                log.info("resumed from %s at step %d", checkpoint_path, self.step)
            else:
                log.info("no checkpoint at %s: starting from step 0", checkpoint_path)
        procs.agree(self.step, "the step to resume from")  # no-op in one process
        procs.same_parameters(self.params.values())
        self.method.set_training(True)
        start = time.perf_counter()

        def save() -> str:
            return save_checkpoint(checkpoint_path, step=self.step, params=self.params, optimizer=self.optimizer,
                                   scheduler=self.scheduler, losses=self.losses, fingerprint=self.fingerprint)

        def checkpoint(together: bool = False) -> str | None:
            """Write the state (main process). ``together``: every process is here (periodic, NaN), so the others
            wait until it is on disk; else (Ctrl-C, cancel) nobody waits for anybody."""
            if checkpoint_path is None:
                return None
            if together:
                procs.on_main(save, f"writing the checkpoint {checkpoint_path}")
            elif procs.is_main:
                save()
            return str(checkpoint_path)

        try:
            while self.step < cfg.steps:
                step_loss = 0.0
                for micro in range(cfg.grad_accum):
                    loss, _ = self._micro_batch_loss(self.step, micro)
                    value = procs.mean(loss)  # the global batch's loss: a NaN on any process stops them all
                    if not torch.isfinite(value):
                        self.optimizer.zero_grad(set_to_none=True)
                        raise TrainingDiverged(self.step, value.item(), checkpoint(together=True))
                    procs.backward(loss / cfg.grad_accum)
                    step_loss += value.item() / cfg.grad_accum
                procs.average_gradients(self.params.values())
                if cfg.max_grad_norm:
                    torch.nn.utils.clip_grad_norm_(list(self.params.values()), cfg.max_grad_norm)
                self.optimizer.step()
                self.scheduler.step()
                self.optimizer.zero_grad(set_to_none=True)
                self.step += 1
                self.losses.append(step_loss)
                if cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0 and self.step < cfg.steps:
                    checkpoint(together=True)
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
            self.method.set_training(False)
        return TrainResult(list(self.losses), self.step, time.perf_counter() - start)
