"""Several concepts fused into one diffusers pipeline (Mix-of-Show, Gu et al. NeurIPS 2023, §3.3).

Order as Mix-of-Show: (1) every concept's tokens are installed together; (2) the text encoders' adapted layers are
fused from the inputs they receive while each concept's own text encoder (W0 + ΔW_i) encodes that concept's
prompts; (3) the UNet's adapted layers are fused from the inputs they receive while each concept's own UNet samples
that concept's prompts with the *fused* text encoder (so the cross-attention K/V layers see fused text features,
the other layers the activations of sampling). Each layer is solved in closed form from Gram matrices
(:mod:`...multi_concept.fusion`); the concepts' Grams are folded into two sums as they stream in.

Inputs recorded: every token position of every prompt (the UNet attends to all 77, padding included), both halves
of classifier-free guidance while sampling. Mix-of-Show's own choices differ in detail (text-encoder fusion on the
new-token and end positions only); the objective is the same.

``sum`` and ``average`` are the weight-fusion baselines (W0 + Σ ΔW_i, W0 + mean ΔW_i), with no recording.
Anything that goes wrong, a cancel included, leaves the pipeline as it was.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ...adapters.lora import ADAPTABLE_LAYERS, LoraWeights
from ...core.errors import UserInputError
from ...formats.lora_file import from_kohya
from ...formats.safetensors_io import load_safetensors
from ...formats.concept_file import Concept, check_distinct_tokens, concept_from_tensors
from ...multi_concept.fusion import DEFAULT_RIDGE, FusionSums, low_rank_difference, record_grams
from .adapters import PipelineAdapters, adapter_modules
from .denoiser import DiffusersDenoiser
from .generate import generate_images

FUSIONS = ("gradient", "sum", "average")

#: ``progress(stage, done, total)``; raising from it cancels the fusion (the pipeline is left as it was)
Progress = Callable[[str, int, int], None]
#: ``tap(layer, concept index, inputs)``: sees every recorded activation (benchmarks compare solvers on them)
Tap = Callable[[str, int, torch.Tensor], None]


def load_concept(pipe, path: str | os.PathLike, prompt: str | None = None) -> Concept:
    """A concept from an ED-LoRA, DreamBooth-LoRA or pivotal file (:func:`...formats.concept_file.concept_from_tensors`)."""
    tensors, meta = load_safetensors(path)
    adapters = PipelineAdapters(pipe)
    return concept_from_tensors(tensors, meta, family=adapters.family, widths=adapters.encoder_widths(),
                                layers=DiffusersDenoiser(pipe).cross_attention_layers(), source=str(path),
                                prompt=prompt)


@dataclass
class FusedConcepts:
    """The result, already in the pipeline: fused weights and every concept's tokens. :meth:`difference` gives
    W* − W0 per layer (kohya names); :meth:`remove` restores the pipeline exactly."""

    pipe: object
    adapters: PipelineAdapters
    fusion: str
    concepts: list[Concept]
    base: dict[str, torch.Tensor]
    modules: dict[str, torch.nn.Linear]

    def difference(self) -> dict[str, torch.Tensor]:
        return {n: (m.weight.detach().float() - self.base[n].float()).cpu() for n, m in self.modules.items()}

    def low_rank(self, rank: int | None = None) -> dict[str, LoraWeights]:
        """The difference as LoRA weights (α = rank: scale 1); ``rank`` None: the summed concept ranks (exact)."""
        out = {}
        for name, diff in self.difference().items():
            r = rank or sum(c.lora[name].rank for c in self.concepts if name in c.lora)
            down, up = low_rank_difference(diff, r)
            out[name] = LoraWeights(down.float(), up.float(), float(down.shape[0]))
        return out

    def tokens(self) -> dict[str, dict[str, torch.Tensor]]:
        return {t: v for c in self.concepts for t, v in c.tokens.items()}

    def remove(self) -> None:
        _restore(self.modules, self.base)
        self.adapters.remove()


def fuse_concepts(pipe, concepts: list[Concept], fusion: str = "gradient", *, ridge: float = DEFAULT_RIDGE,
                  sample_steps: int = 20, samples: int = 2, guidance: float = 7.5, resolution: int | None = None,
                  seed: int = 0, progress: Progress | None = None, tap: Tap | None = None) -> FusedConcepts:
    """Fuse ``concepts`` into ``pipe`` (see the module docstring); returns what was done, for sampling and saving."""
    if fusion not in FUSIONS:
        raise UserInputError(f"fusion must be one of {', '.join(FUSIONS)}, got {fusion!r}")
    if len(concepts) < 2:
        raise UserInputError(f"fusion needs two or more concepts, got {len(concepts)}")
    check_distinct_tokens(concepts)
    modules = _adapted_modules(pipe, concepts)
    base = {n: m.weight.detach().clone() for n, m in modules.items()}
    deltas = [{n: (c.lora[n].delta().reshape(base[n].shape) if n in c.lora else None) for n in modules}
              for c in concepts]
    adapters = PipelineAdapters(pipe)
    done = FusedConcepts(pipe, adapters, fusion, concepts, base, modules)
    report = progress or (lambda *a: None)
    try:
        if fusion != "gradient":
            for n, m in modules.items():
                ds = [d[n] for d in deltas if d[n] is not None]
                total = torch.stack(ds).sum(0) / (len(concepts) if fusion == "average" else 1)
                _set(m, base[n] + total.to(base[n].device, base[n].dtype))
        for c in concepts:  # (1) tokens of every concept together
            for token, vectors in c.tokens.items():
                adapters.add_tokens(token, vectors, c.source)
        if fusion == "gradient":
            text = {n: m for n, m in modules.items() if not n.startswith("lora_unet_")}
            unet = {n: m for n, m in modules.items() if n.startswith("lora_unet_")}
            record_text = lambda c: adapters.encode(c.prompts, with_kv=False)  # noqa: E731  (2)
            record_unet = lambda c: [generate_images(  # noqa: E731  (3)
                pipe, p, n=samples, steps=sample_steps, seed=seed, guidance=guidance, resolution=resolution,
                batch=samples, adapters=adapters) for p in c.prompts]
            for stage, group, record in (("text encoder", text, record_text), ("unet", unet, record_unet)):
                if group:
                    _fuse_group(stage, group, base, deltas, concepts, record, ridge, report, tap)
    except BaseException:
        done.remove()
        raise
    return done


def _adapted_modules(pipe, concepts: list[Concept]) -> dict[str, torch.nn.Linear]:
    """Kohya name → Linear module of every layer any concept adapts (refusing layers the model lacks)."""
    out: dict[str, torch.nn.Linear] = {}
    for prefix, root in adapter_modules(pipe).items():
        layers = {p: m for p, m in root.named_modules() if isinstance(m, ADAPTABLE_LAYERS)}
        for c in concepts:
            try:
                mapped = from_kohya(c.lora, prefix, layers)
            except UserInputError as e:
                raise UserInputError(f"{c.source}: {e}") from None
            for path in mapped:
                if isinstance(layers[path], torch.nn.Conv2d):
                    raise UserInputError(f"{c.source}: layer {path} is a convolution; gradient fusion fuses linear "
                                         "layers (train the concepts with attention targets, not 'all')")
                out[prefix + path.replace(".", "_")] = layers[path]
    unknown = [n for c in concepts for n in c.lora if n not in out]
    if unknown:
        raise UserInputError(f"layer {unknown[0]} is not in this model (was the adapter trained on another one?)")
    return out


def _fuse_group(stage: str, group: dict[str, torch.nn.Linear], base, deltas, concepts, record, ridge, report,
                tap: Tap | None) -> None:
    """One stage: per concept, its own weights on the group, record the group's inputs, fold them into the sums;
    then solve every layer and set the fused weights."""
    sums = {n: FusionSums() for n in group}
    for i, c in enumerate(concepts):
        report(stage, i, len(concepts))
        for n, m in group.items():
            d = deltas[i][n]
            _set(m, base[n] if d is None else base[n] + d.to(base[n].device, base[n].dtype))
        grams = record_grams(group, lambda: record(c), tap=None if tap is None else (lambda n, x, i=i: tap(n, i, x)),
                             what=f"the {stage} recorded {c.source}")
        for n in group:
            d = deltas[i][n]
            sums[n].add(torch.zeros_like(base[n], dtype=torch.float64) if d is None else d, grams[n])
    report(stage, len(concepts), len(concepts))
    for n, m in group.items():
        _set(m, sums[n].solve(base[n], ridge))


def _set(module: torch.nn.Linear, weight: torch.Tensor) -> None:
    with torch.no_grad():
        module.weight.copy_(weight)


def _restore(modules: dict[str, torch.nn.Linear], base: dict[str, torch.Tensor]) -> None:
    for n, m in modules.items():
        _set(m, base[n])
