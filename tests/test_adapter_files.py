"""Textual Inversion and CatVersion files: what they hold, what the metadata says, and a clear refusal for every
file that does not fit the model."""

import pytest
import torch
from safetensors import safe_open

from fewshot_personalize.kernels.core.errors import UserInputError
from fewshot_personalize.kernels.formats.catversion_file import (catversion_metadata, load_catversion_file,
                                                                 parse_catversion, save_catversion_file)
from fewshot_personalize.kernels.formats.embedding_file import (bundled_tensors, embedding_metadata,
                                                                load_embedding_file, parse_embedding,
                                                                save_embedding_file, split_bundled)
from fewshot_personalize.kernels.formats.metadata import fsp_metadata


def test_metadata_is_written_one_way():
    m = fsp_metadata(method="x", family="sd1", steps=3, train_text_encoder=True, layers=(1, 2), lr=0.5, skip=None)
    assert m == {"fsp.format_version": "1", "fsp.method": "x", "fsp.base_family": "sd1", "fsp.steps": "3",
                 "fsp.train_text_encoder": "true", "fsp.layers": "1,2", "fsp.lr": "0.5"}


def test_embedding_files_round_trip_and_use_the_keys_comfyui_and_diffusers_read(tmp_path):
    one = {"clip_l": torch.randn(2, 32)}
    meta = embedding_metadata(family="sd1", token="<sks>", vectors=one, steps=5, method="textual-inversion")
    save_embedding_file(tmp_path / "a.safetensors", one, meta, "sd1")
    with safe_open(str(tmp_path / "a.safetensors"), "pt") as f:
        assert list(f.keys()) == ["emb_params"] and f.metadata()["fsp.width.clip_l"] == "32"
    back, _ = load_embedding_file(tmp_path / "a.safetensors", {"clip_l": 32}, "sd1")
    assert torch.equal(back["clip_l"], one["clip_l"])

    two = {"clip_l": torch.randn(1, 32), "clip_g": torch.randn(1, 64)}
    meta = embedding_metadata(family="sdxl", token="<sks>", vectors=two, steps=5, method="textual-inversion")
    save_embedding_file(tmp_path / "b.safetensors", two, meta, "sdxl")
    back, _ = load_embedding_file(tmp_path / "b.safetensors", {"clip_l": 32, "clip_g": 64}, "sdxl")
    assert all(torch.equal(back[k], two[k]) for k in two)
    # a plain single-tensor embedding of another trainer (A1111 style) is read too
    assert parse_embedding({"string_to_param.*": torch.ones(3, 32)}, {}, {"clip_l": 32}, "sd1", "x")["clip_l"].shape == (3, 32)


@pytest.mark.parametrize("tensors,meta,encoders,family,message", [
    ({"emb_params": torch.ones(1, 48)}, {}, {"clip_l": 32}, "sd1", "48 wide but this model's clip_l encoder is 32"),
    ({"emb_params": torch.ones(1, 32)}, {"fsp.base_family": "sdxl"}, {"clip_l": 32}, "sd1", "trained for a sdxl model"),
    ({"clip_l": torch.ones(1, 32)}, {}, {"clip_l": 32, "clip_g": 64}, "sdxl", "no vectors for clip_g"),
    ({"a": torch.ones(1, 32), "b": torch.ones(1, 32)}, {}, {"clip_l": 32}, "sd1", "expected one embedding tensor"),
])
def test_embeddings_that_do_not_fit_are_refused(tensors, meta, encoders, family, message):
    with pytest.raises(UserInputError, match=message):
        parse_embedding(tensors, meta, encoders, family, "x.safetensors")


def test_bundled_embeddings_split_from_lora_keys():
    lora = {"lora_unet_a.lora_down.weight": torch.ones(1, 2)}
    both = {**lora, **bundled_tensors("sks", {"clip_l": torch.ones(2, 4)}, "sd1")}
    assert list(both)[-1] == "bundle_emb.sks.string_to_param.*"
    rest, bundles = split_bundled(both)
    assert rest.keys() == lora.keys() and list(bundles) == ["sks"]


def _kv(width=32, layers=(1, 2), n=1):
    return {"clip_l": {i: (torch.randn(n, width), torch.randn(n, width)) for i in layers}}


def test_catversion_file_round_trip(tmp_path):
    kv = _kv()
    meta = catversion_metadata(family="sd1", kv=kv, num_layers={"clip_l": 4}, steps=7, lr=0.01)
    assert meta["fsp.layers.clip_l"] == "1,2" and meta["fsp.num_layers.clip_l"] == "4" and meta["fsp.tokens"] == "1"
    save_catversion_file(tmp_path / "c.safetensors", kv, meta)
    back, m = load_catversion_file(tmp_path / "c.safetensors", {"clip_l": (32, 4)}, "sd1")
    assert all(torch.equal(back["clip_l"][i][j], kv["clip_l"][i][j]) for i in (1, 2) for j in (0, 1))


@pytest.mark.parametrize("change,encoders,family,message", [
    ({}, {"clip_l": (48, 4)}, "sd1", "32 wide but this model's clip_l encoder is 48"),
    ({}, {"clip_l": (32, 2)}, "sd1", "layer 2 of clip_l is beyond this model's 2 layers"),
    ({}, {"clip_l": (32, 4)}, "sdxl", "trained for a sd1 model, but this model is sdxl"),
    ({}, {"clip_h": (32, 4)}, "sd2", "trained for a sd1 model"),
    ({"fsp.method": "textual-inversion"}, {"clip_l": (32, 4)}, "sd1", "not a CatVersion adapter"),
    ({"fsp.catversion_version": "9"}, {"clip_l": (32, 4)}, "sd1", "format version 9"),
])
def test_catversion_files_that_do_not_fit_are_refused(change, encoders, family, message):
    kv = _kv()
    meta = {**catversion_metadata(family="sd1", kv=kv, num_layers={"clip_l": 4}, steps=1), **change}
    from fewshot_personalize.kernels.formats.catversion_file import catversion_tensors
    with pytest.raises(UserInputError, match=message):
        parse_catversion(catversion_tensors(kv), meta, encoders, family, "c.safetensors")


def test_a_corrupt_file_is_refused_with_its_name(tmp_path):
    p = tmp_path / "broken.safetensors"
    p.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{bad json")
    with pytest.raises(UserInputError, match="broken.safetensors is not a readable safetensors file"):
        load_catversion_file(p, {"clip_l": (32, 4)}, "sd1")
