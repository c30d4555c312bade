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
    from fewshot_personalize.kernels.seams import Conditioning
    from fewshot_personalize.nodes.comfy_backend import ComfyDenoiser

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
    from fewshot_personalize.nodes.comfy_backend import ComfyTextEncoder

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
        from fewshot_personalize.nodes.comfy_backend import ComfyDenoiser

        mean, std = ComfyDenoiser(tiny_objects[0], vae).encode_images(img.permute(0, 3, 1, 2) * 2 - 1)
    assert torch.allclose(mean, ref_mean * pipe.vae.config.scaling_factor, atol=1e-4)


def test_v_prediction_model_predicts_v(tmp_path):
    """An SD2-style (v-prediction) folder: the ComfyUI denoiser returns v, exactly as the diffusers UNet does."""
    from diffusers import UNet2DConditionModel

    from fewshot_personalize.kernels.seams import Conditioning
    from fewshot_personalize.kernels.tiny_models import build_tiny_sd
    from fewshot_personalize.nodes.comfy_backend import ComfyDenoiser, ComfyTextEncoder
    from fewshot_personalize.nodes.diffusers_loader import load_diffusers_folder

    folder = build_tiny_sd(tmp_path / "v", prediction_type="v_prediction", seed=3)
    with torch.inference_mode():
        model, clip, vae = load_diffusers_folder(folder)
    den = ComfyDenoiser(model, vae)
    assert den.schedule.prediction_type == "v_prediction" and den.family == "sd2"
    assert ComfyTextEncoder(clip, den.family).encode(["a red dog"]).context.shape == (1, 77, 32)
    unet = UNet2DConditionModel.from_pretrained(str(folder), subfolder="unet")
    g = torch.Generator().manual_seed(0)
    x, ctx, t = torch.randn(2, 4, 16, 16, generator=g), torch.randn(2, 77, 32, generator=g), torch.tensor([3, 900])
    with torch.no_grad():
        assert torch.allclose(den.predict(x, t, Conditioning(ctx)), unet(x, t, encoder_hidden_states=ctx).sample, atol=1e-4)


def test_demo_architecture_round_trips(tmp_path):
    """The demo model's architecture (3-level 4× VAE, 3-level UNet, 4-layer CLIP; random weights here, the shipped
    weights may not exist yet) loads into ComfyUI objects that reproduce diffusers."""
    from diffusers import StableDiffusionPipeline

    from fewshot_personalize.kernels.demo.model import build_untrained
    from fewshot_personalize.kernels.seams import Conditioning
    from fewshot_personalize.nodes.comfy_backend import ComfyDenoiser, ComfyTextEncoder
    from fewshot_personalize.nodes.diffusers_loader import load_diffusers_folder

    unet, vae_d, text, tok, sched = build_untrained(tmp_path / "tok")
    pipe = StableDiffusionPipeline(vae=vae_d, text_encoder=text, tokenizer=tok, unet=unet, scheduler=sched,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(str(tmp_path / "demo"), safe_serialization=True)
    with torch.inference_mode():
        model, clip, vae = load_diffusers_folder(tmp_path / "demo")
    assert vae.spacial_compression_encode() == 4
    g = torch.Generator().manual_seed(0)
    x, ctx, t = torch.randn(1, 4, 16, 16, generator=g), torch.randn(1, 77, 128, generator=g), torch.tensor([250])
    z = torch.randn(1, 4, 16, 16, generator=g)
    ids = tok(["a photo of sks toy"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.allclose(ComfyDenoiser(model, vae).predict(x, t, Conditioning(ctx)),
                              unet(x, t, encoder_hidden_states=ctx).sample, atol=1e-4)
        assert torch.allclose(ComfyTextEncoder(clip, "sd1").encode(["a photo of sks toy"]).context, text(ids)[0], atol=1e-4)
        ref = (vae_d.decode(z).sample / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1)
        assert torch.allclose(vae.decode(z), ref, atol=1e-3)
