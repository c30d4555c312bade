"""Several concepts in ComfyUI (Mix-of-Show §3.2–3.3): ED-LoRA trained in the graph (each layer's tokens learn on
their own), saved and re-applied exactly; gradient fusion that agrees with the diffusers back end on the text
encoder and reproduces a shared LoRA exactly; the sum baseline equals two stock LoraLoaders; a saved fused file
re-applies as fused; cancel and bad input leave the caller's objects untouched."""

from __future__ import annotations

import os

import pytest
import torch

pytestmark = pytest.mark.comfyui
if not os.environ.get("COMFYUI_PATH"):
    pytest.skip("COMFYUI_PATH is not set: the ComfyUI suite needs a ComfyUI source checkout (v0.3.64 or newer)",
                allow_module_level=True)

from .test_layerwise_nodes import _write_edlora  # noqa: E402
from .test_nodes import RES, assert_clean, denoise, encode, images  # noqa: E402


def _concept(path):
    from fewshot_personalize.kernels.formats.safetensors_io import load_safetensors
    from fewshot_personalize.nodes.backend.fusion import ConceptFile

    tensors, meta = load_safetensors(path)
    return ConceptFile(tensors, meta, os.path.basename(path))


def _latent(m):
    return {"samples": torch.zeros(1, 4, 8, 8)}


def _fuse(m, c, concepts, fusion="gradient", **kw):
    from fewshot_personalize.nodes.fuse import FuseConcepts

    opts = dict(samples=1, steps=2, cfg=5.0, seed=0, save_rank=0) | kw
    with torch.inference_mode():
        return FuseConcepts.execute(m, c, _latent(m), concepts[0], concepts[1], fusion, opts["samples"], opts["steps"],
                                    opts["cfg"], opts["seed"], opts["save_rank"],
                                    *(concepts[2:] + [None] * (4 - len(concepts)))[:2]).args


def _two_files(pipe, family, loras_dir, same_lora=False):
    paths = []
    for i, token in enumerate(("<aa1>", "<bb2>")):
        p = loras_dir / f"{token.strip('<>')}.safetensors"
        _write_edlora(pipe, family, p, seed=i, token=token, same_lora_seed=7 if same_lora else None)
        paths.append(p)
    return paths


