"""Kohya LoRA files: names, round trip, metadata, refusal of foreign files, safe writes."""

import pytest
import torch
from safetensors.torch import save_file

from fewshot_personalize.kernels.core.errors import UserInputError
from fewshot_personalize.kernels.adapters.lora import LoraWeights
from fewshot_personalize.kernels.formats.metadata import check_family
from fewshot_personalize.kernels.formats.lora_file import (from_kohya, kohya_name, load_lora_file,
                                                     lora_metadata, save_lora_file, to_kohya)
from fewshot_personalize.kernels.formats.safetensors_io import atomic_save, check_output_path, safe_join


def _weights():
    g = torch.Generator().manual_seed(0)
    return {"down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0":
            LoraWeights(torch.randn(4, 32, generator=g), torch.randn(32, 4, generator=g), 2.0)}


def test_kohya_names():
    assert kohya_name("lora_unet_", "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q") == \
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    assert kohya_name("lora_te_", "text_model.encoder.layers.3.self_attn.out_proj") == \
        "lora_te_text_model_encoder_layers_3_self_attn_out_proj"


def test_round_trip(tmp_path):
    w = _weights()
    meta = lora_metadata(family="sd1", method="dreambooth-lora", rank=4, alpha=2.0, steps=10, instance_prompt="a sks toy")
    path = tmp_path / "a.safetensors"
    save_lora_file(path, to_kohya(w, "lora_unet_"), meta)
    loaded, got_meta = load_lora_file(path)
    assert got_meta["fsp.method"] == "dreambooth-lora" and got_meta["fsp.instance_prompt"] == "a sks toy"
    assert got_meta["ss_network_dim"] == "4" and got_meta["fsp.format_version"] == "1"
    back = from_kohya(loaded, "lora_unet_", list(w))
    (path_name, orig), = w.items()
    assert torch.equal(back[path_name].down, orig.down) and torch.equal(back[path_name].up, orig.up)
    assert back[path_name].alpha == 2.0


def test_from_kohya_refuses_layers_the_model_lacks():
    with pytest.raises(UserInputError, match="layers this model does not have"):
        from_kohya(to_kohya(_weights(), "lora_unet_"), "lora_unet_", ["mid_block.attentions.0.proj_in"])


def test_te_prefix_does_not_swallow_sdxl_prefixes():
    w = {"lora_te1_text_model_encoder_layers_0_self_attn_q_proj": LoraWeights(torch.zeros(1, 2), torch.zeros(2, 1), 1.0)}
    assert from_kohya(w, "lora_te_text_model_", ["encoder.layers.0.self_attn.q_proj"]) == {}
    assert list(from_kohya(w, "lora_te1_text_model_", ["encoder.layers.0.self_attn.q_proj"])) == ["encoder.layers.0.self_attn.q_proj"]


def test_foreign_file_is_refused(tmp_path):
    p = tmp_path / "x.safetensors"
    save_file({"model.weight": torch.zeros(2)}, str(p))
    with pytest.raises(UserInputError, match="not a LoRA file"):
        load_lora_file(p)


def test_corrupt_and_empty_files_are_refused(tmp_path):
    (tmp_path / "bad.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(UserInputError, match="not a readable safetensors"):
        load_lora_file(tmp_path / "bad.safetensors")
    (tmp_path / "empty.safetensors").write_bytes(b"")
    with pytest.raises(UserInputError, match="empty"):
        load_lora_file(tmp_path / "empty.safetensors")


def test_missing_up_weight_is_refused(tmp_path):
    p = tmp_path / "half.safetensors"
    save_file({"lora_unet_x.lora_down.weight": torch.zeros(2, 4)}, str(p))
    with pytest.raises(UserInputError, match="lacks its lora_down or lora_up"):
        load_lora_file(p)


def test_family_mismatch_is_refused():
    check_family({"fsp.base_family": "sd1"}, "sd1", "a")
    with pytest.raises(UserInputError, match="trained for a sdxl model"):
        check_family({"ss_base_model_version": "sdxl_base_v1-0"}, "sd1", "a")


def test_atomic_save_never_overwrites_unless_asked(tmp_path):
    p = tmp_path / "a.safetensors"
    atomic_save({"x": torch.ones(1)}, p)
    with pytest.raises(UserInputError, match="already exists"):
        atomic_save({"x": torch.zeros(1)}, p)
    atomic_save({"x": torch.zeros(1)}, p, overwrite=True)
    assert [f.name for f in tmp_path.iterdir()] == ["a.safetensors"]  # no temporary files left


def test_atomic_save_leaves_nothing_on_failure(tmp_path):
    with pytest.raises(Exception):
        atomic_save({"x": "not a tensor"}, tmp_path / "a.safetensors")  # type: ignore[dict-item]
    assert list(tmp_path.iterdir()) == []


def test_output_path_checks(tmp_path):
    with pytest.raises(UserInputError, match="does not exist"):
        check_output_path(tmp_path / "missing" / "a.safetensors")
    with pytest.raises(UserInputError, match="must end in"):
        check_output_path(tmp_path / "a.pt")


def test_safe_join_refuses_escape(tmp_path):
    assert safe_join(tmp_path, "a/b.safetensors") == (tmp_path / "a" / "b.safetensors").resolve()
    for bad in ("../x.safetensors", "/etc/passwd"):
        with pytest.raises(UserInputError, match="outside"):
            safe_join(tmp_path, bad)
