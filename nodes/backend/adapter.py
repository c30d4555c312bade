"""The trained concept adapter as it travels between nodes (socket type ``FSP_ADAPTER``), and how it is put on
a MODEL / CLIP as ordinary ComfyUI weight patches.

An adapter is a set of LoRA layers keyed by kohya names — ``lora_unet_<diffusers module path>``, ``lora_te_…``
(SD1/SD2) or ``lora_te1_/lora_te2_…`` (SDXL) — exactly what the diffusers back end writes to files, so the
in-graph adapter, the saved file and the stock LoraLoader all patch the same weights the same way.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import comfy.lora
import comfy.sd
from comfy_api.latest import io

from ...kernels.core.errors import UserInputError
from ...kernels.adapters.lora import LoraWeights
from ...kernels.formats.lora_file import lora_tensors, parse_lora_tensors
from ...kernels.formats.metadata import check_family

log = logging.getLogger(__name__)

AdapterSocket = io.Custom("FSP_ADAPTER")


@dataclass
class Adapter:
    """LoRA weights by kohya name, the base-model family, and the metadata a file of it would carry."""

    weights: dict[str, LoraWeights]
    family: str
    metadata: dict[str, str] = field(default_factory=dict)

    def tensors(self):
        return lora_tensors(self.weights)

    @property
    def rank(self) -> int:
        return max((w.rank for w in self.weights.values()), default=0)


def adapter_from_file_tensors(tensors, meta: dict[str, str], source: str) -> Adapter:
    weights = parse_lora_tensors(tensors, source)
    return Adapter(weights, meta.get("fsp.base_family", "unknown"), dict(meta))


def apply_adapter(model, clip, adapter: Adapter, strength_model: float, strength_clip: float, family: str | None,
                  source: str = "the adapter"):
    """(MODEL, CLIP) clones carrying ``adapter`` as weight patches (``comfy.sd.load_lora_for_models``).

    Refuses an adapter recorded for another model family, and one with layers the model does not have (e.g.
    an SDXL LoRA on an SD1.5 model), naming the first unknown layer.
    """
    if family is not None:
        check_family(adapter.metadata, family, source)  # files of other trainers may record nothing
    key_map = comfy.lora.model_lora_keys_unet(model.model, {})
    if clip is not None:
        key_map = comfy.lora.model_lora_keys_clip(clip.cond_stage_model, key_map)
    unknown = [n for n in adapter.weights if n not in key_map]
    text_only = [n for n in unknown if not n.startswith("lora_unet_")]
    if clip is None:  # text-encoder layers are simply not applied without a CLIP
        unknown = [n for n in unknown if n.startswith("lora_unet_")]
        if text_only:
            log.warning("%s has %d text-encoder layers; connect a CLIP to apply them", source, len(text_only))
    if unknown:
        raise UserInputError(f"{source} has {len(unknown)} of {len(adapter.weights)} layers this model does not "
                             f"have, e.g. {unknown[0]} (was it trained for another model?)")
    tensors = {k: v for k, v in adapter.tensors().items()}
    return comfy.sd.load_lora_for_models(model, clip, tensors, strength_model, strength_clip)