def test_edlora_node_trains_per_layer_tokens_saves_and_reapplies(family_case, loras_dir):
    from fewshot_personalize.kernels.backends.diffusers import load_pipeline
    from fewshot_personalize.kernels.backends.diffusers.adapters import PipelineAdapters
    from fewshot_personalize.kernels.formats.edlora_file import parse_edlora
    from fewshot_personalize.nodes.apply_layerwise import ApplyLayerwiseConcepts
    from fewshot_personalize.nodes.backend.layerwise import cross_attention_order
    from fewshot_personalize.nodes.save_concept import SaveConcept
    from fewshot_personalize.nodes.train_edlora import TrainEdLora

    family, folder, (m, c, v) = family_case
    before, before_text = denoise(m), encode(c)
    with torch.inference_mode():
        out_m, out_c, concept, _, preview = TrainEdLora.execute(
            [m], [c], [v], [images()], ["<toy1>"], ["toy"], ["custom prompt"], [2], [5e-2], [1e-3], [3], [1e-3],
            [RES], [1], [0], prompt=["a photo of a {}"], preview_steps=[2]).args
    assert_clean(m, c)
    assert torch.equal(denoise(m), before) and torch.equal(encode(c), before_text)
    assert preview.shape[-1] == 3 and torch.isfinite(preview).all()
    layers = len(cross_attention_order(m))
    meta = concept.metadata
    assert meta["fsp.method"] == "ed-lora" and meta["fsp.token"] == "<toy1>" and meta["fsp.layers"] == str(layers)
    widths = {k[len("fsp.width."):]: int(w) for k, w in meta.items() if k.startswith("fsp.width.")}
    _, vectors, _ = parse_edlora(concept.tensors, meta, widths, layers, family, "trained")
    for vec in vectors.values():  # all layers start equal; each layer's copy gets its own gradient
        assert vec.shape[:2] == (layers, 2)
        assert not torch.allclose(vec[0], vec[-1])

    name = SaveConcept.execute(concept, "edlora/toy1", False).args[0]
    m2, c2 = ApplyLayerwiseConcepts.execute(m, c, name, 1.0, 1.0).args
    prompt = "a photo of a <toy1> on the beach"
    torch.testing.assert_close(encode(c2, prompt), encode(out_c, prompt), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(denoise(m2), denoise(out_m), atol=1e-5, rtol=1e-5)
    adapters = PipelineAdapters(load_pipeline(str(folder)))  # the diffusers back end reads the same file alike
    assert adapters.load(loras_dir / name) == "ed-lora"
    with torch.inference_mode():
        cond = out_c.encode_from_tokens(out_c.tokenize(prompt))
    torch.testing.assert_close(cond, adapters.encode([prompt], with_kv=False).context, atol=1e-4, rtol=1e-4)


def test_gradient_fusion_text_stage_equals_the_diffusers_back_end(family_case, loras_dir):
    from fewshot_personalize.kernels.backends.diffusers import load_pipeline
    from fewshot_personalize.kernels.backends.diffusers.fusion import fuse_concepts, load_concept
    from fewshot_personalize.nodes.backend.fusion import fuse_on_comfy

    family, folder, (m, c, _) = family_case
    pipe = load_pipeline(str(folder))
    paths = _two_files(pipe, family, loras_dir)
    with torch.inference_mode():
        ours = fuse_on_comfy(m, c, [_concept(p) for p in paths], "gradient", latent=torch.zeros(1, 4, 8, 8),
                             samples=1, sample_steps=2)
    with torch.no_grad():
        theirs = fuse_concepts(pipe, [load_concept(pipe, p) for p in paths], "gradient", sample_steps=2, samples=1,
                               resolution=32).difference()
    text = [n for n in theirs if not n.startswith("lora_unet_")]
    assert text and set(theirs) == set(ours.differences)
    for n in text:
        torch.testing.assert_close(ours.differences[n], theirs[n], atol=1e-4, rtol=1e-3)


def test_gradient_fusion_of_a_shared_lora_reproduces_it_and_sum_equals_stock_loraloaders(tiny_objects, tiny_folder,
                                                                                        loras_dir, comfy_nodes):
    from fewshot_personalize.kernels.backends.diffusers import load_pipeline
    from fewshot_personalize.kernels.formats.lora_file import parse_lora_tensors
    from fewshot_personalize.nodes.backend.fusion import fuse_on_comfy

    m, c, _ = tiny_objects
    before, before_text = denoise(m), encode(c)
    paths = _two_files(load_pipeline(str(tiny_folder)), "sd1", loras_dir, same_lora=True)
    concepts = [_concept(p) for p in paths]
    grams = {}

    def tap(layer, i, x):
        rows = x.reshape(-1, x.shape[-1]).double()
        grams[layer] = grams.get(layer, 0) + rows.T @ rows

    with torch.inference_mode():
        result = fuse_on_comfy(m, c, concepts, "gradient", latent=torch.zeros(1, 4, 8, 8), samples=2, sample_steps=3,
                               tap=tap)
    assert torch.equal(denoise(m), before) and torch.equal(encode(c), before_text)
    lora = parse_lora_tensors({k: v for k, v in concepts[0].tensors.items() if not k.startswith("edlora_emb.")}, "a")
    assert set(grams) == set(lora) == set(result.differences)
    # every concept wants the same ΔW: on the recorded inputs X the fused layer gives ΔW X (relative error of the
    # outputs, tr(E G Eᵀ) / tr(ΔW G ΔWᵀ); directions no input took are the ridge's, and harmless)
    for n, w in lora.items():
        dw, err = w.delta().double(), result.differences[n].double() - w.delta().double()
        rel = float(torch.trace(err @ grams[n] @ err.T) / torch.trace(dw @ grams[n] @ dw.T)) ** 0.5
        assert rel < 0.02, (n, rel)
    assert result.metadata["fsp.method"] == "fused" and result.metadata["fsp.fusion"] == "gradient"

    sum_m, sum_c, _ = _fuse(m, c, concepts, "sum")  # plain sum = both LoRAs at strength 1 (stock LoraLoader)
    stock_m, stock_c = m, c
    for p in paths:
        stock_m, stock_c = comfy_nodes.LoraLoader().load_lora(stock_m, stock_c, p.name, 1.0, 1.0)
    torch.testing.assert_close(denoise(sum_m), denoise(stock_m), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(encode(sum_c, "a photo of a toy"), encode(stock_c, "a photo of a toy"),
                               atol=1e-5, rtol=1e-5)
    avg_m, _, _ = _fuse(m, c, concepts, "average")  # the average of two equal LoRAs is that LoRA
    one_m, _ = comfy_nodes.LoraLoader().load_lora(m, c, paths[0].name, 1.0, 1.0)
    torch.testing.assert_close(denoise(avg_m), denoise(one_m), atol=1e-5, rtol=1e-5)
    assert torch.equal(denoise(m), before)


def test_saved_fused_file_reapplies_as_the_fused_model(family_case, loras_dir):
    from fewshot_personalize.kernels.backends.diffusers import load_pipeline
    from fewshot_personalize.nodes.apply_layerwise import ApplyLayerwiseConcepts
    from fewshot_personalize.nodes.save_concept import SaveConcept

    family, folder, (m, c, _) = family_case
    concepts = [_concept(p) for p in _two_files(load_pipeline(str(folder)), family, loras_dir)]
    fused_m, fused_c, fused = _fuse(m, c, concepts, "gradient")
    name = SaveConcept.execute(fused, "fused/two", False).args[0]
    m2, c2 = ApplyLayerwiseConcepts.execute(m, c, name, 1.0, 1.0).args
    prompt = "a <aa1> and a <bb2> on the beach"
    torch.testing.assert_close(encode(c2, prompt), encode(fused_c, prompt), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(denoise(m2), denoise(fused_m), atol=1e-4, rtol=1e-4)
    with pytest.raises(Exception, match="already exists"):
        SaveConcept.execute(fused, "fused/two", False)


def test_cancel_and_bad_input_leave_the_caller_untouched(tiny_objects, tiny_folder, tiny_sdxl_folder, loras_dir):
    from fewshot_personalize.kernels.backends.diffusers import load_pipeline
    from fewshot_personalize.kernels.core.errors import UserInputError
    from fewshot_personalize.nodes.backend.fusion import _layers, fuse_on_comfy, to_concept

    m, c, _ = tiny_objects
    before, before_text = denoise(m), encode(c)
    pipe = load_pipeline(str(tiny_folder))
    concepts = [_concept(p) for p in _two_files(pipe, "sd1", loras_dir)]

    class Cancelled(Exception):
        pass

    def cancel_in_unet(stage, done, total):
        if stage == "unet":
            raise Cancelled

    with pytest.raises(Cancelled), torch.inference_mode():
        fuse_on_comfy(m, c, concepts, latent=torch.zeros(1, 4, 8, 8), samples=1, sample_steps=2,
                      progress=cancel_in_unet)
    layers = _layers(m, c, [to_concept(x, "sd1", {"clip_l": 32}, 4) for x in concepts])
    assert all(not lay.module._forward_pre_hooks for lay in layers.values())  # no recording hook left behind
    assert_clean(m, c)
    assert torch.equal(denoise(m), before) and torch.equal(encode(c), before_text)

    with pytest.raises(UserInputError, match="two or more concepts"):
        fuse_on_comfy(m, c, concepts[:1], latent=torch.zeros(1, 4, 8, 8))
    with pytest.raises(UserInputError, match="both use the token '<aa1>'"):
        fuse_on_comfy(m, c, [concepts[0], concepts[0]], latent=torch.zeros(1, 4, 8, 8))
    with pytest.raises(UserInputError, match="fusion must be one of"):
        fuse_on_comfy(m, c, concepts, "mix", latent=torch.zeros(1, 4, 8, 8))
    _write_edlora(load_pipeline(str(tiny_sdxl_folder)), "sdxl", loras_dir / "xl.safetensors", token="<xl>")
    with pytest.raises(UserInputError, match="sdxl"):
        fuse_on_comfy(m, c, [concepts[0], _concept(loras_dir / "xl.safetensors")], latent=torch.zeros(1, 4, 8, 8))
    assert torch.equal(denoise(m), before)
