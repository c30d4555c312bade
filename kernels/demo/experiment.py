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

from ..adapters.lora import ALL_LAYERS, UNET_TARGETS
from ..augment.settings import AugmentSettings
from ..backends.diffusers import DiffusersDenoiser, DiffusersTextEncoder, load_pipeline
from ..backends.diffusers.adapters import PipelineAdapters
from ..backends.diffusers.generate import generate_images, use_sampler
from ..core.images import pil_to_tensor
from ..engine.config import TrainConfig
from ..engine.data import TrainData
from ..engine.loop import Trainer, TrainResult
from ..engine.method import Artifact
from ..methods import (CatVersion, CatVersionSettings, DreamBoothLora, EdLora, EdLoraSettings, LoraSettings,
                       PivotalSettings, PivotalTuning,
                       TextualInversion, TextualInversionSettings)
from .concepts import get_concept, prompt_specs, reference_images, render_prompt
from .model import RESOLUTION, demo_model_path
from .vae_quality import round_trip

TOKEN = "<sks>"


@dataclass
class Recipe:
    """A benchmark row: which method learns the concept and how (``steps=0``: the base model, no
    personalization). The DreamBooth defaults are the recipe every DreamBooth row shares: 400 steps at 3e-3 beat
    200 at 1e-3 (subject fidelity 0.556 vs 0.464 at the same drift; README)."""

    name: str
    method: str = DreamBoothLora.name
    steps: int = 400
    prior: bool = False
    text: bool = False
    rank: int = 4
    batch_size: int = 2
    lr: float = 3e-3
    text_lr: float = 1.5e-3
    n_class: int = 16
    num_vectors: int = 1
    embedding_lr: float = 5e-3
    catversion_layers: tuple[int, ...] | None = None
    #: UNet layers the LoRA adapts: attention projections (DreamBooth-LoRA's usual choice), or ``("all",)``: every
    #: linear and 2-D convolution, as ComfyUI's TrainLoraNode and kohya's LoCon do
    unet_targets: tuple[str, ...] = UNET_TARGETS

    def phrase(self, concept) -> str:
        """The subject phrase of prompts: ``sks toy`` (DreamBooth), ``<sks> toy`` (token methods), ``<sks>``
        (ED-LoRA: its second word is the class word), or the bare class word (CatVersion acts on every prompt)."""
        if self.method == CatVersion.name:
            return concept.cls
        if self.method == EdLora.name:
            return TOKEN
        if self.method in (TextualInversion.name, PivotalTuning.name):
            return f"{TOKEN} {concept.cls}"
        return concept.phrase()

    def build(self, concept):
        """The engine method of this row, for one concept."""
        lora = LoraSettings(rank=self.rank, train_text_encoder=self.text, text_lr=self.text_lr,
                            unet_targets=self.unet_targets)
        token = TextualInversionSettings(token=TOKEN, init_word=concept.cls, num_vectors=self.num_vectors)
        if self.method == TextualInversion.name:
            return TextualInversion(token)
        if self.method == CatVersion.name:
            return CatVersion(CatVersionSettings(layers=self.catversion_layers))
        if self.method == PivotalTuning.name:
            token.lr = self.embedding_lr
            return PivotalTuning(PivotalSettings(lora=lora, embedding=token))
        if self.method == EdLora.name:
            return EdLora(EdLoraSettings(token=TOKEN, init_word=concept.cls, lora=lora, embedding_lr=self.embedding_lr))
        return DreamBoothLora(lora)


