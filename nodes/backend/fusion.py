"""Several concepts fused into one ComfyUI MODEL + CLIP (Mix-of-Show, Gu et al. NeurIPS 2023, §3.3).

The same order and objective as the diffusers back end (:mod:`...kernels.backends.diffusers.fusion`): every
concept's tokens installed together; the text encoders' adapted layers fused from the inputs they receive while
each concept's own CLIP (W0 + ΔW_i, as weight patches on a clone) encodes that concept's prompts; then the UNet's
adapted layers from the inputs they receive while each concept's own MODEL samples its prompts (CFG, both halves
recorded) with the *fused* CLIP. Inputs are recorded by forward pre-hooks on the shared modules and folded into
Gram sums as they stream in; each layer's W* − W0 = (Σ ΔW_i G_i)(Σ G_i + λI)⁻¹ is added to clones as a ``diff``
weight patch, so the caller's MODEL and CLIP are never changed, whatever happens (a cancel included).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import comfy.lora
import comfy.sample
import comfy.utils
import torch
from comfy_api.latest import io

from ...kernels.adapters.lora import LoraWeights
from ...kernels.core.errors import UserInputError
from ...kernels.formats.fused_file import fused_metadata, fused_tensors
from ...kernels.formats.lora_file import lora_metadata, lora_tensors
from ...kernels.formats.concept_file import Concept, check_distinct_tokens, concept_from_tensors
from ...kernels.multi_concept.fusion import DEFAULT_RIDGE, FusionSums, low_rank_difference, record_grams
from .adapter import Adapter, apply_adapter
from .families import clip_family, model_family
from .layerwise import cross_attention_order, layerwise_vectors, with_tokens
from .text_encoder import ComfyTextEncoder

log = logging.getLogger(__name__)

ConceptSocket = io.Custom("FSP_CONCEPT")
FUSIONS = ("gradient", "sum", "average")
#: ``progress(stage, done, total)``; raising from it (ComfyUI's Cancel) stops the fusion
Progress = Callable[[str, int, int], None]
#: ``tap(layer, concept index, inputs)``: sees every recorded activation (tests check the fit on them)
Tap = Callable[[str, int, torch.Tensor], None]


@dataclass
class ConceptFile:
    """What travels on an ``FSP_CONCEPT`` socket: a concept's file content (ED-LoRA, DreamBooth-LoRA, pivotal or
    fused), where it came from, and for fusion the prompt to record it on (None: the file's own)."""

    tensors: dict[str, torch.Tensor]
    metadata: dict[str, str]
    source: str
    prompt: str | None = None


@dataclass
class _Layer:
    key: str  # ComfyUI weight key (in model.model or clip.cond_stage_model)
    module: torch.nn.Module
    text: bool


@dataclass
class Fused:
    """The fusion's result: MODEL / CLIP clones, and the file content (difference as LoRA + every token)."""

    model: object
    clip: object
    tensors: dict[str, torch.Tensor]
    metadata: dict[str, str]
    differences: dict[str, torch.Tensor] = field(default_factory=dict)


def model_facts(model, clip) -> tuple[str, dict[str, int], int]:
    """(family, {encoder: width}, cross-attention layers) of a MODEL/CLIP pair, refusing a mismatched pair."""
    family = model_family(model)
    if clip_family(clip) != family:
        raise UserInputError(f"the CLIP is {clip_family(clip)}, the MODEL {family}: connect the pair from one checkpoint")
    widths = {e.name: e.width for e in ComfyTextEncoder(clip, family).encoders}
    return family, widths, len(cross_attention_order(model))


def to_concept(src: ConceptFile, family: str, widths: dict[str, int], layers: int) -> Concept:
    return concept_from_tensors(src.tensors, src.metadata, family=family, widths=widths, layers=layers,
                                source=src.source, prompt=src.prompt)


def _layers(model, clip, concepts: list[Concept]) -> dict[str, _Layer]:
    """Kohya name → the ComfyUI module it adapts, for every layer any concept adapts (refusing unknown ones)."""
    key_map = comfy.lora.model_lora_keys_clip(clip.cond_stage_model, comfy.lora.model_lora_keys_unet(model.model, {}))
    out: dict[str, _Layer] = {}
    for c in concepts:
        for name in c.lora:
            key = key_map.get(name)
            if not isinstance(key, str) or not key.endswith(".weight"):
                raise UserInputError(f"{c.source}: layer {name} is not in this model (was it trained on another one?)")
            text = not name.startswith("lora_unet_")
            root = clip.cond_stage_model if text else model.model
            module = comfy.utils.get_attr(root, key[:-len(".weight")])
            if not isinstance(module, torch.nn.Linear):
                raise UserInputError(f"{c.source}: layer {name} is not a linear layer of this model")
            out[name] = _Layer(key, module, text)
    return out


def fuse_on_comfy(model, clip, sources: list[ConceptFile], fusion: str = "gradient", *, latent: torch.Tensor,
                  samples: int = 2, sample_steps: int = 20, cfg: float = 7.5, seed: int = 0, ridge: float = DEFAULT_RIDGE,
                  rank: int = 0, progress: Progress | None = None, tap: Tap | None = None) -> Fused:
    """Fuse the concepts of ``sources`` (see the module docstring). ``latent``: [1, C, h, w], the size recording
    samples are drawn at; ``rank``: of the saved difference (0 = the summed concept ranks, exact)."""
    if fusion not in FUSIONS:
        raise UserInputError(f"fusion must be one of {', '.join(FUSIONS)}, got {fusion!r}")
    if len(sources) < 2:
        raise UserInputError(f"fusion needs two or more concepts, got {len(sources)}")
    family, widths, n_layers = model_facts(model, clip)
    order = cross_attention_order(model)
    concepts = [to_concept(s, family, widths, n_layers) for s in sources]
    check_distinct_tokens(concepts)
    layers = _layers(model, clip, concepts)
    tokens = {t: v for c in concepts for t, v in layerwise_vectors(c.tokens, widths, n_layers, c.source).items()}
    deltas = [{n: (c.lora[n].delta().float() if n in c.lora else None) for n in layers} for c in concepts]
    report = progress or (lambda *a: None)

    if fusion == "gradient":
        text = {n: lay for n, lay in layers.items() if lay.text}
        unet = {n: lay for n, lay in layers.items() if not lay.text}
        diffs: dict[str, torch.Tensor] = {}

        def record_text(i, c):
            _, ci = apply_adapter(model, clip, Adapter(c.lora, family), 1.0, 1.0, None, c.source)
            _, ci = with_tokens(model, ci, family, tokens, order)
            for p in c.prompts:
                ci.encode_from_tokens(ci.tokenize(p), return_pooled=True)

        diffs.update(_fuse_group("text encoder", text, deltas, concepts, record_text, ridge, report, tap))
        fused_clip = _patched(clip, {layers[n].key: d for n, d in diffs.items()})
        _, fused_tok_clip = with_tokens(model, fused_clip, family, tokens, order)
        negative = fused_tok_clip.encode_from_tokens_scheduled(fused_tok_clip.tokenize(""))

        def record_unet(i, c):
            mi, _ = apply_adapter(model, None, Adapter({n: w for n, w in c.lora.items() if n.startswith("lora_unet_")},
                                                       family), 1.0, 0.0, None, c.source)
            mi, _ = with_tokens(mi, fused_clip, family, tokens, order)
            lat = latent[:1].expand(samples, *latent.shape[1:]).contiguous()
            for p in c.prompts:
                positive = fused_tok_clip.encode_from_tokens_scheduled(fused_tok_clip.tokenize(p))
                noise = comfy.sample.prepare_noise(lat, seed)
                comfy.sample.sample(mi, noise, sample_steps, cfg, "euler", "normal", positive, negative, lat,
                                    denoise=1.0, disable_pbar=True, seed=seed,
                                    callback=lambda *a: report("unet", i, len(concepts)))

        diffs.update(_fuse_group("unet", unet, deltas, concepts, record_unet, ridge, report, tap))
    else:
        diffs = {}
        for n in layers:
            ds = [d[n] for d in deltas if d[n] is not None]
            diffs[n] = torch.stack(ds).sum(0) / (len(concepts) if fusion == "average" else 1)

    out_model = _patched(model, {layers[n].key: d for n, d in diffs.items() if not layers[n].text})
    out_clip = _patched(clip, {layers[n].key: d for n, d in diffs.items() if layers[n].text})
    out_model, out_clip = with_tokens(out_model, out_clip, family, tokens, order)
    lora = {}
    for n, d in diffs.items():
        r = rank or sum(c.lora[n].rank for c in concepts if n in c.lora)
        down, up = low_rank_difference(d, r)
        lora[n] = LoraWeights(down.float(), up.float(), float(down.shape[0]))
    all_tokens = {t: v for c in concepts for t, v in c.tokens.items()}
    top = max(w.rank for w in lora.values())
    meta = fused_metadata(lora_metadata(family=family, method="fused", rank=top, alpha=float(top), steps=0,
                                        trainer="comfyui"), list(all_tokens), fusion, [c.source for c in concepts])
    return Fused(out_model, out_clip, fused_tensors(lora_tensors(lora), all_tokens), meta, diffs)


def _patched(model_or_clip, diffs: dict[str, torch.Tensor]):
    """A clone of a MODEL or CLIP with ``diffs`` added to its weights (ComfyUI ``diff`` patches)."""
    out = model_or_clip.clone()
    if diffs:
        out.add_patches({k: (d.float(),) for k, d in diffs.items()}, 1.0, 1.0)
    return out


def _fuse_group(stage: str, group: dict[str, _Layer], deltas, concepts: list[Concept], record, ridge: float,
                report: Progress, tap: Tap | None) -> dict[str, torch.Tensor]:
    """One stage: per concept, record the group's inputs under that concept's own weights and fold them into the
    sums; then solve every layer. Returns {kohya name: W* − W0}."""
    if not group:
        return {}
    sums = {n: FusionSums() for n in group}
    for i, c in enumerate(concepts):
        report(stage, i, len(concepts))
        grams = record_grams({n: lay.module for n, lay in group.items()}, lambda: record(i, c),
                             tap=None if tap is None else (lambda n, x, i=i: tap(n, i, x)),
                             what=f"the {stage} recorded {c.source}")
        for n in group:
            d = deltas[i][n]
            sums[n].add(torch.zeros(group[n].module.weight.shape, dtype=torch.float64) if d is None else d, grams[n])
    report(stage, len(concepts), len(concepts))
    return {n: sums[n].difference(ridge).float() for n in group}
