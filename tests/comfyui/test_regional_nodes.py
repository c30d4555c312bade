"""Mix-of-Show's regional sampling in ComfyUI (§3.4): Region prompt → Apply regional sampling → the stock KSampler.
A region over the whole image samples like its prompt alone, the patch's output inside each region is that prompt's
attention, resized masks and bad boxes are told, the caller's MODEL stays clean, and it composes with ED-LoRA."""

from __future__ import annotations

import os

import pytest
import torch

pytestmark = pytest.mark.comfyui
if not os.environ.get("COMFYUI_PATH"):
    pytest.skip("COMFYUI_PATH is not set: the ComfyUI suite needs a ComfyUI source checkout (v0.3.64 or newer)",
                allow_module_level=True)

from .test_layerwise_nodes import PROMPT, _write_edlora  # noqa: E402

SIZE = 64  # pixels; the latent is 8 x 8
GLOBAL, LEFT, RIGHT = "a red house in a field", "a green dog", "a blue car on a road"


def _entry(clip, text):
    with torch.inference_mode():
        cond, pooled = clip.encode_from_tokens(clip.tokenize(text), return_pooled=True)
    return [cond, {"pooled_output": pooled}]


def _as(entry, pooled_from):
    """``entry``'s context with another prompt's pooled output (regional sampling keeps the global prompt's)."""
    return [entry[0], {**entry[1], "pooled_output": pooled_from[1]["pooled_output"]}]


