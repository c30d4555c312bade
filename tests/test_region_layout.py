"""Region layout: region crops denoised with their own prompts in the first steps (multi_concept/region_layout.py,
backends/diffusers/region_layout.py), on hand-made tensors and the tiny models."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fewshot_personalize.kernels.backends.diffusers import DiffusersTextEncoder, load_pipeline, vae_scale
from fewshot_personalize.kernels.backends.diffusers.generate import generate_images, use_sampler
from fewshot_personalize.kernels.backends.diffusers.region_layout import down_sampling_factor, install_region_layout
from fewshot_personalize.kernels.backends.diffusers.regional import encode_region_prompts, install_regional_attention
from fewshot_personalize.kernels.core.errors import UserInputError
from fewshot_personalize.kernels.multi_concept.region_layout import LayoutCrop, compose_layout, layout_crops
from fewshot_personalize.kernels.multi_concept.regions import Region, region_masks

RES, STEPS = 32, 2


def _masks(*boxes, size=64):
    return region_masks([Region.from_box(b, i) for i, b in enumerate(boxes)], size, size)[0]


# ----------------------------------------------------------------------------------------------- the math
def test_crops_are_the_boxes_on_the_latent_grown_to_the_factor():
    left, small = layout_crops(_masks((0, 0, 32, 64), (36, 4, 44, 12)), 16, 16, multiple=4)
    assert (left.y0, left.y1, left.x0, left.x1) == (0, 16, 0, 8) and torch.equal(left.weight, torch.ones(16, 8))
    # 8 px box at pixels 36..44 → latent columns 9..11 → grown around its centre to 4 columns, rows 1..3 to 4 rows
    assert (small.y0, small.y1, small.x0, small.x1) == (0, 4, 8, 12)
    assert small.weight.shape == (4, 4) and small.weight.sum() == 4  # 2 × 2 latent pixels inside, the rest margin


def test_a_box_off_the_latent_grid_gets_partial_weights():
    (crop,) = layout_crops(_masks((2, 0, 64, 64)), 16, 16)  # pixel 2 of 4: the first latent column is half in
    assert (crop.x0, crop.x1) == (0, 16) and torch.allclose(crop.weight[:, 0], torch.full((16,), 0.5))


def test_crops_grown_at_the_edge_stay_inside_the_latent():
    (crop,) = layout_crops(_masks((56, 56, 64, 64)), 16, 16, multiple=8)
    assert (crop.y0, crop.y1, crop.x0, crop.x1) == (8, 16, 8, 16)


def test_bad_layouts_are_refused_with_their_reason():
    with pytest.raises(UserInputError, match="not a multiple of the model's down-sampling factor 8"):
        layout_crops(_masks((0, 0, 32, 64)), 12, 12, multiple=8)
    with pytest.raises(UserInputError, match="region 1 covers no latent pixel"):
        layout_crops(torch.zeros(1, 64, 64), 16, 16)


def test_compose_replaces_inside_a_box_and_averages_overlaps():
    g = torch.randn(2, 3, 8, 8)
    crops = [LayoutCrop(0, 8, 0, 4, torch.ones(8, 4)), LayoutCrop(0, 8, 2, 6, torch.ones(8, 4))]
    r1, r2 = torch.randn(2, 3, 8, 4), torch.randn(2, 3, 8, 4)
    out = compose_layout(g, [r1, r2], crops)
    assert torch.equal(out[..., 6:], g[..., 6:])  # outside every region: the global prediction
    assert torch.allclose(out[..., :2], r1[..., :2])  # one region: its own prediction
    assert torch.allclose(out[..., 4:6], r2[..., 2:])
    assert torch.allclose(out[..., 2:4], (r1[..., 2:] + r2[..., :2]) / 2)  # overlap: averaged


def test_compose_blends_a_soft_edge_by_its_weight():
    g, r = torch.zeros(1, 1, 2, 2), torch.ones(1, 1, 2, 2)
    weight = torch.tensor([[0.25, 1.0], [0.0, 0.5]])
    out = compose_layout(g, [r], [LayoutCrop(0, 2, 0, 2, weight)])
    assert torch.allclose(out[0, 0], weight)
    with pytest.raises(ValueError, match="does not fit its crop"):
        compose_layout(g, [torch.ones(1, 1, 1, 2)], [LayoutCrop(0, 2, 0, 2, weight)])


# ------------------------------------------------------------------------------------------ diffusers pipes
def _pipe(path: str):
    pipe = load_pipeline(path)
    use_sampler(pipe, "ddim")
    return pipe


def _pixels(images) -> np.ndarray:
    return np.stack([np.asarray(im, dtype=np.int16) for im in images])


@pytest.mark.parametrize("model", ["tiny_sd", "tiny_sdxl"])
def test_a_layout_over_the_whole_image_equals_sampling_with_the_region_prompt(model, request):
    pipe = _pipe(request.getfixturevalue(model))
    images = dict(n=1, steps=STEPS, resolution=RES, seed=3, guidance=7.5)
    plain = _pixels(generate_images(pipe, "a red toy", **images))
    assert np.abs(plain - _pixels(generate_images(pipe, "a blue ball", **images))).max() > 1  # prompts matter
    # SDXL's pooled embedding stays the global prompt's, so there the global prompt must be the region's
    other = "a red toy" if model == "tiny_sdxl" else "a blue ball"
    whole = [(Region.from_box((0, 0, RES, RES), label="a red toy"), "a red toy")]
    laid_out = _pixels(generate_images(pipe, other, regions=whole, region_layout=1.0, region_attention=False,
                                       **images))
    assert np.abs(plain - laid_out).max() <= 1


def _unet_call(pipe, x, t, context):
    with torch.no_grad():
        return pipe.unet(x, torch.tensor(t), encoder_hidden_states=context).sample


def _left_half_setup(path: str, seed: int):
    """(pipe, [uncond, cond] context, latent x [2, 4, side, side], latent side, left-half masks, region context)."""
    pipe = _pipe(path)
    text = DiffusersTextEncoder(pipe)
    context = torch.cat([text.encode([""]).context, text.encode(["a red toy"]).context])
    side = RES // vae_scale(pipe)
    x = torch.randn(2, 4, side, side, generator=torch.Generator().manual_seed(seed))
    masks, _ = region_masks([Region.from_box((0, 0, RES // 2, RES))], RES, RES)
    return pipe, context, x, side, masks, encode_region_prompts(pipe, ["a blue ball"])


def test_the_layout_acts_on_the_conditional_rows_inside_its_box_and_only_early(tiny_sd):
    pipe, context, x, side, masks, region = _left_half_setup(tiny_sd, 0)
    plain_early, plain_late = _unet_call(pipe, x, 900, context), _unet_call(pipe, x, 100, context)
    handle = install_region_layout(pipe, region, masks, 0.5)
    try:
        early, late = _unet_call(pipe, x, 900, context), _unet_call(pipe, x, 100, context)
    finally:
        handle.remove()
    assert "forward" not in pipe.unet.__dict__  # removed again
    assert torch.equal(late, plain_late)  # t = 100 < (1 − 0.5)·1000: no layout
    assert torch.equal(early[0], plain_early[0])  # the unconditional row
    half = side // 2
    assert torch.equal(early[1, ..., half:], plain_early[1, ..., half:])  # outside the box
    crop = _unet_call(pipe, x[1:, ..., :half], 900, region[0])
    assert torch.allclose(early[1, ..., :half], crop[0], atol=1e-5)  # inside: the crop with the region's prompt


def test_regional_attention_is_paused_during_the_crop_calls(tiny_sd):
    pipe, context, x, side, masks, region = _left_half_setup(tiny_sd, 1)
    crop = _unet_call(pipe, x[1:, ..., : side // 2], 900, region[0])  # no processors installed
    regional = install_regional_attention(pipe, region, masks, RES, RES)
    layout = install_region_layout(pipe, region, masks, 1.0, regional=regional)
    try:
        out = _unet_call(pipe, x, 900, context)
    finally:
        layout.remove()
        regional.remove()
    assert regional.switch.active  # back on after the crop calls
    assert torch.allclose(out[1, ..., : side // 2], crop[0], atol=1e-5)


def test_down_sampling_factor_reads_the_unet(tiny_sd, tiny_sdxl):
    for path in (tiny_sd, tiny_sdxl):
        unet = load_pipeline(path).unet
        assert down_sampling_factor(unet) == 2 ** (len(unet.config.down_block_types) - 1)


def test_bad_layout_requests_are_refused(tiny_sd):
    pipe = _pipe(tiny_sd)
    whole = [(Region.from_box((0, 0, RES, RES)), "a red toy")]
    with pytest.raises(UserInputError, match="needs regions"):
        generate_images(pipe, "a toy", steps=1, resolution=RES, region_layout=0.4)
    with pytest.raises(UserInputError, match="need a region layout"):
        generate_images(pipe, "a toy", steps=1, resolution=RES, regions=whole, region_attention=False)
    masks, _ = region_masks([whole[0][0]], RES, RES)
    with pytest.raises(UserInputError, match=r"share must be in \(0, 1\]"):
        install_region_layout(pipe, encode_region_prompts(pipe, ["a red toy"]), masks, 1.5)
