"""ED-LoRA / fused concepts in ComfyUI (Mix-of-Show §3.2): the apply node's CLIP encodes a prompt with the token as
one context per cross-attention layer, exactly as the diffusers back end does with the same file; its MODEL hands
each layer its own slice; the caller's objects stay untouched; other files are refused."""

from __future__ import annotations

import os

import pytest
import torch

pytestmark = pytest.mark.comfyui
if not os.environ.get("COMFYUI_PATH"):
    pytest.skip("COMFYUI_PATH is not set: the ComfyUI suite needs a ComfyUI source checkout (v0.3.64 or newer)",
                allow_module_level=True)

from .test_nodes import encode  # noqa: E402

PROMPT = "a photo of <sks> on the beach"


def _write_edlora(pipe, family, path, layers=None, seed=0, token="<sks>", same_lora_seed=None):
    from fewshot_personalize.kernels.adapters.lora import LoraWeights, adapter_paths
    from fewshot_personalize.kernels.backends.diffusers import DiffusersDenoiser, DiffusersTextEncoder
    from fewshot_personalize.kernels.backends.diffusers.adapters import adapter_modules
    from fewshot_personalize.kernels.formats.edlora_file import edlora_metadata, edlora_tensors
    from fewshot_personalize.kernels.formats.lora_file import lora_metadata, lora_tensors
    from fewshot_personalize.kernels.formats.safetensors_io import atomic_save

    g = torch.Generator().manual_seed(seed if same_lora_seed is None else same_lora_seed)
    lora = {}
    for prefix, root in adapter_modules(pipe).items():
        targets = ("to_q", "to_k", "to_v", "to_out.0") if prefix == "lora_unet_" else ("q_proj", "v_proj")
        modules = dict(root.named_modules())
        for p in adapter_paths(root, targets):
            m = modules[p]
            lora[prefix + p.replace(".", "_")] = LoraWeights(torch.randn(2, m.in_features, generator=g) * 0.1,
                                                             torch.randn(m.out_features, 2, generator=g) * 0.1, 2.0)
    layers = layers or DiffusersDenoiser(pipe).cross_attention_layers()
    g = torch.Generator().manual_seed(seed + 1000) if same_lora_seed is not None else g
    vectors = {e.name: torch.randn(layers, 2, e.width, generator=g) * 0.05 for e in DiffusersTextEncoder(pipe).encoders}
    meta = edlora_metadata(lora_metadata(family=family, method="ed-lora", rank=2, alpha=2.0, steps=1), token, vectors)
    atomic_save(edlora_tensors(lora_tensors(lora), vectors), path, meta)


def _cond(clip, text):
    with torch.inference_mode():
        return clip.encode_from_tokens(clip.tokenize(text), return_pooled=True)


