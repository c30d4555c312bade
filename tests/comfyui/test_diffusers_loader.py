"""The loader's ComfyUI objects reproduce the diffusers model they were built from.

Tolerances (fp32, CPU): UNet ε and text hidden states within 1e-4 absolute, VAE decode within 1e-3 (pixels
in [0,1]); the two implementations differ only in operation order (attention kernels, fused norms).
"""

from __future__ import annotations

import os
import pytest
import torch

pytestmark = pytest.mark.comfyui
if not os.environ.get("COMFYUI_PATH"):
    pytest.skip("COMFYUI_PATH is not set: the ComfyUI suite needs a ComfyUI source checkout (v0.3.64 or newer)",
                allow_module_level=True)


@pytest.fixture(scope="module")
def pipe(tiny_folder):
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline.from_pretrained(str(tiny_folder), local_files_only=True)


def test_unet_matches_diffusers(pipe, tiny_objects):
    from fewshot_personalize.kernels.engine.seams import Conditioning
    from fewshot_personalize.nodes.backend.denoiser import ComfyDenoiser

    model, clip, vae = tiny_objects
    den = ComfyDenoiser(model, vae)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 16, 16, generator=g)
    ctx = torch.randn(2, 77, 32, generator=g)
    t = torch.tensor([10, 700])
    with torch.no_grad():
        ref = pipe.unet(x, t, encoder_hidden_states=ctx).sample
        ours = den.predict(x, t, Conditioning(ctx))
    assert torch.allclose(ours, ref, atol=1e-4), (ours - ref).abs().max()
    # the schedules agree too (ComfyUI sigmas → ᾱ)
    assert torch.allclose(den.schedule.alphas_cumprod.float(), pipe.scheduler.alphas_cumprod, atol=1e-6)


