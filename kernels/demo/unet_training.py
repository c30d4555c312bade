"""Training the demo model's UNet and text encoder jointly on cached latents of captioned world scenes.

DDPM loss (Ho et al. 2020 eq. 14) towards ε or v (Salimans & Ho 2022 §4; with the zero-terminal-SNR schedule,
Lin et al. 2024 §3.2), 10 % empty captions for classifier-free guidance (Ho & Salimans
2022), gradient clipping at 1, and an EMA copy of both networks (decay 0.999, warmed up as (1+n)/(10+n)) that is
what gets saved. Learning rate: warm-up over 100 steps, constant, then a linear decay to zero over the last
``cooldown`` fraction of the time budget (the decay phase of a warmup-stable-decay schedule; time-based because the
budget is). A run extended after its cooldown can be re-warmed and re-decayed (Gupta et al. 2023, "Continual
pre-training of large language models: how to (re)warm your model?"; Ibrahim et al. 2024, "Simple and scalable
strategies to continually pre-train large language models"): the extension gets a schedule of its own, warm-up to
a share of the peak, then its own cooldown. An optional per-pixel loss weight (``loss_weights``) turns the mean
squared error into a weighted mean per sample (see :func:`object_loss_weights`).
"""

from __future__ import annotations

import copy
import logging

import numpy as np
import torch

from ..core.losses import per_sample_mse
from ..core.noise_schedule import NoiseSchedule
from .time_budget import OnCheckpoint, TimeBudget

log = logging.getLogger(__name__)


def lr_factor(step: int, progress: float, warmup: int, cooldown: float) -> float:
    """Warmup-stable-decay multiplier: linear warm-up over ``warmup`` steps, then 1, then a linear decay to 0 over
    the last ``cooldown`` fraction of the budget (``progress`` = fraction of the budget spent)."""
    factor = min(1.0, (step + 1) / warmup)
    if cooldown > 0:
        factor *= min(1.0, max(0.0, 1.0 - progress) / cooldown)
    return factor


def scheduled_factor(step: int, spent_s: float, budget_s: float, cooldown: float,
                     rewarm: tuple[float, int, float] | None = None, warmup: int = 100) -> float:
    """The learning-rate multiplier of :func:`train_unet` at ``step``, ``spent_s`` seconds into a ``budget_s`` run:
    :func:`lr_factor` over the whole run, or, from ``rewarm`` = (seconds, steps, peak) on, ``peak`` × a fresh
    :func:`lr_factor` over the rest of the budget."""
    if rewarm is None:
        return lr_factor(step, min(1.0, spent_s / max(budget_s, 1e-9)), warmup, cooldown)
    from_s, from_step, peak = rewarm
    return peak * lr_factor(step - from_step, (spent_s - from_s) / max(budget_s - from_s, 1e-9), warmup, cooldown)


def with_ema(unet, text) -> dict[str, torch.nn.Module]:
    """The ``nets`` of :func:`train_unet`: the networks and frozen EMA copies of them (started equal)."""
    ema_unet, ema_text = copy.deepcopy(unet).eval(), copy.deepcopy(text).eval()
    for p in list(ema_unet.parameters()) + list(ema_text.parameters()):
        p.requires_grad_(False)
    return {"unet": unet, "text": text, "ema_unet": ema_unet, "ema_text": ema_text}


