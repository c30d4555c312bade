"""Mix-of-Show's regional sampling (§3.4) on diffusers pipelines and the command line, on the tiny models."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fewshot_personalize.kernels.adapters.layerwise_context import layer_context
from fewshot_personalize.kernels.backends.diffusers import (DiffusersDenoiser, DiffusersTextEncoder, load_pipeline,
                                                            vae_scale)
from fewshot_personalize.kernels.backends.diffusers.adapters import PipelineAdapters
from fewshot_personalize.kernels.backends.diffusers.generate import generate_images, use_sampler, uses_guidance
from fewshot_personalize.kernels.backends.diffusers.regional import (RegionalCrossAttnProcessor,
                                                                       encode_region_prompts,
                                                                       install_regional_attention)
from fewshot_personalize.kernels.cli.main import main
from fewshot_personalize.kernels.multi_concept.regions import Region, region_masks

RES, STEPS = 32, 2
WHOLE = (0, 0, RES, RES)


def _run_main(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def _pipe(path: str):
    pipe = load_pipeline(path)
    use_sampler(pipe, "ddim")
    return pipe


def _latents(pipe, prompt: str, regions=None, adapters=None, guidance: float = 7.5, seed: int = 0) -> torch.Tensor:
    """Final latents of one sample, with the regional processors installed around the call when ``regions``."""
    handle = None
    if regions:
        masks, _ = region_masks([r for r, _ in regions], RES, RES)
        contexts = encode_region_prompts(pipe, [p for _, p in regions], adapters)
        handle = install_regional_attention(pipe, contexts, masks, RES, RES, guided=uses_guidance(pipe, guidance))
    text = adapters.pipeline_kwargs(prompt, None, 1) if adapters is not None else {"prompt": [prompt]}
    try:
        with torch.no_grad():
            return pipe(**text, num_inference_steps=STEPS, guidance_scale=guidance, height=RES, width=RES,
                        generator=[torch.Generator().manual_seed(seed)], output_type="latent").images
    finally:
        if handle is not None:
            handle.remove()


def _pixels(images) -> np.ndarray:
    return np.stack([np.asarray(im, dtype=np.int16) for im in images])


@pytest.mark.parametrize("model,guidance", [("tiny_sd", 7.5), ("tiny_sd", 1.0), ("tiny_sdxl", 7.5)])
def test_a_region_covering_the_image_equals_plain_sampling_with_its_prompt(model, guidance, request):
    pipe = _pipe(request.getfixturevalue(model))
    whole = [(Region.from_box(WHOLE, label="a red toy"), "a red toy")]
    plain = _latents(pipe, "a red toy", guidance=guidance)
    assert not torch.allclose(plain, _latents(pipe, "a blue ball", guidance=guidance), atol=1e-4)  # prompts matter
    # SDXL's pooled embedding (time conditioning, not cross-attention) stays the global prompt's, so there the
    # global prompt must be the region's for equality
    other = "a red toy" if model == "tiny_sdxl" else "a blue ball"
    regional = _latents(pipe, other, whole, guidance=guidance)
    assert torch.allclose(regional, plain, atol=1e-5), (regional - plain).abs().max()
    if model != "tiny_sdxl":  # the global prompt has no effect once the regions cover everything
        assert torch.equal(_latents(pipe, "a dog on the snow", whole, guidance=guidance), regional)

    images = dict(n=1, steps=STEPS, resolution=RES, seed=3, guidance=guidance)
    plain_images = _pixels(generate_images(pipe, "a red toy", **images))
    regional_images = _pixels(generate_images(pipe, other, regions=whole, **images))
    assert np.abs(plain_images - regional_images).max() <= 1


def test_processors_are_removed_afterwards_also_on_errors(tiny_sd, monkeypatch):
    pipe = _pipe(tiny_sd)
    before = dict(pipe.unet.attn_processors)
    plain_before = _latents(pipe, "a red toy")
    half = [(Region.from_box((0, 0, 16, RES)), "a blue ball")]
    generate_images(pipe, "a red toy", n=1, steps=STEPS, resolution=RES, regions=half)
    after = dict(pipe.unet.attn_processors)
    assert after.keys() == before.keys() and all(after[k] is before[k] for k in before)
    assert torch.equal(_latents(pipe, "a red toy"), plain_before)

    seen = []

    def failing_call(self, *args, **kwargs):
        attn2 = DiffusersDenoiser(self).cross_attention_modules()
        seen.append(all(isinstance(m.processor, RegionalCrossAttnProcessor) for m in attn2))
        raise RuntimeError("boom")

    monkeypatch.setattr(type(pipe), "__call__", failing_call)
    with pytest.raises(RuntimeError, match="boom"):
        generate_images(pipe, "a red toy", n=1, steps=STEPS, resolution=RES, regions=half)
    assert seen == [True]
    after = dict(pipe.unet.attn_processors)
    assert all(after[k] is before[k] for k in before)


def test_only_attn2_modules_get_regional_processors(tiny_sdxl):
    pipe = _pipe(tiny_sdxl)
    before = dict(pipe.unet.attn_processors)
    contexts = encode_region_prompts(pipe, ["a red toy"])
    masks, _ = region_masks([Region.from_box((0, 0, 16, 16))], RES, RES)
    handle = install_regional_attention(pipe, contexts, masks, RES, RES)
    during = pipe.unet.attn_processors
    assert {k for k in during if isinstance(during[k], RegionalCrossAttnProcessor)} == \
        {k for k in during if ".attn2." in k}
    assert all(during[k] is before[k] for k in during if ".attn1." in k)
    handle.remove()
    handle.remove()  # idempotent
    assert all(pipe.unet.attn_processors[k] is before[k] for k in before)


def test_a_half_image_region_changes_mostly_its_half(tiny_sd):
    pipe = _pipe(tiny_sd)
    plain = _latents(pipe, "a red toy on the beach")
    left = _latents(pipe, "a red toy on the beach", [(Region.from_box((0, 0, 16, RES)), "a blue ball in the snow")])
    diff = (left - plain).abs()[0].mean(0)  # [h, w] latent; the box is its left half
    inside, outside = diff[:, : diff.shape[1] // 2].mean(), diff[:, diff.shape[1] // 2:].mean()
    # the random tiny UNet's self-attention spreads some of the change over the whole image
    assert inside > outside > 0, (inside, outside)


def test_regions_act_on_the_conditional_rows_and_their_box_only(tiny_sd):
    """One UNet call on an [uncond, cond] batch: the unconditional row is untouched; at the first cross-attention
    layer the conditional row changes inside the box only (Mix-of-Show §3.4)."""
    pipe = _pipe(tiny_sd)
    text = DiffusersTextEncoder(pipe)
    context = torch.cat([text.encode([""]).context, text.encode(["a red toy"]).context])
    side = RES // vae_scale(pipe)  # latent size = the first cross-attention layer's token grid
    x = torch.randn(2, 4, side, side, generator=torch.Generator().manual_seed(0))
    first = DiffusersDenoiser(pipe).cross_attention_modules()[0]
    captured = []
    hook = first.register_forward_hook(lambda module, args, output: captured.append(output))

    def unet() -> torch.Tensor:
        with torch.no_grad():
            return pipe.unet(x, torch.tensor(500), encoder_hidden_states=context).sample

    try:
        plain = unet()
        masks, _ = region_masks([Region.from_box((0, 0, 16, RES))], RES, RES)
        handle = install_regional_attention(pipe, encode_region_prompts(pipe, ["a blue ball"]), masks, RES, RES)
        try:
            regional = unet()
        finally:
            handle.remove()
    finally:
        hook.remove()
    assert torch.allclose(regional[0], plain[0], atol=1e-6) and not torch.allclose(regional[1], plain[1], atol=1e-4)
    before, after = (c.reshape(2, side, side, -1) for c in captured)  # [B, rows, columns, C]
    assert torch.allclose(after[0], before[0], atol=1e-6)
    half = side // 2  # the box is the left half of the columns
    assert torch.allclose(after[1, :, half:], before[1, :, half:], atol=1e-6)
    assert (after[1, :, :half] - before[1, :, :half]).abs().amax(-1).gt(1e-4).all()


def test_cli_generate_with_regions(tiny_sd, tmp_path, capsys):
    out = tmp_path / "imgs"
    code, stdout, err = _run_main(capsys, "generate", "--base", tiny_sd, "--prompt", "a toy on the beach",
                                  "--region", "0,0,16,32:a red toy", "--region", "16,0,32,32:a blue ball",
                                  "--n", "1", "--steps", "2", "--resolution", "32", "--out", str(out))
    assert code == 0, err
    assert (out / "000.png").is_file() and "with 2 region(s)" in stdout
    assert "note: the regions cover the whole image" in stdout


def test_cli_generate_with_a_region_layout(tiny_sd, tmp_path, capsys):
    out = tmp_path / "imgs"
    code, stdout, err = _run_main(capsys, "generate", "--base", tiny_sd, "--prompt", "a toy on the beach",
                                  "--region", "0,0,16,32:a red toy", "--region", "16,0,32,32:a blue ball",
                                  "--region-layout", "0.4", "--region-attention", "off",
                                  "--n", "1", "--steps", "2", "--resolution", "32", "--out", str(out))
    assert code == 0, err
    assert (out / "000.png").is_file() and "2 region(s) (layout for the first 40% of the schedule)" in stdout


@pytest.mark.parametrize("flags,message", [
    (["--region-layout", "0.4"], "need at least one --region"),
    (["--region", "0,0,16,32:a toy", "--region-attention", "off"], "needs --region-layout"),
    (["--region", "0,0,16,32:a toy", "--region-layout", "1.5"], "--region-layout must be in (0, 1], got 1.5"),
])
def test_cli_bad_region_layout_exits_2_with_one_line(flags, message, tiny_sd, tmp_path, capsys):
    code, _, err = _run_main(capsys, "generate", "--base", tiny_sd, "--prompt", "a toy", *flags,
                             "--n", "1", "--steps", "1", "--resolution", "32", "--out", str(tmp_path / "o"))
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and message in lines[0] and "Traceback" not in err, err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("region,message", [
    ("0,0,16:a toy", "the box has 3 number(s), not 4"),
    ("0,0,16,32 a toy", "no ':' between the box and the prompt"),
    ("0,0,x,32:a toy", "'x' is not a whole pixel number"),
    ("0,0,16,32:", "the prompt after ':' is empty"),
    ("16,0,8,32:a toy", "zero area"),
    ("0,0,48,32:a toy", "reaches outside the 32x32 image"),
])
def test_cli_bad_region_exits_2_with_one_line(region, message, tiny_sd, tmp_path, capsys):
    code, _, err = _run_main(capsys, "generate", "--base", tiny_sd, "--prompt", "a toy", "--region", region,
                             "--n", "1", "--steps", "1", "--resolution", "32", "--out", str(tmp_path / "o"))
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], err
    assert "Traceback" not in err and not (tmp_path / "o").exists()


@pytest.mark.parametrize("model", ["tiny_sd", "tiny_sdxl"])
def test_layerwise_tokens_work_in_region_prompts(model, request):
    """ED-LoRA (Mix-of-Show §3.2) tokens in a region prompt: the region's stacked context is sliced per layer, so a
    region covering the image equals the layer-wise global prompt."""
    pipe = _pipe(request.getfixturevalue(model))
    adapters = PipelineAdapters(pipe)
    layers = DiffusersDenoiser(pipe).cross_attention_layers()
    g = torch.Generator().manual_seed(1)
    adapters.add_layerwise_embedding("<sks>", {e.name: torch.randn(layers, 2, e.width, generator=g)
                                               for e in adapters.text.encoders}, "test")
    try:
        (context,) = encode_region_prompts(pipe, ["a <sks> toy"], adapters)
        tokens = pipe.tokenizer.model_max_length
        assert context.shape[:2] == (1, layers * tokens) and layers > 1
        processor = RegionalCrossAttnProcessor(1, layers, [context], None)
        sliced = processor._region_context(context, tokens, context)
        assert torch.equal(sliced, layer_context(context, 1, layers, tokens)) and sliced.shape[1] == tokens

        plain = _latents(pipe, "a <sks> toy", adapters=adapters)
        other = "a <sks> toy" if model == "tiny_sdxl" else "a dog"  # SDXL: the pooled embedding is the global's
        regional = _latents(pipe, other, [(Region.from_box(WHOLE), "a <sks> toy")], adapters=adapters)
        assert torch.allclose(regional, plain, atol=1e-5), (regional - plain).abs().max()
        half = generate_images(pipe, "a dog", n=1, steps=STEPS, resolution=RES, adapters=adapters,
                               regions=[(Region.from_box((0, 0, 16, RES)), "a <sks> toy")])
        assert len(half) == 1 and half[0].size == (RES, RES)
    finally:
        adapters.remove()