def test_apply_node_encodes_like_the_diffusers_back_end_and_routes_each_layer(family_case, loras_dir):
    import comfy.model_management as mm

    from fewshot_personalize.kernels.adapters.layerwise_context import stack_layer_contexts
    from fewshot_personalize.kernels.backends.diffusers import DiffusersDenoiser, load_pipeline
    from fewshot_personalize.kernels.backends.diffusers.adapters import PipelineAdapters
    from fewshot_personalize.nodes.apply_layerwise import ApplyLayerwiseConcepts
    from fewshot_personalize.nodes.backend.layerwise import cross_attention_order

    family, folder, (m, c, _) = family_case
    pipe = load_pipeline(str(folder))
    _write_edlora(pipe, family, loras_dir / "sks.safetensors")
    before = encode(c, PROMPT)
    m2, c2 = ApplyLayerwiseConcepts.execute(m, c, "sks.safetensors", 1.0, 1.0).args
    assert torch.equal(encode(c, PROMPT), before) and not m.object_patches  # the caller's objects are untouched
    layers = len(cross_attention_order(m))
    assert layers == DiffusersDenoiser(pipe).cross_attention_layers()

    cond, pooled = _cond(c2, PROMPT)
    adapters = PipelineAdapters(pipe)
    assert adapters.load(loras_dir / "sks.safetensors") == "ed-lora"
    ours = adapters.encode([PROMPT], with_kv=False)
    assert cond.shape == ours.context.shape == (1, layers * 77, ours.context.shape[-1])
    torch.testing.assert_close(cond, ours.context, atol=1e-4, rtol=1e-4)
    if family == "sdxl":
        torch.testing.assert_close(pooled, ours.pooled, atol=1e-4, rtol=1e-4)
    plain, _ = _cond(c2, "a photo of a toy")  # no token: ComfyUI's own tokenizer, one context
    assert plain.shape[1] == 77

    # the MODEL: copies of one context in every layer give the plain prediction; distinct ones change it
    base = m2.model
    g = torch.Generator().manual_seed(1)
    ctx = torch.randn(1, 77, cond.shape[-1], generator=g)
    x = torch.randn(1, 4, 16, 16, generator=g)
    extra = {}
    if family == "sdxl":
        size = base.model_config.unet_config["adm_in_channels"] - 6 * base.embedder.dim
        extra["y"] = base.encode_adm(pooled_output=torch.randn(1, size, generator=g), width=128, height=128)

    def predict(context):
        with torch.inference_mode():
            mm.load_models_gpu([m2], force_full_load=True)
            opts = {"transformer_options": m2.model_options["transformer_options"]}
            return base.apply_model(x, torch.tensor([3.0]), c_crossattn=context, **extra, **opts).float().clone()

    stacked_copies = stack_layer_contexts(ctx.unsqueeze(0).repeat(layers, 1, 1, 1))
    torch.testing.assert_close(predict(stacked_copies), predict(ctx), atol=1e-5, rtol=1e-5)
    distinct = stack_layer_contexts(torch.randn(layers, 1, 77, cond.shape[-1], generator=g))
    assert not torch.allclose(predict(distinct), predict(ctx), atol=1e-4)


def test_apply_node_refuses_plain_loras_and_other_layer_counts(tiny_objects, tiny_folder, loras_dir):
    from fewshot_personalize.kernels.backends.diffusers import load_pipeline
    from fewshot_personalize.kernels.core.errors import UserInputError
    from fewshot_personalize.kernels.formats.safetensors_io import atomic_save
    from fewshot_personalize.nodes.apply_layerwise import ApplyLayerwiseConcepts

    m, c, _ = tiny_objects
    pipe = load_pipeline(str(tiny_folder))
    _write_edlora(pipe, "sd1", loras_dir / "wrong.safetensors", layers=16)
    with pytest.raises(UserInputError, match="16 cross-attention layers; this model has"):
        ApplyLayerwiseConcepts.execute(m, c, "wrong.safetensors", 1.0, 1.0)
    atomic_save({"lora_unet_x.lora_down.weight": torch.zeros(2, 4), "lora_unet_x.lora_up.weight": torch.zeros(4, 2)},
                loras_dir / "plain.safetensors", {"fsp.method": "dreambooth-lora"})
    with pytest.raises(UserInputError, match="neither an ED-LoRA nor a fused"):
        ApplyLayerwiseConcepts.execute(m, c, "plain.safetensors", 1.0, 1.0)


def test_the_stock_sampler_runs_the_concept_with_classifier_free_guidance(family_case, loras_dir):
    import comfy.sample

    from fewshot_personalize.kernels.backends.diffusers import load_pipeline
    from fewshot_personalize.nodes.apply_layerwise import ApplyLayerwiseConcepts

    family, folder, (m, c, _) = family_case
    _write_edlora(load_pipeline(str(folder)), family, loras_dir / "sks.safetensors")
    m2, c2 = ApplyLayerwiseConcepts.execute(m, c, "sks.safetensors", 1.0, 1.0).args

    def sample(model, clip, prompt):
        with torch.inference_mode():
            positive = [[*_cond_entry(clip, prompt)]]
            negative = [[*_cond_entry(clip, "")]]  # 77 tokens against the positive's layers·77
            latent = torch.zeros(1, 4, 8, 8)
            noise = comfy.sample.prepare_noise(latent, 0)
            return comfy.sample.sample(model, noise, 3, 5.0, "euler", "normal", positive, negative, latent).float()

    with_concept = sample(m2, c2, PROMPT)
    assert torch.isfinite(with_concept).all()
    assert not torch.allclose(with_concept, sample(m, c, PROMPT), atol=1e-4)  # the concept changes the image


def _cond_entry(clip, text):
    cond, pooled = clip.encode_from_tokens(clip.tokenize(text), return_pooled=True)
    return cond, {"pooled_output": pooled}