METHODS = (
    Recipe("base model (no personalization)", steps=0),
    Recipe("DreamBooth-LoRA, no prior, UNet"),
    Recipe("DreamBooth-LoRA, prior, UNet", prior=True),
    Recipe("DreamBooth-LoRA, no prior, UNet + text encoder", text=True),
    Recipe("DreamBooth-LoRA, prior, UNet + text encoder", prior=True, text=True),
    Recipe("Textual Inversion", method=TextualInversion.name, lr=5e-3),
    Recipe("CatVersion", method=CatVersion.name, lr=1e-2),
    Recipe("pivotal tuning (TI + DreamBooth-LoRA, prior, UNet)", method=PivotalTuning.name, prior=True),
    Recipe("ED-LoRA (layer-wise tokens + LoRA, prior, UNet + text encoder)", method=EdLora.name, prior=True, text=True),
    Recipe("DreamBooth-LoRA, prior, every UNet layer + text encoder", prior=True, text=True, unet_targets=(ALL_LAYERS,)),
)
#: the demo's and ``--base demo``'s DreamBooth recipe: LoRA on every UNet layer keeps the figure whole where attention-only
#: LoRA breaks it into fragments, and scores higher on the bench (README)
DEFAULT_METHOD = METHODS[9]


def recipe_for(method: str) -> Recipe:
    """The benchmark's recipe of a method kind (DreamBooth-LoRA: the default row, prior + UNet + text)."""
    if method == DEFAULT_METHOD.method:
        return DEFAULT_METHOD
    for r in METHODS:
        if r.method == method:
            return r
    raise ValueError(f"no demo recipe for method {method!r}")

SAMPLE_STEPS = 20
GUIDANCE = 4.0


def demo_pipeline():
    pipe = load_pipeline(str(demo_model_path()))
    use_sampler(pipe, "dpm")
    return pipe


def sample(pipe, prompt: str, n: int, seed: int, adapters: PipelineAdapters | None = None) -> list[Image.Image]:
    return generate_images(pipe, prompt, n=n, steps=SAMPLE_STEPS, seed=seed, guidance=GUIDANCE, resolution=RESOLUTION,
                           batch=8, adapters=adapters)


def class_images(pipe, class_prompt: str, n: int, seed: int) -> torch.Tensor:
    """The frozen base model's own images of the bare class prompt (DreamBooth's x_pr)."""
    return pil_to_tensor(sample(pipe, class_prompt, n, seed + 50_000))


@dataclass
class Personalized:
    """A trained concept on the pipeline: the training result, the files it would write, and the adapters that
    apply them to the pipeline (``remove()`` restores the base model exactly)."""

    recipe: Recipe
    result: TrainResult
    artifacts: dict[str, Artifact]
    adapters: PipelineAdapters

    def remove(self) -> None:
        self.adapters.remove()


def personalize(pipe, concept: str, recipe: Recipe, seed: int,
                on_step: Callable[[int, int, float], None] | None = None,
                references: list[tuple[Image.Image, np.ndarray]] | None = None,
                augment: AugmentSettings | None = None,
                background_loss_weight: float = 1.0) -> Personalized | None:
    """Train ``recipe`` on the concept's reference images (or ``references``), then apply its exported files to
    ``pipe`` the way a user's files would be applied (until :meth:`Personalized.remove`). Returns None for the
    base-model row. With ``augment`` the subject masks go along for background replacement; the loss covers the
    whole image unless ``background_loss_weight`` < 1 (a masked loss: the rest of the image weighted that much,
    which also sends the masks along)."""
    if recipe.steps == 0:
        return None
    c = get_concept(concept)
    refs = references if references is not None else reference_images(c, seed=seed)
    instance = pil_to_tensor([im for im, _ in refs])
    use_masks = augment is not None or background_loss_weight < 1
    masks = torch.from_numpy(np.stack([m for _, m in refs])).float()[:, None] if use_masks else None
    class_prompt = f"a {c.cls}"
    cfg = TrainConfig(instance_prompts=f"a {recipe.phrase(c)}", class_prompt=class_prompt if recipe.prior else None,
                      steps=recipe.steps, lr=recipe.lr, resolution=RESOLUTION, seed=seed,
                      batch_size=recipe.batch_size, augment=augment,
                      background_loss_weight=background_loss_weight)
    prior = class_images(pipe, class_prompt, recipe.n_class, seed) if recipe.prior else None
    with Trainer(DiffusersDenoiser(pipe), DiffusersTextEncoder(pipe), recipe.build(c),
                 TrainData(instance, prior, masks), cfg) as trainer:
        result = trainer.train(on_step=on_step)
        artifacts = trainer.export(base_model="demo")
    adapters = PipelineAdapters(pipe)
    main = artifacts.get("pivotal") or next(iter(artifacts.values()))
    adapters.apply(main.tensors, main.metadata, f"the trained {recipe.method}")
    return Personalized(recipe, result, artifacts, adapters)


