"""One personalization experiment on the demo model: train a concept, sample held-out prompts, score them.

Shared by ``python -m fewshot_personalize demo`` (one concept, before/after grid) and ``… bench`` (every concept ×
held-out prompt × seed, per method). The protocol mirrors DreamBooth §4 (arXiv 2208.12242): subject fidelity
(DINO/CLIP-I analogue), prompt fidelity (CLIP-T analogue), class-prior drift (PRES) and diversity (DIV).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from ..diffusers_backend import DiffusersDenoiser, DiffusersTextEncoder, load_pipeline
from ..generate import generate_images, use_sampler
from ..images import pil_to_tensor, tensor_to_pil
from ..lora import detach_lora
from ..train_config import TrainConfig
from ..trainer import DreamBoothLoraTrainer, TrainData, TrainResult
from .concepts import get_concept, prompt_specs, reference_images, render_prompt
from .model import RESOLUTION


@dataclass
class Method:
    """A benchmark row: how the concept is learned (``steps=0``: the base model, no personalization). The defaults
    are the recipe every DreamBooth row shares: 400 steps at 3e-3 beat 200 at 1e-3 (subject fidelity 0.556 vs
    0.464 at the same drift; README)."""

    name: str
    steps: int = 400
    prior: bool = False
    text: bool = False
    rank: int = 4
    lr: float = 3e-3
    text_lr: float = 1.5e-3
    n_class: int = 16


METHODS = (
    Method("base model (no personalization)", steps=0),
    Method("DreamBooth-LoRA, no prior, UNet"),
    Method("DreamBooth-LoRA, prior, UNet", prior=True),
    Method("DreamBooth-LoRA, no prior, UNet + text encoder", text=True),
    Method("DreamBooth-LoRA, prior, UNet + text encoder", prior=True, text=True),
)
DEFAULT_METHOD = METHODS[4]

SAMPLE_STEPS = 20
GUIDANCE = 4.0


def demo_pipeline():
    pipe = load_pipeline("demo")
    use_sampler(pipe, "dpm")
    return pipe


def sample(pipe, prompt: str, n: int, seed: int) -> list[Image.Image]:
    return generate_images(pipe, prompt, n=n, steps=SAMPLE_STEPS, seed=seed, guidance=GUIDANCE, resolution=RESOLUTION,
                           batch=8)


def class_images(pipe, class_prompt: str, n: int, seed: int) -> torch.Tensor:
    """The frozen base model's own images of the bare class prompt (DreamBooth's x_pr)."""
    return pil_to_tensor(sample(pipe, class_prompt, n, seed + 50_000))


def personalize(pipe, concept: str, method: Method, seed: int,
                on_step: Callable[[int, int, float], None] | None = None) -> TrainResult | None:
    """Train ``method`` on the concept's reference images; the LoRA stays attached to ``pipe`` (in memory)
    until :func:`reset`. Returns None for the base-model row."""
    if method.steps == 0:
        return None
    c = get_concept(concept)
    refs = reference_images(c, seed=seed)
    instance = pil_to_tensor([im for im, _ in refs])
    class_prompt = f"a {c.cls}"
    cfg = TrainConfig(instance_prompt=f"a {c.phrase()}", class_prompt=class_prompt if method.prior else None,
                      steps=method.steps, rank=method.rank, lr=method.lr, text_lr=method.text_lr,
                      train_text_encoder=method.text, resolution=RESOLUTION, seed=seed, batch_size=2)
    prior = class_images(pipe, class_prompt, method.n_class, seed) if method.prior else None
    trainer = DreamBoothLoraTrainer(DiffusersDenoiser(pipe), DiffusersTextEncoder(pipe), TrainData(instance, prior), cfg)
    return trainer.train(on_step=on_step)


def reset(pipe) -> None:
    """Remove every LoRA layer from the pipeline (back to the base model)."""
    for m in (pipe.unet, pipe.text_encoder):
        detach_lora(m)
        for p in m.parameters():
            p.requires_grad_(False)


def score(evaluator, pipe, concept: str, seed: int, images_per_prompt: int = 2) -> dict:
    """Sample every held-out prompt and the bare class prompt; return per-prompt and mean metrics."""
    c = get_concept(concept)
    refs = reference_images(c, seed=seed)
    ref_imgs, ref_masks = [im for im, _ in refs], np.stack([m for _, m in refs])
    per_prompt = []
    for k, spec in enumerate(prompt_specs(c)):
        prompt = spec.prompt(c.phrase())
        imgs = sample(pipe, prompt, images_per_prompt, seed * 1000 + k)
        m = evaluator.evaluate(imgs, prompt, ref_imgs, ref_masks)
        m["prompt_fidelity"] = evaluator.prompt_fidelity(imgs, spec.expected(c.cls))
        per_prompt.append(m)
    class_imgs = sample(pipe, f"a {c.cls}", 4, seed * 1000 + 999)
    return {
        "subject_fidelity": float(np.mean([m["subject_fidelity"] for m in per_prompt])),
        "prompt_fidelity": float(np.mean([m["prompt_fidelity"] for m in per_prompt])),
        "diversity": float(np.mean([m["diversity"] for m in per_prompt if "diversity" in m])),
        "class_prior_drift": evaluator.prior_preservation(class_imgs, ref_imgs, ref_masks),
        "per_prompt": [{k: v for k, v in m.items() if k != "expected"} for m in per_prompt],
    }


def vae_round_trip(pipe, images: list[Image.Image]) -> list[Image.Image]:
    """Encode and decode through the model's VAE: the best any UNet on this model could draw these images."""
    with torch.no_grad():
        latents = pipe.vae.encode(pil_to_tensor(images)).latent_dist.mean
        return tensor_to_pil(pipe.vae.decode(latents).sample)


def reference_score(evaluator, concept: str, seed: int, pipe=None) -> dict:
    """The ceiling: ideal renders of the concept for each held-out prompt, scored like generated images; with
    ``pipe``, the same renders passed through its VAE are scored too, under ``"through_vae"`` (the ceiling of
    this model)."""
    c = get_concept(concept)
    refs = reference_images(c, seed=seed)
    ref_imgs, ref_masks = [im for im, _ in refs], np.stack([m for _, m in refs])
    views = ["ideal"] + (["through_vae"] if pipe is not None else [])
    sf, pf = {v: [] for v in views}, {v: [] for v in views}
    for k, spec in enumerate(prompt_specs(c)):
        renders = [render_prompt(c, spec, seed=seed * 1000 + k * 10 + j)[0] for j in range(2)]
        for v in views:
            imgs = renders if v == "ideal" else vae_round_trip(pipe, renders)
            sf[v].append(evaluator.subject_fidelity(imgs, ref_imgs, ref_masks, c.cls))
            pf[v].append(evaluator.prompt_fidelity(imgs, spec.expected(c.cls)))
    scores = {v: {"subject_fidelity": float(np.mean(sf[v])), "prompt_fidelity": float(np.mean(pf[v]))} for v in views}
    return scores.pop("ideal") | scores


def timed(fn, *a, **kw):
    t = time.perf_counter()
    out = fn(*a, **kw)
    return out, time.perf_counter() - t
