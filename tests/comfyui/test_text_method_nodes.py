"""Textual Inversion and CatVersion in ComfyUI: the trainer nodes leave the caller's objects clean; a saved
embedding used with the stock ``embedding:NAME`` syntax, and a saved CatVersion file through the KV-concatenation
loader, condition exactly like the engine in memory (and like the diffusers back end); bad files are refused
with both sides named; the training-image loaders."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.comfyui
if not os.environ.get("COMFYUI_PATH"):
    pytest.skip("COMFYUI_PATH is not set: the ComfyUI suite needs a ComfyUI source checkout (v0.3.64 or newer)",
                allow_module_level=True)

from .test_nodes import RES, assert_clean, denoise, encode, images  # noqa: E402

STEPS = 3


@pytest.fixture
def model_dirs(tmp_path, monkeypatch):
    """Empty embeddings / catversion folders for this test, and the CLIPs' tokenizers pointed at the embeddings one."""
    import folder_paths

    dirs = {}
    for kind in ("embeddings", "catversion"):
        d = tmp_path / kind
        d.mkdir()
        monkeypatch.setitem(folder_paths.folder_names_and_paths, kind, ([str(d)], {".safetensors"}))
        folder_paths.filename_list_cache.pop(kind, None)
        dirs[kind] = d
    yield dirs
    for kind in dirs:
        folder_paths.filename_list_cache.pop(kind, None)


def _point_tokenizers(clip, folder, monkeypatch):
    for name in ("clip_l", "clip_g", "clip_h"):
        tok = getattr(clip.tokenizer, name, None)
        if tok is not None:
            monkeypatch.setattr(tok, "embedding_directory", [str(folder)])


def train_ti(objs, **kw):
    from fewshot_personalize.nodes.train_embedding import TrainTextualInversion

    m, c, v = objs
    opt = {"preview_steps": [0], **{k: [val] for k, val in kw.items()}}
    with torch.inference_mode():
        return TrainTextualInversion.execute([m], [c], [v], [images()], ["<sks>"], ["toy"], [2], ["custom prompt"],
                                             [STEPS], [5e-2], [RES], [1], [0], prompt=["a photo of {}"], **opt).args


def train_cv(objs, layers="", **kw):
    from fewshot_personalize.nodes.train_catversion import TrainCatVersion

    m, c, v = objs
    opt = {"preview_steps": [0], **{k: [val] for k, val in kw.items()}}
    with torch.inference_mode():
        return TrainCatVersion.execute([m], [c], [v], [images()], ["toy"], ["object"], [layers], [1], [STEPS], [5e-2],
                                       [RES], [1], [0], **opt).args