def _sample(model, positive, negative, comfy_nodes=None, steps=3, cfg=5.0, seed=0):
    """Samples of the stock sampler (the KSampler node's own function when ``comfy_nodes`` is given)."""
    import comfy.sample

    latent = torch.zeros(1, 4, SIZE // 8, SIZE // 8)
    with torch.inference_mode():
        if comfy_nodes is not None:
            out = comfy_nodes.common_ksampler(model, seed, steps, cfg, "euler", "normal", positive, negative,
                                              {"samples": latent})
            return out[0]["samples"].float().clone()
        noise = comfy.sample.prepare_noise(latent, seed)
        return comfy.sample.sample(model, noise, steps, cfg, "euler", "normal", positive, negative, latent).float()


def _assert_same(a, b):
    """Equal at float32 tolerance for the samples' scale (ComfyUI's own repeat padding of a context changes them at
    this level too)."""
    torch.testing.assert_close(a, b, atol=1e-5 * b.abs().max().item(), rtol=1e-5)


def _differs(a, b) -> bool:
    return (a - b).abs().max().item() > 1e-3 * b.abs().max().item()


def _region(conditioning, mask=None, box=(0, 0, SIZE, SIZE), regions=None, size=SIZE):
    from fewshot_personalize.nodes.regional import RegionPromptNode

    with torch.inference_mode():
        return RegionPromptNode.execute(conditioning, *box, size, size, mask=mask, regions=regions)


def _apply(model, positive, regions, **options):
    from fewshot_personalize.nodes.regional import ApplyRegions

    with torch.inference_mode():
        return ApplyRegions.execute(model, positive, regions, **options)


def _text(out) -> str:
    return out.ui.as_dict()["text"][0]


def _halves():
    left, right = torch.zeros(SIZE, SIZE), torch.zeros(SIZE, SIZE)
    left[:, :SIZE // 2], right[:, SIZE // 2:] = 1.0, 1.0
    return left, right


def test_one_region_over_the_whole_image_samples_like_its_prompt_through_the_stock_ksampler(family_case, comfy_nodes):
    _, _, (m, c, _) = family_case
    g, p, neg = _entry(c, GLOBAL), _entry(c, LEFT), _entry(c, "")
    regions = _region([p], mask=torch.ones(1, SIZE, SIZE)).args[0]
    m2, positive = _apply(m, [g], regions).args
    assert positive[0][0].shape == (1, 2 * 77, g[0].shape[-1])
    assert positive[0][1]["pooled_output"] is g[1]["pooled_output"]  # SDXL's pooled output stays the global prompt's
    ours = _sample(m2, positive, [neg], comfy_nodes)
    plain = _sample(m, [_as(p, g)], [neg], comfy_nodes)
    _assert_same(ours, plain)
    assert _differs(_sample(m, [g], [neg], comfy_nodes), plain)  # the global prompt alone gives another image


def test_a_region_covering_nothing_is_refused(tiny_objects):
    from fewshot_personalize.kernels.core.errors import UserInputError

    _, c, _ = tiny_objects
    with pytest.raises(UserInputError, match="region 1: the mask is all zero, so the region selects no pixels"):
        _region([_entry(c, LEFT)], mask=torch.zeros(1, SIZE, SIZE))


def test_two_half_image_regions_change_the_image(tiny_objects):
    m, c, _ = tiny_objects
    g, p1, p2, neg = _entry(c, GLOBAL), _entry(c, LEFT), _entry(c, RIGHT), _entry(c, "")
    left, right = _halves()
    out = _region([p1], mask=left[None])
    assert "region 1: a 64x64 mask on a 64x64 image; prompt of 77 tokens" in _text(out)
    out = _region([p2], mask=right[None], regions=out.args[0])
    regions = out.args[0]
    assert len(regions) == 2 and _text(out).startswith("region 2:")
    applied = _apply(m, [g], regions)
    m2, positive = applied.args
    assert positive[0][0].shape[1] == 3 * 77
    assert "the global prompt has no effect" in _text(applied)  # the halves cover the image
    ours = _sample(m2, positive, [neg])
    assert torch.isfinite(ours).all()
    for prompt in (p1, p2, g):
        assert _differs(ours, _sample(m, [prompt], [neg]))


def _patch_case(parts, batch=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    heads, c, n = 2, 8, (SIZE // 8) ** 2
    q = torch.randn(batch, n, c, generator=g)
    ks = [torch.randn(batch, 77, c, generator=g) for _ in range(parts)]
    vs = [torch.randn(batch, 77, c, generator=g) for _ in range(parts)]
    extra = {"n_heads": heads, "dim_head": c // heads, "attn_precision": None,
             "original_shape": [batch, 4, SIZE // 8, SIZE // 8]}
    return q, ks, vs, extra


def test_the_patch_gives_each_regions_tokens_that_prompts_attention(tiny_objects):
    from fewshot_personalize.kernels.multi_concept.regions import multihead_attention
    from fewshot_personalize.nodes.backend.regional import RegionalAttentionPatch

    left, right = _halves()
    patch = RegionalAttentionPatch(torch.stack([left, right]), 2, 77, (SIZE, SIZE))
    q, (kg, k1, k2), (vg, v1, v2), extra = _patch_case(3)
    k, v = torch.cat([kg, k1, k2], 1), torch.cat([vg, v1, v2], 1)
    cols = torch.arange(q.shape[1]) % (SIZE // 8)  # row-major 8 x 8 grid
    inside_left, inside_right = cols < SIZE // 16, cols >= SIZE // 16

    out = patch(q, k, v, {**extra, "cond_or_uncond": [0, 1]})  # one conditional row, one unconditional
    cond, uncond = out[:1], out[1:]
    torch.testing.assert_close(cond[:, inside_left], multihead_attention(q, k1, v1, 2)[:1, inside_left],
                               atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(cond[:, inside_right], multihead_attention(q, k2, v2, 2)[:1, inside_right],
                               atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(uncond, multihead_attention(q, k, v, 2)[1:], atol=1e-5, rtol=1e-5)  # plain

    # ComfyUI repeats the whole context to a common length: the repeats give the same regional output
    repeated = patch(q, k.repeat(1, 2, 1), v.repeat(1, 2, 1), {**extra, "cond_or_uncond": [0, 1]})
    torch.testing.assert_close(repeated, out, atol=1e-5, rtol=1e-5)
    # a context of another length (a plain negative prompt batched alone) gets plain attention
    torch.testing.assert_close(patch(q, kg, vg, {**extra, "cond_or_uncond": [1]}), multihead_attention(q, kg, vg, 2),
                               atol=1e-5, rtol=1e-5)


def test_a_negative_prompt_repeated_into_identical_parts_is_plain_attention_even_as_regions(tiny_objects):
    """ComfyUI repeats a 77-token negative (1+R) times; were it split into parts, regional attention would still be
    plain attention, since the overlap weights of every token sum to 1."""
    from fewshot_personalize.kernels.multi_concept.regions import multihead_attention
    from fewshot_personalize.nodes.backend.regional import RegionalAttentionPatch

    left, _ = _halves()
    quarter = torch.zeros(SIZE, SIZE)
    quarter[: SIZE // 2, SIZE // 4:] = 0.5  # overlapping, fractional: every branch of the weights
    patch = RegionalAttentionPatch(torch.stack([left, quarter]), 2, 77, (SIZE, SIZE))
    q, (kn,), (vn,), extra = _patch_case(1)
    out = patch(q, kn.repeat(1, 3, 1), vn.repeat(1, 3, 1), extra)  # no cond_or_uncond: every row as conditional
    torch.testing.assert_close(out, multihead_attention(q, kn, vn, 2), atol=1e-5, rtol=1e-5)


def test_a_mask_of_another_size_is_resized_and_the_node_says_so(tiny_objects):
    m, c, _ = tiny_objects
    small = torch.zeros(1, 16, 16)
    small[:, :, :8] = 1.0
    out = _region([_entry(c, LEFT)], mask=small)
    text = _text(out)
    assert "region 1: mask of 16x16 resized to the 64x64 image" in text
    (entry,) = out.args[0]
    assert entry.mask.shape == (SIZE, SIZE) and entry.notes and "resized" in entry.notes[0]
    assert (entry.mask[:, : SIZE // 2 - 4] == 1).all() and (entry.mask[:, SIZE // 2 + 4:] == 0).all()
    assert "resized" in _text(_apply(m, [_entry(c, GLOBAL)], out.args[0]))


@pytest.mark.parametrize("box,match", [
    ((16, 0, 16, 64), "region 2: box 16,0,16,64 has zero area"),
    ((0, 32, 64, 8), "region 2: box 0,32,64,8 has zero area"),
    ((32, 0, 96, 64), "region 2: box 32,0,96,64 reaches outside the 64x64 image"),
    ((0, 0, 64, 72), "reaches outside"),
])
def test_bad_boxes_are_refused_with_a_message_naming_the_region(tiny_objects, box, match):
    from fewshot_personalize.kernels.core.errors import UserInputError

    _, c, _ = tiny_objects
    first = _region([_entry(c, LEFT)], box=(0, 0, 32, 64)).args[0]
    with pytest.raises(UserInputError, match=match):
        _region([_entry(c, RIGHT)], box=box, regions=first)


def test_other_bad_inputs_are_refused(tiny_objects):
    from fewshot_personalize.kernels.core.errors import UserInputError

    m, c, _ = tiny_objects
    p = _entry(c, LEFT)
    with pytest.raises(UserInputError, match="holds 2 prompts"):
        _region([p, p])
    with pytest.raises(UserInputError, match="a batch of 2 masks"):
        _region([p], mask=torch.ones(2, SIZE, SIZE))
    small = _region([p], box=(0, 0, 32, 32), size=32).args[0]
    mixed = _region([p], box=(0, 0, 32, 32), regions=small).args[0]  # on a 64 x 64 image
    with pytest.raises(UserInputError, match="different sizes.*region 1 32x32, region 2 64x64"):
        _apply(m, [_entry(c, GLOBAL)], mixed)
    with pytest.raises(UserInputError, match="no regions"):
        _apply(m, [_entry(c, GLOBAL)], [])
    wide = [torch.zeros(1, 77, p[0].shape[-1] + 1), {}]
    with pytest.raises(UserInputError, match="encode every prompt with the same CLIP"):
        _apply(m, [wide], _region([p]).args[0])


def test_prompts_of_other_lengths_are_padded_by_whole_repeats_as_comfyui_pads(tiny_objects):
    m, c, _ = tiny_objects
    g, long = _entry(c, LEFT), _entry(c, " ".join(["a red house"] * 12))
    assert long[0].shape[1] == 2 * 77
    applied = _apply(m, [g], _region([long], box=(0, 0, 32, 64)).args[0])
    positive = applied.args[1]
    assert torch.equal(positive[0][0], torch.cat([g[0].repeat(1, 2, 1), long[0]], dim=1))
    assert "every prompt as 154 tokens" in _text(applied)


def test_the_callers_model_and_conditioning_are_not_changed(tiny_objects):
    from fewshot_personalize.nodes.backend.layerwise import cross_attention_order

    m, c, _ = tiny_objects
    g = _entry(c, GLOBAL)
    before = g[0].clone()
    options = repr(m.model_options)
    m2, positive = _apply(m, [g], _region([_entry(c, LEFT)], box=(0, 0, 32, 64)).args[0]).args
    assert repr(m.model_options) == options and "patches_replace" not in m.model_options["transformer_options"]
    assert torch.equal(g[0], before) and positive[0][1] is not g[1]
    replaced = m2.model_options["transformer_options"]["patches_replace"]["attn2"]
    assert set(replaced) == set(cross_attention_order(m))
    assert m2.model is m.model and not m2.patches  # weights are shared, nothing patched on them


def test_composes_with_ed_lora_a_whole_image_region_samples_like_its_token_prompt(family_case, loras_dir):
    from fewshot_personalize.kernels.backends.diffusers import load_pipeline
    from fewshot_personalize.nodes.apply_layerwise import ApplyLayerwiseConcepts
    from fewshot_personalize.nodes.backend.layerwise import cross_attention_order

    family, folder, (m, c, _) = family_case
    _write_edlora(load_pipeline(str(folder)), family, loras_dir / "sks.safetensors")
    m2, c2 = ApplyLayerwiseConcepts.execute(m, c, "sks.safetensors", 1.0, 1.0).args
    layers = len(cross_attention_order(m))
    g, p, neg = _entry(c2, GLOBAL), _entry(c2, PROMPT), _entry(c2, "")
    assert g[0].shape[1] == 77 and p[0].shape[1] == layers * 77  # a plain global prompt, a layer-wise region one
    applied = _apply(m2, [g], _region([p], mask=torch.ones(1, SIZE, SIZE)).args[0])
    m3, positive = applied.args
    assert positive[0][0].shape[1] == 2 * layers * 77 and "stacked per layer" in _text(applied)
    ours = _sample(m3, positive, [neg])
    plain = _sample(m2, [_as(p, g)], [neg])
    _assert_same(ours, plain)
    assert _differs(_sample(m2, [g], [neg]), plain)


def test_layerwise_prompts_need_the_routing_model_and_short_prompts(tiny_objects, tiny_folder, loras_dir):
    from fewshot_personalize.kernels.backends.diffusers import load_pipeline
    from fewshot_personalize.kernels.core.errors import UserInputError
    from fewshot_personalize.nodes.apply_layerwise import ApplyLayerwiseConcepts

    m, c, _ = tiny_objects
    _write_edlora(load_pipeline(str(tiny_folder)), "sd1", loras_dir / "sks.safetensors")
    m2, c2 = ApplyLayerwiseConcepts.execute(m, c, "sks.safetensors", 1.0, 1.0).args
    regions = _region([_entry(c2, PROMPT)], box=(0, 0, 32, 64)).args[0]
    with pytest.raises(UserInputError, match="does not route it per layer"):
        _apply(m, [_entry(c, GLOBAL)], regions)
    long = _entry(c2, " ".join(["a red house"] * 12))
    assert long[0].shape[1] == 2 * 77  # ComfyUI encodes a long prompt in chunks of 77
    with pytest.raises(UserInputError, match=r"the global prompt \(154 tokens\).*one chunk of 77 tokens"):
        _apply(m2, [long], regions)


# ------------------------------------------------------------------------------------------------ region layout
def test_a_whole_image_layout_without_region_attention_samples_like_its_prompt(family_case, comfy_nodes):
    _, _, (m, c, _) = family_case
    g, p, neg = _entry(c, GLOBAL), _entry(c, LEFT), _entry(c, "")
    regions = _region([p], mask=torch.ones(1, SIZE, SIZE)).args[0]
    applied = _apply(m, [g], regions, layout=1.0, region_attention=False)
    assert "region layout for the first 100% of the schedule" in _text(applied)
    assert "see the global prompt only" in _text(applied)
    m2, positive = applied.args
    ours = _sample(m2, positive, [neg], comfy_nodes)
    _assert_same(ours, _sample(m, [_as(p, g)], [neg], comfy_nodes))


def test_with_region_attention_off_the_patch_attends_to_the_global_prompt_only(tiny_objects):
    from fewshot_personalize.kernels.multi_concept.regions import multihead_attention
    from fewshot_personalize.nodes.backend.regional import RegionalAttentionPatch

    left, right = _halves()
    patch = RegionalAttentionPatch(torch.stack([left, right]), 2, 77, (SIZE, SIZE), global_only=True)
    q, (kg, k1, k2), (vg, v1, v2), extra = _patch_case(3)
    k, v = torch.cat([kg, k1, k2], 1), torch.cat([vg, v1, v2], 1)
    out = patch(q, k, v, {**extra, "cond_or_uncond": [0, 1]})
    torch.testing.assert_close(out[:1], multihead_attention(q, kg, vg, 2)[:1], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out[1:], multihead_attention(q, k, v, 2)[1:], atol=1e-5, rtol=1e-5)


def test_a_layout_composes_with_ed_lora(family_case, loras_dir):
    from fewshot_personalize.kernels.backends.diffusers import load_pipeline
    from fewshot_personalize.nodes.apply_layerwise import ApplyLayerwiseConcepts

    family, folder, (m, c, _) = family_case
    _write_edlora(load_pipeline(str(folder)), family, loras_dir / "sks.safetensors")
    m2, c2 = ApplyLayerwiseConcepts.execute(m, c, "sks.safetensors", 1.0, 1.0).args
    g, p, neg = _entry(c2, GLOBAL), _entry(c2, PROMPT), _entry(c2, "")
    regions = _region([p], mask=torch.ones(1, SIZE, SIZE)).args[0]
    m3, positive = _apply(m2, [g], regions, layout=1.0, region_attention=False).args
    _assert_same(_sample(m3, positive, [neg]), _sample(m2, [_as(p, g)], [neg]))


def _stub_model(calls):
    """An apply_model stand-in: the output is the input plus the mean of its context, so every row and crop shows
    which context it ran with."""
    def apply_model(x, t, c_crossattn=None, **kw):
        calls.append({"shape": tuple(x.shape), "t": t.clone(), "keys": set(kw),
                      "flags": kw["transformer_options"]["cond_or_uncond"]})
        return x + c_crossattn.mean((1, 2))[:, None, None, None]
    return apply_model


def test_the_layout_wrapper_composes_conditional_rows_inside_the_crops_and_only_early(tiny_objects):
    from fewshot_personalize.nodes.backend.region_layout import RegionLayoutWrapper

    left, right = _halves()
    previous_calls = []

    def previous(apply_model, args):  # another node's wrapper: kept, and called for every run
        previous_calls.append(args["input"].shape)
        return apply_model(args["input"], args["timestep"], **args["c"])

    wrapper = RegionLayoutWrapper(torch.stack([left, right]), 2, 77, sigma_from=5.0, factor=2, previous=previous)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 8, 8, generator=g)
    parts = [torch.full((2, 77, 8), v) for v in (1.0, 10.0, 100.0)]  # global, region 1, region 2
    context = torch.cat(parts, 1)
    c = {"c_crossattn": context, "y": torch.randn(2, 3, generator=g), "control": object(),
         "transformer_options": {"cond_or_uncond": [1, 0], "uuids": ["u", "c"]}}
    calls = []
    args = {"input": x, "timestep": torch.tensor([9.0, 9.0]), "c": c, "cond_or_uncond": [1, 0]}
    out = wrapper(_stub_model(calls), args)
    plain = x + context.mean((1, 2))[:, None, None, None]
    torch.testing.assert_close(out[0], plain[0])  # the unconditional row (flag 1) is untouched
    torch.testing.assert_close(out[1, ..., :4], x[1, ..., :4] + 10.0)  # left half: region 1's context
    torch.testing.assert_close(out[1, ..., 4:], x[1, ..., 4:] + 100.0)  # right half: region 2's
    assert [k["shape"] for k in calls] == [(2, 4, 8, 8), (1, 4, 8, 4), (1, 4, 8, 4)]
    assert all("control" not in k["keys"] and k["flags"] == [0] for k in calls[1:])  # no ControlNet on crops
    assert len(previous_calls) == 3
    calls.clear()
    late = wrapper(_stub_model(calls), {**args, "timestep": torch.tensor([4.0, 4.0])})  # below sigma_from
    torch.testing.assert_close(late, plain)
    assert len(calls) == 1  # no crop runs
    other = {**c, "c_crossattn": parts[0]}  # not Apply regional sampling's conditioning: untouched
    torch.testing.assert_close(wrapper(_stub_model(calls), {**args, "c": other}), x + 1.0)


def test_layout_requests_that_would_do_nothing_or_are_out_of_range_are_refused(tiny_objects):
    from fewshot_personalize.kernels.core.errors import UserInputError

    m, c, _ = tiny_objects
    regions = _region([_entry(c, LEFT)], box=(0, 0, 32, 64)).args[0]
    with pytest.raises(UserInputError, match="region attention off the regions need a layout share above 0"):
        _apply(m, [_entry(c, GLOBAL)], regions, layout=0.0, region_attention=False)
    with pytest.raises(UserInputError, match="layout share must be between 0 and 1, got 1.5"):
        _apply(m, [_entry(c, GLOBAL)], regions, layout=1.5)