def score(evaluator, pipe, concept: str, seed: int, images_per_prompt: int = 2,
          personalized: Personalized | None = None, described: str | None = None) -> dict:
    """Sample every held-out prompt and the bare class prompt; return per-prompt and mean metrics. ``described``:
    the subject written in plain words instead of its identifier phrase (``"red ball with yellow stripes"``: what
    the base model draws from a description alone)."""
    c = get_concept(concept)
    refs = reference_images(c, seed=seed)
    ref_imgs, ref_masks = [im for im, _ in refs], np.stack([m for _, m in refs])
    phrase = described or (personalized.recipe.phrase(c) if personalized else c.phrase())
    adapters = personalized.adapters if personalized else None
    per_prompt = []
    for k, spec in enumerate(prompt_specs(c)):
        prompt = spec.prompt(phrase)
        imgs = sample(pipe, prompt, images_per_prompt, seed * 1000 + k, adapters)
        m = evaluator.evaluate(imgs, prompt, ref_imgs, ref_masks, subject_cls=c.cls if described else None)
        m["prompt_fidelity"] = evaluator.prompt_fidelity(imgs, spec.expected(c.cls))
        per_prompt.append(m)
    class_imgs = sample(pipe, f"a {c.cls}", 4, seed * 1000 + 999, adapters)
    return {
        "subject_fidelity": float(np.mean([m["subject_fidelity"] for m in per_prompt])),
        "pattern_fidelity": float(np.mean([m["pattern_fidelity"] for m in per_prompt])),
        "prompt_fidelity": float(np.mean([m["prompt_fidelity"] for m in per_prompt])),
        "diversity": float(np.mean([m["diversity"] for m in per_prompt if "diversity" in m])),
        "class_prior_drift": evaluator.prior_preservation(class_imgs, ref_imgs, ref_masks),
        "per_prompt": [{k: v for k, v in m.items() if k != "expected"} for m in per_prompt],
    }


def reference_score(evaluator, concept: str, seed: int, pipe=None) -> dict:
    """The ceiling: ideal renders of the concept for each held-out prompt, scored like generated images; with
    ``pipe``, the same renders passed through its VAE are scored too, under ``"through_vae"`` (the ceiling of
    this model)."""
    c = get_concept(concept)
    refs = reference_images(c, seed=seed)
    ref_imgs, ref_masks = [im for im, _ in refs], np.stack([m for _, m in refs])
    views = ["ideal"] + (["through_vae"] if pipe is not None else [])
    metrics = ("subject_fidelity", "pattern_fidelity", "prompt_fidelity")
    got = {v: {k: [] for k in metrics} for v in views}
    for k, spec in enumerate(prompt_specs(c)):
        renders = [render_prompt(c, spec, seed=seed * 1000 + k * 10 + j)[0] for j in range(2)]
        for v in views:
            imgs = renders if v == "ideal" else round_trip(pipe.vae, renders)
            for key, value in evaluator.fidelities(imgs, ref_imgs, ref_masks, c.cls).items():
                got[v][key].append(value)
            got[v]["prompt_fidelity"].append(evaluator.prompt_fidelity(imgs, spec.expected(c.cls)))
    scores = {v: {k: float(np.mean(got[v][k])) for k in metrics} for v in views}
    return scores.pop("ideal") | scores


def timed(fn, *a, **kw):
    t = time.perf_counter()
    out = fn(*a, **kw)
    return out, time.perf_counter() - t