def caption_ids(tokenizer, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids of ``captions`` ([N, 77]) and of the empty caption ([77]) that :func:`train_unet` drops to."""
    ids = tokenizer(captions + [""], padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    return ids[:-1], ids[-1]


def object_loss_weights(object_pixels: torch.Tensor, cell_pixels: int, weight: float) -> torch.Tensor:
    """Per-latent-pixel loss weights [N, 1, h, w] = 1 + (``weight`` − 1) × the share of the latent pixel's image
    cell (``cell_pixels`` image pixels) covered by objects; ``object_pixels``: those counts [N, h, w] (uint8).
    Objects take a few percent of a world scene, so the plain loss is mostly background; a weight above 1 spends
    more of it on what captions name (the masked / foreground-weighted loss of personalization recipes, here on
    the base model's own data)."""
    share = object_pixels.to(torch.float32).unsqueeze(1) / cell_pixels
    return 1.0 + (weight - 1.0) * share


def make_optimizer(unet, text, lr: float = 5e-4, text_lr: float = 2e-4) -> torch.optim.Optimizer:
    return torch.optim.AdamW([{"params": list(unet.parameters()), "lr": lr},
                              {"params": list(text.parameters()), "lr": text_lr}], weight_decay=1e-2)


def train_unet(nets: dict[str, torch.nn.Module], optimizer: torch.optim.Optimizer, alphas_cumprod: torch.Tensor,
               latents: torch.Tensor, ids: torch.Tensor, empty_ids: torch.Tensor, *, budget_s: float, done_s: float,
               done_steps: int, seed: int, base_lrs: tuple[float, float], batch: int = 32, ema_decay: float = 0.999,
               p_uncond: float = 0.1, cooldown: float = 0.2, checkpoint_every_s: float = 300.0,
               on_checkpoint: OnCheckpoint | None = None, session_s: float = float("inf"),
               prediction_type: str = "epsilon", rewarm: tuple[float, int, float] | None = None,
               loss_weights: torch.Tensor | None = None) -> dict:
    """``nets``: ``unet``, ``text`` and their EMA copies ``ema_unet``, ``ema_text``. Trains until ``budget_s``
    seconds have been spent in all sessions or ``session_s`` in this one; ``done_steps`` continues the warm-up and EMA counters.
    ``on_checkpoint(done_s, steps_total, losses)`` every ``checkpoint_every_s`` and at the end. ``rewarm`` =
    (seconds, steps, peak): from that point of the run on, the learning rate follows :func:`lr_factor` afresh over
    the rest of the budget, scaled by ``peak``. ``loss_weights``: one weight map per latent ([N, 1, h, w]); each
    sample's loss is then the weighted mean of its squared errors (None: the plain mean)."""
    unet, text, ema_unet, ema_text = nets["unet"], nets["text"], nets["ema_unet"], nets["ema_text"]
    g = torch.Generator().manual_seed(seed)
    schedule = NoiseSchedule(alphas_cumprod, prediction_type)
    params = list(unet.parameters()) + list(text.parameters())
    pairs = [(pe, p) for m_ema, m in ((ema_unet, unet), (ema_text, text))
             for pe, p in zip(m_ema.parameters(), m.parameters())]
    unet.train()
    text.train()
    clock = TimeBudget(budget_s, done_s, checkpoint_every_s, on_checkpoint, session_s)
    losses, step = [], done_steps
    while clock.running():
        idx = torch.randint(0, len(latents), (batch,), generator=g)
        x0 = latents[idx]
        tok = ids[idx].clone()
        tok[torch.rand(batch, generator=g) < p_uncond] = empty_ids
        noise = torch.randn(x0.shape, generator=g)
        t = torch.randint(0, schedule.num_timesteps, (batch,), generator=g)
        x_t = schedule.add_noise(x0, noise, t)
        factor = scheduled_factor(step, clock.spent, budget_s, cooldown, rewarm)
        for group, base in zip(optimizer.param_groups, base_lrs):
            group["lr"] = base * factor
        pred, target = unet(x_t, t, text(tok)[0]).sample, schedule.target(x0, noise, t)
        if loss_weights is None:
            loss = torch.nn.functional.mse_loss(pred, target)
        else:
            loss = per_sample_mse(pred, target, loss_weights[idx]).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        d = min(ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            for pe, p in pairs:
                pe.lerp_(p, 1 - d)
        losses.append(loss.item())
        step += 1
        if len(losses) % 50 == 0:
            log.info("unet step %d loss %.4f (%.0f of %.0f s)", step, np.mean(losses[-50:]), clock.spent, budget_s)
        clock.tick(step, losses)
    seconds = clock.finish(step, losses)
    unet.eval()
    text.eval()
    return {"steps": step - done_steps, "seconds": seconds,
            "loss_curve_per_50": [float(np.mean(losses[i:i + 50])) for i in range(0, len(losses), 50)]}
