"""Training the demo model's VAE: reconstruction on world scenes widened by augmentation (issue 13).

Loss (per pixel, images in [-1, 1]): L1 + squared error, object and pasted-patch pixels weighted
``1 + object_weight`` (small objects are a few percent of a scene and an unweighted loss washes out their colour),
plus ``edge_weight`` × the L1 error of horizontal and vertical pixel differences (keeps few-pixel patterns sharp),
plus 1e-6 × KL (Kingma & Welling 2014; Rombach et al. 2022 §3.1 use a similarly small weight). Half the scenes are
hue-shifted and half get pasted patches of random colour and pattern (vae_data.py). Most steps see 32×32 crops
(the VAE is fully convolutional; 4× cheaper), the last 30 % of the budget full images.

:func:`train_decoder` fine-tunes the decoder alone on the frozen encoder's latent means, with the same loss minus the
KL term, on full images: the latent space a UNet was trained on stays exactly as it was (the recipe of Stability's
``sd-vae-ft-mse`` decoder for Stable Diffusion, which also left the encoder untouched).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import numpy as np
import torch

from .time_budget import OnCheckpoint, TimeBudget
from .vae_data import hue_shift, paste_patches

log = logging.getLogger(__name__)


def to_pixels(batch: np.ndarray) -> torch.Tensor:
    """uint8 [B, H, W, 3] → float [B, 3, H, W] in [-1, 1]."""
    return torch.from_numpy(batch).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def pixel_error(rec: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Per-pixel L1 + squared error of a reconstruction."""
    d = rec - x
    return d.abs() + d ** 2


