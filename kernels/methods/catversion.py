"""CatVersion (Zhao et al. 2023, arXiv 2311.14631, §3.2): learned key and value tokens concatenated in the
self-attention of chosen CLIP text-encoder layers; they act on every prompt while loaded, and the
unconditional (negative) branch is encoded without them. The denoiser stays frozen.

Default layers follow the paper (the last 3 of SD1.5's 12) counted among the layers that feed the conditioning:
with a penultimate-layer model (SD2 in ComfyUI, SDXL, "CLIP skip 2") the last layer's output is not read, so
tokens there would only reach SDXL's pooled vector; the default takes the 3 layers before it instead.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..adapters.kv_concat import init_kv_tokens
from ..core.errors import UserInputError
from ..engine.config import TrainConfig
from ..engine.method import Artifact, Method, ParamGroup
from ..engine.seams import EncoderInfo, Handle
from ..formats.catversion_file import catversion_metadata, catversion_tensors

PAPER_LAYER_COUNT = 3


Layers = tuple[int, ...] | dict[str, tuple[int, ...]] | None


@dataclass
class CatVersionSettings:
    """``layers``: None (the last 3 layers that feed the conditioning, per encoder), indices for every encoder, or
    {encoder name: indices} (an encoder left out gets the default)."""

    layers: Layers = None
    num_tokens: int = 1
    lr: float | None = None

    def __post_init__(self):
        if isinstance(self.layers, dict):
            self.layers = {k: tuple(int(i) for i in v) for k, v in self.layers.items()}
            if not all(self.layers.values()):
                raise UserInputError("CatVersion layers: an encoder was given no layers")
        elif self.layers is not None:
            self.layers = tuple(int(i) for i in self.layers)
            if not self.layers:
                raise UserInputError("--catversion-layers is empty")
        if self.num_tokens < 1:
            raise UserInputError(f"CatVersion needs at least 1 K/V token per layer, got {self.num_tokens}")


def default_layers(enc: EncoderInfo) -> tuple[int, ...]:
    """The last :data:`PAPER_LAYER_COUNT` layers whose output reaches the conditioning."""
    return tuple(range(max(0, enc.used_layers - PAPER_LAYER_COUNT), enc.used_layers))


def parse_layer_spec(text: str) -> Layers:
    """``""`` → None; ``"9,10,11"`` or ``"-3,-2,-1"`` → every encoder; ``"clip_l:9,10,11;clip_g:28,29,30"`` → per
    encoder (SDXL)."""
    text = (text or "").replace(" ", "")
    if not text:
        return None
    try:
        if ":" in text:
            return {name: tuple(int(x) for x in idx.split(",") if x)
                    for name, idx in (part.split(":", 1) for part in text.split(";") if part)}
        return tuple(int(x) for x in text.split(",") if x)
    except ValueError:
        raise UserInputError(f"CatVersion layers {text!r}: give layer numbers like 9,10,11 or -3,-2,-1, or per "
                             "encoder clip_l:9,10,11;clip_g:-3,-2,-1") from None


def resolve_layers(enc: EncoderInfo, layers: Layers) -> tuple[int, ...]:
    """Layer indices for one encoder; negative indices count from the end; refuses indices beyond the model."""
    if isinstance(layers, dict):
        layers = layers.get(enc.name)
    if layers is None:
        return default_layers(enc)
    out = []
    for i in layers:
        j = i + enc.num_layers if i < 0 else i
        if not 0 <= j < enc.num_layers:
            raise UserInputError(f"CatVersion layer {i} is beyond {enc.name}'s {enc.num_layers} layers "
                                 f"(valid: 0–{enc.num_layers - 1} or negative from the end)")
        out.append(j)
    return tuple(sorted(set(out)))


class CatVersion(Method):
    name = "catversion"
    uses_prior = False

    def __init__(self, settings: CatVersionSettings | None = None):
        super().__init__(settings or CatVersionSettings())
        self.kv: dict[str, dict[int, tuple[nn.Parameter, nn.Parameter]]] = {}
        self.num_layers: dict[str, int] = {}
        self._handle: Handle | None = None

    @property
    def changes_text(self) -> bool:
        return True

    def preflight(self, denoiser, text_encoder) -> None:
        if isinstance(self.settings.layers, dict):
            names = {e.name for e in text_encoder.encoders}
            unknown = sorted(set(self.settings.layers) - names)
            if unknown:
                raise UserInputError(f"CatVersion layers name encoder {unknown[0]}, which this model does not have "
                                     f"(it has {', '.join(sorted(names))})")
        for enc in text_encoder.encoders:
            resolve_layers(enc, self.settings.layers)

    def attach(self, denoiser, text_encoder, cfg: TrainConfig) -> list[ParamGroup]:
        s = self.settings
        self.family = text_encoder.family
        tokens, params = {}, {}
        for which, enc in enumerate(text_encoder.encoders):
            self.num_layers[enc.name] = enc.num_layers
            self.kv[enc.name] = {}
            tokens[which] = {}
            for layer in resolve_layers(enc, s.layers):
                k, v = (nn.Parameter(t) for t in init_kv_tokens(s.num_tokens, enc.width))
                self.kv[enc.name][layer] = (k, v)
                tokens[which][layer] = (k, v)
                params[f"kv.{enc.name}.{layer}.k"], params[f"kv.{enc.name}.{layer}.v"] = k, v
        self._handle = text_encoder.install_kv_tokens(tokens)
        return [ParamGroup("kv_tokens", params, s.lr or cfg.lr)]

    def detach(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    def tensors(self) -> dict[str, dict[int, tuple[torch.Tensor, torch.Tensor]]]:
        return {enc: {i: (k.detach().float().cpu().clone(), v.detach().float().cpu().clone())
                      for i, (k, v) in layers.items()} for enc, layers in self.kv.items()}

    def export(self, cfg: TrainConfig, steps: int, **info) -> dict[str, Artifact]:
        kv = self.tensors()
        meta = catversion_metadata(family=self.family, kv=kv, num_layers=self.num_layers, steps=steps,
                                   instance_prompt=cfg.instance_prompt, resolution=cfg.resolution, seed=cfg.seed,
                                   lr=self.settings.lr or cfg.lr, **info)
        return {"catversion": Artifact("catversion", catversion_tensors(kv), meta)}
