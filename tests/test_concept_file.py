"""What a file becomes as a concept to fuse (Mix-of-Show §3.3): its LoRA, its tokens, and the prompts its
activations are recorded on; files that cannot be fused are refused, naming the problem."""

from __future__ import annotations

import pytest
import torch

from fewshot_personalize.kernels.adapters.lora import LoraWeights
from fewshot_personalize.kernels.core.errors import UserInputError
from fewshot_personalize.kernels.formats.concept_file import TOKEN_TEMPLATES, concept_from_tensors
from fewshot_personalize.kernels.formats.edlora_file import edlora_metadata, edlora_tensors
from fewshot_personalize.kernels.formats.lora_file import lora_metadata, lora_tensors

WIDTHS, LAYERS = {"clip_l": 8}, 3


def _lora():
    g = torch.Generator().manual_seed(0)
    return {"lora_unet_down_blocks_0_attn2_to_k": LoraWeights(torch.randn(2, 8, generator=g),
                                                              torch.randn(6, 2, generator=g), 2.0)}


def _edlora(token="<t1>", **fields):
    vectors = {"clip_l": torch.randn(LAYERS, 2, 8)}
    meta = edlora_metadata(lora_metadata(family="sd1", method="ed-lora", rank=2, alpha=2.0, steps=1, **fields), token,
                           vectors)
    return edlora_tensors(lora_tensors(_lora()), vectors), meta


def concept(tensors, meta, prompt=None):
    return concept_from_tensors(tensors, meta, family="sd1", widths=WIDTHS, layers=LAYERS, source="f.safetensors",
                                prompt=prompt)


def test_edlora_is_recorded_on_its_own_caption_and_token_else_mix_of_shows_templates():
    c = concept(*_edlora(instance_prompt="a <t1>"))
    assert c.prompts == ["a <t1>", "<t1>"] and set(c.tokens) == {"<t1>"}
    torch.testing.assert_close(c.lora["lora_unet_down_blocks_0_attn2_to_k"].delta(),
                               _lora()["lora_unet_down_blocks_0_attn2_to_k"].delta())
    assert concept(*_edlora()).prompts == [t.format("<t1>") for t in TOKEN_TEMPLATES]
    assert concept(*_edlora(instance_prompt="a toy")).prompts == [t.format("<t1>") for t in TOKEN_TEMPLATES]
    assert concept(*_edlora(instance_prompt="a <t1>"), prompt=" a <t1> dog ").prompts == ["a <t1> dog"]


def test_dreambooth_lora_uses_its_instance_prompt_or_the_given_one():
    meta = lora_metadata(family="sd1", method="dreambooth-lora", rank=2, alpha=2.0, steps=1,
                         instance_prompt="a sks dog")
    tensors = lora_tensors(_lora())
    assert concept(tensors, meta).prompts == ["a sks dog"] and not concept(tensors, meta).tokens
    assert concept(tensors, meta, "a photo of sks dog").prompts == ["a photo of sks dog"]
    del meta["fsp.instance_prompt"]
    with pytest.raises(UserInputError, match="records no instance prompt"):
        concept(tensors, meta)


def test_files_that_cannot_be_fused_are_refused():
    tensors, meta = _edlora()
    with pytest.raises(UserInputError, match="sdxl"):
        concept_from_tensors(tensors, meta, family="sdxl", widths=WIDTHS, layers=LAYERS, source="f", prompt=None)
    with pytest.raises(UserInputError, match="already a fused file"):
        concept(tensors, {**meta, "fsp.method": "fused"})
    with pytest.raises(UserInputError, match="no LoRA weights"):
        concept({"emb_params": torch.zeros(1, 8)}, {"fsp.method": "textual-inversion", "fsp.base_family": "sd1"})