def edge_error(rec: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """L1 error of horizontal and vertical pixel differences."""
    dx = (rec[..., :, 1:] - rec[..., :, :-1]) - (x[..., :, 1:] - x[..., :, :-1])
    dy = (rec[..., 1:, :] - rec[..., :-1, :]) - (x[..., 1:, :] - x[..., :-1, :])
    return dx.abs().mean() + dy.abs().mean()


def augmented_batch(images: np.ndarray, masks: np.ndarray, idx: np.ndarray, g: torch.Generator, augment: float,
                    object_weight: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Scenes ``idx`` as pixels, hue-shifted and with pasted patches (a share ``augment`` each), and the per-pixel
    loss weight: ``1 + object_weight`` on object and patch pixels, 1 elsewhere."""
    x = hue_shift(to_pixels(images[idx]), g, augment)
    x, pasted = paste_patches(x, g, augment)
    return x, 1.0 + object_weight * (torch.from_numpy(masks[idx]).unsqueeze(1) | pasted).float()


def reconstruction_loss(rec: torch.Tensor, x: torch.Tensor, w: torch.Tensor, edge_weight: float) -> torch.Tensor:
    """Weighted L1 + squared pixel error plus ``edge_weight`` × the error of pixel differences."""
    return (w * pixel_error(rec, x)).mean() + edge_weight * edge_error(rec, x)


def descend(optimizer: torch.optim.Optimizer, loss: torch.Tensor, losses: list[float]) -> None:
    """One optimizer step on ``loss``, recorded in ``losses``."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    losses.append(loss.item())


def session_stats(steps: int, seconds: float, losses: list[float]) -> dict:
    """What a training function returns: this session's steps, seconds and mean loss per 50 steps."""
    return {"steps": steps, "seconds": seconds,
            "loss_curve_per_50": [float(np.mean(losses[i:i + 50])) for i in range(0, len(losses), 50)]}


def train_vae(vae, optimizer: torch.optim.Optimizer, images: np.ndarray, masks: np.ndarray, *, budget_s: float,
              done_s: float, seed: int, done_steps: int = 0, batch: int = 16, lr: float = 1e-3, object_weight: float = 4.0,
              edge_weight: float = 0.5, augment: float = 0.5, checkpoint_every_s: float = 300.0,
              on_checkpoint: OnCheckpoint | None = None, session_s: float = float("inf")) -> dict:
    """Train until ``budget_s`` seconds of training have been spent in all sessions (``done_s`` before this one) or
    ``session_s`` in this one.
    The learning rate follows a cosine from ``lr`` to 10 % of it over the whole budget. ``on_checkpoint(done_s,
    steps in all sessions, losses)`` is called every ``checkpoint_every_s`` and at the end (``done_steps``: steps of
    earlier sessions). Returns this session's stats."""
    g = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    full = images.shape[1]
    vae.train()
    clock = TimeBudget(budget_s, done_s, checkpoint_every_s, on_checkpoint, session_s)
    losses, step = [], done_steps
    while clock.running():
        progress = clock.progress()
        crop = 32 if progress < 0.7 else full
        n = batch if crop < full else max(1, batch // 4)
        x, w = augmented_batch(images, masks, rng.integers(0, len(images), n), g, augment, object_weight)
        if crop < full:
            oy, ox = rng.integers(0, full - crop + 1, 2)
            x, w = x[:, :, oy:oy + crop, ox:ox + crop], w[:, :, oy:oy + crop, ox:ox + crop]
        for group in optimizer.param_groups:
            group["lr"] = lr * (0.55 + 0.45 * np.cos(np.pi * progress))
        dist = vae.encode(x).latent_dist
        rec = vae.decode(dist.sample(generator=g)).sample
        loss = reconstruction_loss(rec, x, w, edge_weight) + 1e-6 * dist.kl().mean()
        descend(optimizer, loss, losses)
        step += 1
        if len(losses) % 50 == 0:
            log.info("vae step %d (crop %d) loss %.4f (%.0f of %.0f s)", step, crop, np.mean(losses[-50:]),
                     clock.spent, budget_s)
        clock.tick(step, losses)
    seconds = clock.finish(step, losses)
    vae.eval()
    return session_stats(step - done_steps, seconds, losses)


def decoder_parameters(vae) -> list[torch.nn.Parameter]:
    """What :func:`train_decoder` trains: the decoder and the convolution in front of it."""
    return list(vae.post_quant_conv.parameters()) + list(vae.decoder.parameters())


def _only_decoder_trainable(vae) -> list[torch.nn.Parameter]:
    """Freeze the VAE but :func:`decoder_parameters`, and return those."""
    trained = decoder_parameters(vae)
    for p in vae.parameters():
        p.requires_grad_(False)
    for p in trained:
        p.requires_grad_(True)
    return trained


def fit_decoder(vae, x: torch.Tensor, w: torch.Tensor, steps: int, *, lr: float = 1e-3, batch: int = 8,
                edge_weight: float = 0.5, seed: int = 0, on_step: Callable[[int], None] | None = None) -> None:
    """A probe, not a training stage: ``steps`` AdamW steps of :func:`decoder_parameters` on fixed images ``x``
    (pixels in [-1, 1], loss weights ``w``) decoded from the frozen encoder's latent means, no augmentation and no
    schedule. What such a decoder gives back is what the latents hold. ``on_step(n)`` after step n, the VAE in
    eval mode."""
    with torch.no_grad():
        z = vae.encode(x).latent_dist.mean
    trained = _only_decoder_trainable(vae)
    optimizer = torch.optim.AdamW(trained, lr=lr, weight_decay=0.0)
    rng = np.random.default_rng(seed)
    for step in range(steps):
        vae.decoder.train()
        idx = rng.integers(0, len(x), batch)
        loss = reconstruction_loss(vae.decode(z[idx]).sample, x[idx], w[idx], edge_weight)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if on_step is not None:
            vae.eval()
            on_step(step + 1)
    for p in trained:
        p.requires_grad_(False)
    vae.eval()


def train_decoder(vae, optimizer: torch.optim.Optimizer, images: np.ndarray, masks: np.ndarray, *, budget_s: float,
                  done_s: float, seed: int, done_steps: int = 0, batch: int = 8, lr: float = 5e-4,
                  object_weight: float = 4.0, edge_weight: float = 0.5, augment: float = 0.5,
                  checkpoint_every_s: float = 300.0, on_checkpoint: OnCheckpoint | None = None,
                  session_s: float = float("inf")) -> dict:
    """Fine-tune :func:`decoder_parameters` (``optimizer`` holds only those) to decode the frozen encoder's latent
    means (what a UNet trained on them produces) of augmented full-size scenes; the encoder is not touched. Budget,
    sessions, checkpoints and the cosine learning rate as in :func:`train_vae`."""
    g = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    vae.eval()
    trained = _only_decoder_trainable(vae)
    vae.post_quant_conv.train()
    vae.decoder.train()
    clock = TimeBudget(budget_s, done_s, checkpoint_every_s, on_checkpoint, session_s)
    losses, step = [], done_steps
    while clock.running():
        x, w = augmented_batch(images, masks, rng.integers(0, len(images), batch), g, augment, object_weight)
        for group in optimizer.param_groups:
            group["lr"] = lr * (0.55 + 0.45 * np.cos(np.pi * clock.progress()))
        with torch.no_grad():
            z = vae.encode(x).latent_dist.mean
        loss = reconstruction_loss(vae.decode(z).sample, x, w, edge_weight)
        descend(optimizer, loss, losses)
        step += 1
        if len(losses) % 50 == 0:
            log.info("decoder step %d loss %.4f (%.0f of %.0f s)", step, np.mean(losses[-50:]), clock.spent, budget_s)
        clock.tick(step, losses)
    seconds = clock.finish(step, losses)
    for p in trained:
        p.requires_grad_(False)
    vae.eval()
    return session_stats(step - done_steps, seconds, losses)