def test_textual_inversion_node_and_stock_embedding_syntax(family_case, model_dirs, monkeypatch):
    from fewshot_personalize.nodes.backend.families import model_family
    from fewshot_personalize.nodes.backend.text_encoder import ComfyTextEncoder
    from fewshot_personalize.nodes.save_embedding import SaveEmbedding

    family, _, objs = family_case
    m, c, _ = objs
    before, before_text = denoise(m), encode(c)
    embedding, curve, _ = train_ti(objs, preview_steps=2)
    assert_clean(m, c)
    assert torch.equal(denoise(m), before) and torch.equal(encode(c), before_text)
    assert set(embedding.tensors) == ({"clip_l", "clip_g"} if family == "sdxl" else {"emb_params"})
    assert curve.shape[-1] == 3

    prompt = SaveEmbedding.execute(embedding, "fewshot/sks", False, "a photo of {} on the beach").args[0]
    assert prompt == "a photo of embedding:fewshot/sks on the beach"
    assert (model_dirs["embeddings"] / "fewshot" / "sks.safetensors").is_file()
    _point_tokenizers(c, model_dirs["embeddings"], monkeypatch)
    stock = encode(c, prompt)  # ComfyUI's own tokenizer loads the file

    engine = ComfyTextEncoder(c, model_family(m))
    vectors = [embedding.tensors[k] for k in (("clip_l", "clip_g") if family == "sdxl" else ("emb_params",))]
    engine.install_placeholders({"<sks>": vectors})
    with torch.inference_mode():
        cond, pooled = c.encode_from_tokens(engine.tokenize("a photo of <sks> on the beach"), return_pooled=True)
    torch.testing.assert_close(stock, torch.cat([cond.flatten(), pooled.flatten()]), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(stock, encode(c, "a photo of on the beach"), atol=1e-4)  # the vectors matter
    msg = SaveEmbedding.validate_inputs(filename="fewshot/sks", overwrite=False)
    assert isinstance(msg, str) and "already exists" in msg


def test_catversion_node_loader_and_diffusers_agree(family_case, model_dirs):
    from fewshot_personalize.kernels.backends.diffusers import load_pipeline
    from fewshot_personalize.kernels.backends.diffusers.adapters import PipelineAdapters
    from fewshot_personalize.nodes.catversion import LoadCatVersion, SaveCatVersion

    family, folder, objs = family_case
    m, c, _ = objs
    before, before_text = denoise(m), encode(c)
    out_clip, kv, _, _ = train_cv(objs, preview_steps=2)
    assert_clean(m, c)
    assert torch.equal(denoise(m), before) and torch.equal(encode(c), before_text)
    assert out_clip is not c and out_clip.patcher.object_patches
    trained = encode(out_clip, "a photo of a toy on the beach")
    assert not torch.allclose(trained, encode(c, "a photo of a toy on the beach"), atol=1e-4)

    name = SaveCatVersion.execute(kv, "fewshot/toy", False).args[0]
    assert name == "fewshot/toy.safetensors"
    loaded = LoadCatVersion.execute(c, name, 1.0).args[0]
    torch.testing.assert_close(encode(loaded, "a photo of a toy on the beach"), trained)
    torch.testing.assert_close(encode(LoadCatVersion.execute(c, name, 0.0).args[0], "a toy"), encode(c, "a toy"))
    in_graph = LoadCatVersion.execute(c, "(use the catversion input)", 1.0, catversion=kv).args[0]
    torch.testing.assert_close(encode(in_graph, "a toy"), encode(loaded, "a toy"))
    assert torch.equal(encode(c), before_text)  # the loader works on a clone

    # the same file on the same weights in diffusers gives the same conditioning
    pipe = load_pipeline(str(folder))
    adapters = PipelineAdapters(pipe)
    adapters.load(model_dirs["catversion"] / name)
    ours = adapters.encode(["a photo of a toy on the beach"], with_kv=True)
    with torch.inference_mode():
        cond, pooled = loaded.encode_from_tokens(loaded.tokenize("a photo of a toy on the beach"), return_pooled=True)
    torch.testing.assert_close(cond, ours.context, atol=1e-4, rtol=1e-4)
    if family == "sdxl":
        torch.testing.assert_close(pooled, ours.pooled, atol=1e-4, rtol=1e-4)


def test_catversion_loader_refuses_files_of_other_models(tiny_objects, tiny_sdxl_objects, model_dirs):
    from safetensors.torch import load_file, save_file

    from fewshot_personalize.nodes.catversion import LoadCatVersion, SaveCatVersion

    kv_xl = train_cv(tiny_sdxl_objects)[1]
    name = SaveCatVersion.execute(kv_xl, "xl", False).args[0]
    c = tiny_objects[1]
    with pytest.raises(ValueError, match="trained for a sdxl model, but this model is sd1"):
        LoadCatVersion.execute(c, name, 1.0)
    kv = train_cv(tiny_objects, layers="-1")[1]
    meta = {**kv.metadata, "fsp.width.clip_l": "48"}
    save_file(kv.tensors, str(model_dirs["catversion"] / "wide.safetensors"), metadata=meta)
    with pytest.raises(ValueError, match="48 wide but this model's clip_l encoder is 32"):
        LoadCatVersion.execute(c, "wide.safetensors", 1.0)
    (model_dirs["catversion"] / "junk.safetensors").write_bytes(b"not a file")
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        LoadCatVersion.execute(c, "junk.safetensors", 1.0)
    with pytest.raises(ValueError, match="layer 9 is beyond"):
        train_cv(tiny_objects, layers="9")
    assert load_file(str(model_dirs["catversion"] / name))  # nothing was overwritten
    assert_clean(*tiny_objects[:2])


def test_textual_inversion_node_refuses_a_known_word(tiny_objects, model_dirs):
    from fewshot_personalize.nodes.train_embedding import TrainTextualInversion

    m, c, v = tiny_objects
    with pytest.raises(ValueError, match="already a word"), torch.inference_mode():
        TrainTextualInversion.execute([m], [c], [v], [images()], ["toy"], ["toy"], [1], ["object"], [1], [1e-3],
                                      [RES], [1], [0], preview_steps=[0])
    assert_clean(m, c)


def test_training_image_loaders(tmp_path, monkeypatch):
    import folder_paths
    from PIL import Image

    from fewshot_personalize.nodes.training_images import LoadDemoConcept, LoadImageFolder

    imgs, masks, cls, prompt = LoadDemoConcept.execute("checker_toy", 3, 0).args
    assert imgs.shape == (3, 64, 64, 3) and masks.shape == (3, 64, 64) and cls == "toy" and prompt == "a sks toy"
    assert 0 < masks.mean() < 1 and 0 <= imgs.min() and imgs.max() <= 1

    monkeypatch.setattr(folder_paths, "get_input_directory", lambda: str(tmp_path))
    d = tmp_path / "dog"
    d.mkdir()
    Image.new("RGB", (80, 60), (200, 10, 10)).save(d / "a.png")
    m = np.zeros((60, 80), np.uint8)
    m[10:50, 20:60] = 255
    Image.fromarray(m).save(d / "a_mask.png")
    rgba = np.zeros((40, 40, 4), np.uint8)
    rgba[..., 1], rgba[:20, :, 3] = 255, 255
    Image.fromarray(rgba).save(d / "b.png")
    Image.new("RGB", (50, 50), (0, 0, 255)).save(d / "c.jpg")
    out = LoadImageFolder.execute("dog", 32)
    images_t, masks_t, count = out.args
    assert count == 3 and images_t.shape == (3, 32, 32, 3) and masks_t.shape == (3, 32, 32)
    assert 0.3 < masks_t[0].mean() < 0.7  # from a_mask.png
    assert masks_t[1, :14].mean() > 0.9 and masks_t[1, 18:].mean() < 0.1  # from b.png's transparency
    assert masks_t[2].min() == 1  # c.jpg has no mask: all of it counts
    assert "1 of 3 photos have no mask" in out.ui.as_dict()["text"][0]
    with pytest.raises(ValueError, match="points outside"):
        LoadImageFolder.execute("../elsewhere", 32)
    with pytest.raises(ValueError, match="does not exist"):
        LoadImageFolder.execute("nope", 32)


def test_pivotal_node_then_stock_loraloader_and_embedding_syntax(family_case, loras_dir, model_dirs, monkeypatch,
                                                                 comfy_nodes):
    from fewshot_personalize.nodes.backend.text_encoder import ComfyTextEncoder
    from fewshot_personalize.nodes.save_adapter import SaveAdapter
    from fewshot_personalize.nodes.save_embedding import SaveEmbedding
    from fewshot_personalize.nodes.train_pivotal import TrainPivotal

    family, _, objs = family_case
    m, c, v = objs
    before, before_text = denoise(m), encode(c)
    with torch.inference_mode():
        out_m, out_c, adapter, embedding, _, _ = TrainPivotal.execute(
            [m], [c], [v], [images()], ["<sks>"], ["toy"], [1], ["custom prompt"], [2], [True], [5e-2], [STEPS],
            [1e-3], [RES], [1], [0], prompt=["a photo of {} toy"], preview_steps=[2]).args
    assert_clean(m, c)
    assert torch.equal(denoise(m), before) and torch.equal(encode(c), before_text)
    assert adapter.metadata["fsp.trained_with"] == "pivotal" and embedding.metadata["fsp.token"] == "<sks>"
    lora_name = SaveAdapter.execute(adapter, "pivotal", False).args[0]
    prompt = SaveEmbedding.execute(embedding, "pivotal", False, "a photo of {} toy").args[0]
    stock_m, stock_c = comfy_nodes.LoraLoader().load_lora(m, c, lora_name, 1.0, 1.0)
    _point_tokenizers(stock_c, model_dirs["embeddings"], monkeypatch)
    torch.testing.assert_close(denoise(stock_m), denoise(out_m), atol=1e-5, rtol=1e-5)
    engine = ComfyTextEncoder(out_c, family)
    engine.install_placeholders({"<sks>": [embedding.tensors[k] for k in sorted(embedding.tensors,
                                                                                   key=["emb_params", "clip_l", "clip_g"].index)]})
    with torch.inference_mode():
        cond, pooled = out_c.encode_from_tokens(engine.tokenize("a photo of <sks> toy"), return_pooled=True)
    torch.testing.assert_close(encode(stock_c, prompt), torch.cat([cond.flatten(), pooled.flatten()]), atol=1e-5, rtol=1e-5)