def test_text_encoder_matches_diffusers(pipe, tiny_objects):
    from fewshot_personalize.nodes.backend.text_encoder import ComfyTextEncoder

    _, clip, _ = tiny_objects
    prompts = ["a photo of sks toy on the beach", "a red dog"]
    ids = pipe.tokenizer(prompts, padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        ref = pipe.text_encoder(ids)[0]
        ours = ComfyTextEncoder(clip, "sd1").encode(prompts).context
        tokens = clip.tokenize(prompts[0])
        node_cond = clip.encode_from_tokens(tokens)
    assert ours.shape == ref.shape
    assert torch.allclose(ours, ref, atol=1e-4), (ours - ref).abs().max()
    assert torch.allclose(node_cond, ref[:1], atol=1e-4)


def test_vae_matches_diffusers(pipe, tiny_objects):
    _, _, vae = tiny_objects
    g = torch.Generator().manual_seed(1)
    z = torch.randn(1, 4, 16, 16, generator=g)
    with torch.no_grad():
        ref = (pipe.vae.decode(z).sample / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1)
        ours = vae.decode(z)
    assert ours.shape == ref.shape == (1, 32, 32, 3)
    assert torch.allclose(ours, ref, atol=1e-3), (ours - ref).abs().max()
    img = torch.rand(1, 32, 32, 3, generator=g)
    with torch.no_grad():
        ref_mean = pipe.vae.encode(img.permute(0, 3, 1, 2) * 2 - 1).latent_dist.mean
        from fewshot_personalize.nodes.backend.denoiser import ComfyDenoiser

        mean, std = ComfyDenoiser(tiny_objects[0], vae).encode_images(img.permute(0, 3, 1, 2) * 2 - 1)
    assert torch.allclose(mean, ref_mean * pipe.vae.config.scaling_factor, atol=1e-4)


def test_v_prediction_model_predicts_v(tmp_path):
    """A v-prediction folder: the ComfyUI denoiser returns v, exactly as the diffusers UNet does."""
    from diffusers import UNet2DConditionModel

    from fewshot_personalize.kernels.engine.seams import Conditioning
    from fewshot_personalize.kernels.testing.tiny_models import build_tiny_sd
    from fewshot_personalize.nodes.backend.denoiser import ComfyDenoiser
    from fewshot_personalize.nodes.backend.text_encoder import ComfyTextEncoder
    from fewshot_personalize.nodes.backend.diffusers_loader import load_diffusers_folder

    folder = build_tiny_sd(tmp_path / "v", prediction_type="v_prediction", seed=3)
    with torch.inference_mode():
        model, clip, vae = load_diffusers_folder(folder)
    den = ComfyDenoiser(model, vae)
    assert den.schedule.prediction_type == "v_prediction"
    assert den.family == "sd1"  # ComfyUI sees an SD1 UNet (32-wide context): the family is the architecture
    assert ComfyTextEncoder(clip, den.family).encode(["a red dog"]).context.shape == (1, 77, 32)
    unet = UNet2DConditionModel.from_pretrained(str(folder), subfolder="unet")
    g = torch.Generator().manual_seed(0)
    x, ctx, t = torch.randn(2, 4, 16, 16, generator=g), torch.randn(2, 77, 32, generator=g), torch.tensor([3, 900])
    with torch.no_grad():
        assert torch.allclose(den.predict(x, t, Conditioning(ctx)), unet(x, t, encoder_hidden_states=ctx).sample, atol=1e-4)


@pytest.mark.parametrize("schedule", ["epsilon", "v-zero-snr"])
def test_demo_architecture_round_trips(tmp_path, schedule):
    """The demo model's architecture (3-level 4× VAE, 3-level UNet, 4-layer CLIP; random weights here, the shipped
    weights may not exist yet) loads into ComfyUI objects that reproduce diffusers, with either of its noise
    schedules (the denoiser's prediction in the model's own type: ε, or v on the zero-terminal-SNR schedule)."""
    from diffusers import StableDiffusionPipeline

    from fewshot_personalize.kernels.demo.model import build_untrained
    from fewshot_personalize.kernels.engine.seams import Conditioning
    from fewshot_personalize.nodes.backend.denoiser import ComfyDenoiser
    from fewshot_personalize.nodes.backend.text_encoder import ComfyTextEncoder
    from fewshot_personalize.nodes.backend.diffusers_loader import load_diffusers_folder

    unet, vae_d, text, tok, sched = build_untrained(tmp_path / "tok", schedule=schedule)
    pipe = StableDiffusionPipeline(vae=vae_d, text_encoder=text, tokenizer=tok, unet=unet, scheduler=sched,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(str(tmp_path / "demo"), safe_serialization=True)
    with torch.inference_mode():
        model, clip, vae = load_diffusers_folder(tmp_path / "demo")
    assert vae.spacial_compression_encode() == 4
    g = torch.Generator().manual_seed(0)
    n = vae_d.config.latent_channels
    x, ctx, t = torch.randn(1, n, 16, 16, generator=g), torch.randn(1, 77, 128, generator=g), torch.tensor([250])
    z = torch.randn(1, n, 16, 16, generator=g)
    ids = tok(["a photo of sks toy"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        den = ComfyDenoiser(model, vae)
        assert den.schedule.prediction_type == sched.config.prediction_type
        assert torch.allclose(den.schedule.alphas_cumprod[:-1], sched.alphas_cumprod[:-1].double(), atol=1e-6)
        assert torch.allclose(den.predict(x, t, Conditioning(ctx)), unet(x, t, encoder_hidden_states=ctx).sample,
                              atol=1e-4)
        assert torch.allclose(ComfyTextEncoder(clip, "sd1").encode(["a photo of sks toy"]).context, text(ids)[0], atol=1e-4)
        ref = (vae_d.decode(z).sample / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1)
        assert torch.allclose(vae.decode(z), ref, atol=1e-3)
    import comfy.sample
    assert comfy.sample.fix_empty_latent_channels(model, torch.zeros(1, 4, 16, 16)).shape[1] == n  # EmptyLatentImage
    # ComfyUI's own sampler (what KSampler runs): an 8-channel latent model is not taken for an inpainting one
    assert not model.model.concat_keys
    cond = [[ctx, {}]]
    out = comfy.sample.sample(model, torch.randn(1, n, 16, 16, generator=g), 2, 1.0, "euler", "normal", cond, cond,
                              torch.zeros(1, n, 16, 16), disable_pbar=True, seed=0)
    assert out.shape == (1, n, 16, 16) and torch.isfinite(out).all()


@pytest.fixture(scope="module")
def xl_pipe(tiny_sdxl_folder):
    from diffusers import StableDiffusionXLPipeline

    return StableDiffusionXLPipeline.from_pretrained(str(tiny_sdxl_folder), local_files_only=True)


def test_sdxl_unet_matches_diffusers(xl_pipe, tiny_sdxl_objects):
    """ComfyUI's SDXL UNet, with the pooled text and the size/crop time ids ComfyUI's sampler adds (latent
    size × 8, no crop), predicts what diffusers' UNet predicts from the same ``added_cond_kwargs``."""
    from fewshot_personalize.kernels.engine.seams import Conditioning
    from fewshot_personalize.nodes.backend.denoiser import ComfyDenoiser

    model, _, vae = tiny_sdxl_objects
    den = ComfyDenoiser(model, vae)
    assert den.family == "sdxl"
    g = torch.Generator().manual_seed(0)
    x, ctx, pooled = torch.randn(2, 4, 16, 12, generator=g), torch.randn(2, 77, 64, generator=g), torch.randn(2, 32, generator=g)
    t = torch.tensor([10, 700])
    time_ids = torch.tensor([[128.0, 96.0, 0.0, 0.0, 128.0, 96.0]] * 2)  # (h, w, crop top, crop left, target h, w)
    with torch.no_grad():
        ref = xl_pipe.unet(x, t, encoder_hidden_states=ctx, added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}).sample
        ours = den.predict(x, t, Conditioning(ctx, pooled))
        other_pooled = den.predict(x, t, Conditioning(ctx, pooled.flip(0)))
    assert torch.allclose(ours, ref, atol=1e-4), (ours - ref).abs().max()
    assert not torch.allclose(other_pooled, ref, atol=1e-3)  # the pooled embedding does reach the UNet
    assert torch.allclose(den.schedule.alphas_cumprod.float(), xl_pipe.scheduler.alphas_cumprod, atol=1e-6)


def test_sdxl_text_conditioning_matches_diffusers(xl_pipe, tiny_sdxl_objects):
    """Both encoders' penultimate hidden states (concatenated) and text_encoder_2's projected pooled output equal
    ``StableDiffusionXLPipeline.encode_prompt``; the CLIP node path (tokenize → encode) gives the same."""
    from fewshot_personalize.nodes.backend.text_encoder import ComfyTextEncoder

    _, clip, _ = tiny_sdxl_objects
    prompts = ["a photo of sks toy on the beach", "a red dog"]
    with torch.no_grad():
        ref, _, ref_pooled, _ = xl_pipe.encode_prompt(prompts, do_classifier_free_guidance=False)
        ours = ComfyTextEncoder(clip, "sdxl").encode(prompts)
        cond, pooled = clip.encode_from_tokens(clip.tokenize(prompts[1]), return_pooled=True)
    assert ours.context.shape == ref.shape == (2, 77, 64) and ours.pooled.shape == ref_pooled.shape == (2, 32)
    assert torch.allclose(ours.context, ref, atol=1e-4), (ours.context - ref).abs().max()
    assert torch.allclose(ours.pooled, ref_pooled, atol=1e-4), (ours.pooled - ref_pooled).abs().max()
    assert torch.allclose(cond, ref[1:], atol=1e-4) and torch.allclose(pooled, ref_pooled[1:], atol=1e-4)


def test_sdxl_vae_matches_diffusers(xl_pipe, tiny_sdxl_objects):
    _, _, vae = tiny_sdxl_objects
    z = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = (xl_pipe.vae.decode(z).sample / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1)
        assert torch.allclose(vae.decode(z), ref, atol=1e-3)


def test_sdxl_sized_unet_config_uses_head_channels():
    """diffusers' per-block head counts of SDXL (5, 10, 20 over 320/640/1280 channels) map to ComfyUI's fixed
    head width of 64 and to SDXL's own unet_config, which ComfyUI uses to detect SDXL checkpoints."""
    import comfy.supported_models

    from fewshot_personalize.nodes.backend.diffusers_loader import unet_config_from_diffusers

    cfg = {"block_out_channels": [320, 640, 1280], "layers_per_block": 2, "attention_head_dim": [5, 10, 20],
           "transformer_layers_per_block": [1, 2, 10], "cross_attention_dim": 2048, "use_linear_projection": True,
           "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
           "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"], "sample_size": 128,
           "addition_embed_type": "text_time", "addition_time_embed_dim": 256,
           "projection_class_embeddings_input_dim": 2816}
    ours = unet_config_from_diffusers(cfg)
    assert ours["num_head_channels"] == 64 and ours["num_heads"] == -1 and ours["num_classes"] == "sequential"
    for k, v in comfy.supported_models.SDXL.unet_config.items():
        assert ours[k] == v, k
    assert ours["transformer_depth_middle"] == 10


def test_other_added_conditioning_is_refused(tmp_path):
    import json
    import shutil

    from fewshot_personalize.kernels.core.errors import UserInputError
    from fewshot_personalize.nodes.backend.diffusers_loader import load_diffusers_folder, tiny_model_folder

    folder = tmp_path / "m"
    shutil.copytree(tiny_model_folder(0), folder)
    cfg_path = folder / "unet" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg_path.write_text(json.dumps({**cfg, "addition_embed_type": "image"}))
    with pytest.raises(UserInputError, match="added conditioning 'image'"):
        load_diffusers_folder(folder)
    cfg_path.write_text(json.dumps({**cfg, "addition_embed_type": "text_time"}))
    with pytest.raises(UserInputError, match="text_encoder_2"):
        load_diffusers_folder(folder)


def test_deep_clones_reload_fresh_weights(tiny_folder, comfy_nodes):
    """ComfyUI 0.33 deep-clones a MODEL through the loader's ``cached_patcher_init`` factory (its TrainLoraNode
    does so before training); ours reloads the folder, so a deep clone has the folder's weights in new modules,
    whatever patches the original carries, and ComfyUI's own trainer runs on our loader's model."""
    from fewshot_personalize.nodes.backend.diffusers_loader import load_diffusers_folder

    with torch.inference_mode():
        m, c, v = load_diffusers_folder(tiny_folder)
    if not hasattr(m, "cached_patcher_init"):
        pytest.skip("this ComfyUI (< 0.33) deep-clones without a loader factory")
    key = next(k for k in m.model.state_dict() if k.endswith("attn1.to_q.weight"))
    m.add_patches({key: (torch.ones_like(m.model.state_dict()[key]),)}, 1.0)
    for original in (m, c.patcher, v.patcher):
        deep = original.clone(force_deepcopy=True)
        assert deep.model is not original.model
        for k, t in original.model.state_dict().items():
            assert torch.equal(deep.model.state_dict()[k], t), k

    from comfy_extras.nodes_train import TrainLoraNode

    with torch.inference_mode():
        latents = {"samples": v.encode(torch.rand(2, 32, 32, 3, generator=torch.Generator().manual_seed(0)))}
        cond = c.encode_from_tokens_scheduled(c.tokenize("a photo of sks toy"))
    defaults = {i.id: i.default for i in TrainLoraNode.define_schema().inputs if getattr(i, "default", None) is not None}
    settings = {**defaults, "model": m, "latents": latents, "positive": cond, "batch_size": 1, "steps": 1,
                "training_dtype": "fp32", "lora_dtype": "fp32", "rank": 2, "gradient_checkpointing": False}
    with torch.inference_mode():
        lora = TrainLoraNode.execute(**{k: [val] for k, val in settings.items()}).args[0]
    assert lora and all(torch.isfinite(t).all() for t in lora.values())
