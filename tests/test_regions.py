"""Mix-of-Show's regional sampling (Gu et al., NeurIPS 2023, §3.4): region masks, token weights, overlap averaging
and region-restricted cross-attention, checked against direct per-head softmax attention."""

from __future__ import annotations

import pytest
import torch

from fewshot_personalize.kernels.adapters.layerwise_context import layer_context, stack_layer_contexts
from fewshot_personalize.kernels.core.errors import UserInputError
from fewshot_personalize.kernels.multi_concept.regions import (
    Region,
    combine_weights,
    multihead_attention,
    parse_region,
    region_masks,
    regional_attention,
    token_grid,
    token_weights,
)

HEADS, C = 2, 8
H, W = 32, 48  # image; tokens on a 4 x 6 grid of 8-pixel cells
GH, GW = 4, 6
N = GH * GW


def _reference_attention(q, k, v, heads):
    """softmax(Q Kᵀ / √d) V written out head by head in float64."""
    b, n, c = q.shape
    d = c // heads
    out = torch.empty(b, n, c, dtype=torch.float64)
    for h in range(heads):
        sl = slice(h * d, (h + 1) * d)
        qh, kh, vh = q[..., sl].double(), k[..., sl].double(), v[..., sl].double()
        logits = qh @ kh.transpose(-1, -2) / d ** 0.5
        p = logits.exp() / logits.exp().sum(-1, keepdim=True)
        out[..., sl] = p @ vh
    return out


def _kv(seed, length, batch=2):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, length, C, generator=g), torch.randn(batch, length, C, generator=g)


def _q(batch=2, n=N, seed=0):
    return torch.randn(batch, n, C, generator=torch.Generator().manual_seed(seed))


def _token_ids(box):
    """Row-major indices of the 8-pixel tokens lying fully inside a pixel box (x0, y0, x1, y1)."""
    x0, y0, x1, y1 = box
    return [r * GW + c for r in range(GH) for c in range(GW)
            if c * 8 >= x0 and (c + 1) * 8 <= x1 and r * 8 >= y0 and (r + 1) * 8 <= y1]


def _weights_for(boxes):
    masks, _ = region_masks([Region.from_box(b, prompt_index=i) for i, b in enumerate(boxes)], H, W)
    return token_weights(masks, N)


# --- multi-head attention ------------------------------------------------------------------------------------------

def test_multihead_attention_is_softmax_qk_v_per_head():
    q = _q(n=5)
    k, v = _kv(1, 7)
    torch.testing.assert_close(multihead_attention(q, k, v, HEADS).double(), _reference_attention(q, k, v, HEADS),
                               atol=1e-5, rtol=1e-5)
    # heads matter: one head over all channels is a different function
    assert not torch.allclose(multihead_attention(q, k, v, 1), multihead_attention(q, k, v, HEADS), atol=1e-4)


# --- regional attention --------------------------------------------------------------------------------------------

def test_one_region_over_the_whole_image_is_that_prompts_attention_and_ignores_the_global_prompt():
    q = _q()
    kg, vg = _kv(1, 5)
    kr, vr = _kv(2, 6)
    weights = _weights_for([(0, 0, W, H)])
    assert torch.equal(weights, torch.ones(1, N))
    out = regional_attention(q, kg, vg, [kr], [vr], weights, HEADS)
    torch.testing.assert_close(out, multihead_attention(q, kr, vr, HEADS), atol=1e-6, rtol=1e-6)
    kg2, vg2 = _kv(3, 5)
    assert torch.equal(regional_attention(q, kg2, vg2, [kr], [vr], weights, HEADS), out)
    seen = []

    def recording(q_, k_, v_, heads):
        seen.append(k_)
        return multihead_attention(q_, k_, v_, heads)

    regional_attention(q, kg, vg, [kr], [vr], weights, HEADS, attention=recording)
    assert len(seen) == 1 and seen[0] is kr  # no token uses the global prompt: it is not computed


def test_no_regions_or_zero_weight_regions_are_global_attention():
    q = _q()
    kg, vg = _kv(1, 5)
    kr, vr = _kv(2, 6)
    expected = multihead_attention(q, kg, vg, HEADS)
    torch.testing.assert_close(regional_attention(q, kg, vg, [], [], torch.zeros(0, N), HEADS), expected,
                               atol=1e-6, rtol=1e-6)

    seen = []

    def recording(q_, k_, v_, heads):
        seen.append(k_)
        return multihead_attention(q_, k_, v_, heads)

    out = regional_attention(q, kg, vg, [kr], [vr], torch.zeros(1, N), HEADS, attention=recording)
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=1e-6)
    assert len(seen) == 1 and seen[0] is kg  # the zero-weight region was not computed


def test_two_disjoint_boxes_use_their_own_prompts_inside_and_the_global_prompt_outside():
    box_a, box_b = (0, 0, 16, 16), (32, 16, 48, 32)
    q = _q()
    kg, vg = _kv(1, 5)
    (ka, va), (kb, vb) = _kv(2, 6), _kv(3, 4)
    out = regional_attention(q, kg, vg, [ka, kb], [va, vb], _weights_for([box_a, box_b]), HEADS).double()
    ref_g, ref_a, ref_b = (_reference_attention(q, k, v, HEADS) for k, v in ((kg, vg), (ka, va), (kb, vb)))
    in_a, in_b = _token_ids(box_a), _token_ids(box_b)
    assert len(in_a) == 4 and len(in_b) == 4
    for t in range(N):
        ref = ref_a if t in in_a else ref_b if t in in_b else ref_g
        torch.testing.assert_close(out[:, t], ref[:, t], atol=1e-5, rtol=1e-5, msg=f"token {t}")


def test_overlapping_boxes_average_the_two_regions_attentions():
    box_a, box_b = (0, 0, 32, 16), (16, 0, 48, 32)
    q = _q()
    kg, vg = _kv(1, 5)
    (ka, va), (kb, vb) = _kv(2, 6), _kv(3, 4)
    out = regional_attention(q, kg, vg, [ka, kb], [va, vb], _weights_for([box_a, box_b]), HEADS).double()
    ref_g, ref_a, ref_b = (_reference_attention(q, k, v, HEADS) for k, v in ((kg, vg), (ka, va), (kb, vb)))
    in_a, in_b = set(_token_ids(box_a)), set(_token_ids(box_b))
    both = in_a & in_b
    assert len(both) == 4
    for t in range(N):
        if t in both:
            ref = (ref_a[:, t] + ref_b[:, t]) / 2
        elif t in in_a:
            ref = ref_a[:, t]
        elif t in in_b:
            ref = ref_b[:, t]
        else:
            ref = ref_g[:, t]
        torch.testing.assert_close(out[:, t], ref, atol=1e-5, rtol=1e-5, msg=f"token {t}")


def test_a_token_half_inside_a_region_blends_region_and_global_prompts():
    q = _q()
    kg, vg = _kv(1, 5)
    kr, vr = _kv(2, 6)
    weights = _weights_for([(0, 0, 4, 8)])  # left half of token 0 only
    assert weights[0, 0].item() == pytest.approx(0.5)
    out = regional_attention(q, kg, vg, [kr], [vr], weights, HEADS).double()
    ref_g, ref_r = _reference_attention(q, kg, vg, HEADS), _reference_attention(q, kr, vr, HEADS)
    torch.testing.assert_close(out[:, 0], (ref_g[:, 0] + ref_r[:, 0]) / 2, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out[:, 1:], ref_g[:, 1:], atol=1e-5, rtol=1e-5)


def test_region_keys_of_batch_one_are_broadcast_to_cond_and_uncond_rows():
    q = _q(batch=2)
    kg, vg = _kv(1, 5, batch=2)
    kr, vr = _kv(2, 6, batch=1)
    out = regional_attention(q, kg, vg, [kr], [vr], _weights_for([(0, 0, W, H)]), HEADS)
    torch.testing.assert_close(out, multihead_attention(q, kr.expand(2, -1, -1), vr.expand(2, -1, -1), HEADS),
                               atol=1e-6, rtol=1e-6)


# --- overlap averaging ---------------------------------------------------------------------------------------------

def test_combine_weights_averages_overlaps_and_gives_the_rest_to_the_global_prompt():
    w = torch.tensor([[1.0, 1.0, 0.0, 0.5, 0.25],
                      [1.0, 0.0, 0.0, 1.0, 0.25]])
    region_w, global_w = combine_weights(w)
    s = w.sum(0)
    for t in range(w.shape[1]):
        for r in range(2):
            assert region_w[r, t].item() == pytest.approx(w[r, t].item() / max(s[t].item(), 1.0))
        assert global_w[t].item() == pytest.approx(1 - min(s[t].item(), 1.0))
    assert region_w[:, 0].tolist() == [0.5, 0.5] and global_w[0].item() == 0.0  # fully in two regions
    assert global_w[2].item() == 1.0  # outside every region
    torch.testing.assert_close(region_w.sum(0) + global_w, torch.ones(5))


# --- token grid and weights ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("height,width,n_tokens,grid", [
    (64, 96, 96, (8, 12)), (64, 96, 24, (4, 6)), (64, 96, 6, (2, 3)),  # image 64x96 → latent 8x12 → /2 → /4
    (8, 12, 96, (8, 12)), (8, 12, 24, (4, 6)), (8, 12, 6, (2, 3)),  # the same given the latent's size
    (96, 64, 24, (6, 4)),  # portrait
    (64, 64, 64, (8, 8)), (64, 64, 16, (4, 4)), (64, 64, 4, (2, 2)), (64, 64, 1, (1, 1)),
    (72, 72, 81, (9, 9)), (72, 72, 25, (5, 5)), (72, 72, 9, (3, 3)),  # odd latent 9 → ceil(9/2) = 5 → 3
])
def test_token_grid_is_inferred_from_the_token_count_and_aspect(height, width, n_tokens, grid):
    assert token_grid(n_tokens, height, width) == grid
    masks = torch.ones(1, height, width)
    torch.testing.assert_close(token_weights(masks, n_tokens), torch.ones(1, n_tokens))


def test_token_weights_are_row_major_over_the_layer_grid():
    masks, _ = region_masks([Region.from_box((40, 16, 48, 24))], 64, 96)  # one 8-px cell: row 2, column 5
    for n, cell in ((96, 8), (24, 16), (6, 32)):
        gh, gw = token_grid(n, 64, 96)
        w = token_weights(masks, n).reshape(1, gh, gw)
        expected = torch.zeros(gh, gw)
        expected[16 // cell, 40 // cell] = 64 / cell ** 2
        torch.testing.assert_close(w[0], expected)


@pytest.mark.parametrize("n_tokens,cell", [(96, 8), (24, 16), (6, 32)])
def test_partial_coverage_gives_the_covered_area_fraction(n_tokens, cell):
    box = (3, 5, 29, 21)
    x0, y0, x1, y1 = box
    masks, _ = region_masks([Region.from_box(box)], 64, 96)
    w = token_weights(masks, n_tokens)
    gh, gw = 64 // cell, 96 // cell
    for r in range(gh):
        for c in range(gw):
            ox = max(0, min(x1, (c + 1) * cell) - max(x0, c * cell))
            oy = max(0, min(y1, (r + 1) * cell) - max(y0, r * cell))
            assert w[0, r * gw + c].item() == pytest.approx(ox * oy / cell ** 2, abs=1e-6), (r, c)


def test_the_last_token_of_an_odd_latent_covers_only_the_pixels_inside_the_image():
    masks, _ = region_masks([Region.from_box((64, 64, 72, 72))], 72, 72)  # latent 9x9 → 5x5 of 16-px cells
    w = token_weights(masks, 25).reshape(5, 5)
    expected = torch.zeros(5, 5)
    expected[4, 4] = 1.0  # the last cell's in-image part is exactly pixels 64..72
    torch.testing.assert_close(w, expected)


def test_an_impossible_token_count_is_refused():
    with pytest.raises(UserInputError, match=r"7 attention tokens.*96x64"):
        token_weights(torch.ones(1, 64, 96), 7)
    with pytest.raises(UserInputError, match="7"):
        token_grid(7, 64, 96)


# --- region masks --------------------------------------------------------------------------------------------------

def test_a_box_rasterises_to_exactly_the_box():
    box = (5, 3, 17, 30)
    masks, notes = region_masks([Region.from_box(box)], 32, 48)
    assert masks.shape == (1, 32, 48) and notes == []
    ys, xs = torch.meshgrid(torch.arange(32), torch.arange(48), indexing="ij")
    inside = (xs >= 5) & (xs < 17) & (ys >= 3) & (ys < 30)
    assert torch.equal(masks[0], inside.float())


@pytest.mark.parametrize("region,match", [
    (Region.from_box((0, 0, 49, 32), label="a <A> toy"), r"region 1 \('a <A> toy'\).*outside the 48x32 image"),
    (Region.from_box((-1, 0, 10, 10)), r"region 1.*outside the 48x32 image"),
    (Region.from_box((10, 0, 10, 10)), r"region 1.*zero area"),
    (Region.from_box((10, 12, 20, 5)), r"region 1.*zero area"),
    (Region.from_mask(torch.zeros(32, 48)), r"region 1.*all zero"),
    (Region.from_mask(torch.full((32, 48), 2.0)), r"region 1.*\[0, 1\]"),
    (Region.from_mask(torch.ones(2, 32, 48)), r"region 1.*\[H, W\]"),
])
def test_bad_regions_are_refused_with_a_message_naming_the_problem(region, match):
    with pytest.raises(UserInputError, match=match):
        region_masks([region], 32, 48)


def test_the_failing_region_is_named_by_its_position():
    with pytest.raises(UserInputError, match=r"region 2.*outside"):
        region_masks([Region.from_box((0, 0, 8, 8)), Region.from_box((0, 0, 8, 40))], 32, 48)


def test_a_region_needs_exactly_one_of_box_and_mask():
    with pytest.raises(UserInputError):
        Region()
    with pytest.raises(UserInputError):
        Region(box=(0, 0, 1, 1), mask=torch.ones(1, 1))
    with pytest.raises(UserInputError, match="4 numbers"):
        Region.from_box((0, 0, 1))
    with pytest.raises(UserInputError, match="whole"):
        Region.from_box((0, 0, 1.5, 2))


def test_a_mask_of_another_size_is_resized_and_a_note_says_so():
    small = torch.zeros(16, 24)
    small[:, :12] = 1.0  # left half
    masks, notes = region_masks([Region.from_mask(small, label="cat")], 32, 48)
    assert masks.shape == (1, 32, 48)
    assert masks.min() >= 0 and masks.max() <= 1
    assert torch.all(masks[0, :, :22] == 1) and torch.all(masks[0, :, 26:] == 0)  # away from the edge
    assert len(notes) == 1 and "resized" in notes[0] and "24x16" in notes[0] and "48x32" in notes[0]
    assert "cat" in notes[0] and "stretched" not in notes[0]

    _, notes = region_masks([Region.from_mask(torch.ones(16, 16))], 32, 48)
    assert "stretched" in notes[0]
    _, notes = region_masks([Region.from_mask(torch.ones(32, 48) * 0.5)], 32, 48)
    assert notes == []


def test_overlapping_regions_are_noted():
    _, notes = region_masks([Region.from_box((0, 0, 16, 16)), Region.from_box((8, 8, 24, 24))], 32, 48)
    assert len(notes) == 1 and "region 1 and region 2 overlap on 64 pixels" in notes[0]
    _, notes = region_masks([Region.from_box((0, 0, 16, 16)), Region.from_box((16, 0, 24, 24))], 32, 48)
    assert notes == []


# --- the command line's --region -----------------------------------------------------------------------------------

def test_parse_region():
    assert parse_region("8,0,40,32:a <A> toy") == ((8, 0, 40, 32), "a <A> toy")
    assert parse_region(" 8, 0 ,40,32 : a photo: of <B> ") == ((8, 0, 40, 32), "a photo: of <B>")


@pytest.mark.parametrize("text,match", [
    ("8,0,40,32 a toy", "no ':'"),
    ("8,0,40:a toy", "3 number"),
    ("8,0,40,32,1:a toy", "5 number"),
    ("8,zero,40,32:a toy", "'zero' is not a whole pixel number"),
    ("8,0,4.5,32:a toy", "'4.5' is not a whole"),
    ("8,0,8,32:a toy", "zero area"),
    ("-8,0,8,32:a toy", "negative"),
    ("8,0,40,32:  ", "prompt after ':' is empty"),
])
def test_malformed_region_text_is_refused(text, match):
    with pytest.raises(UserInputError, match=match) as err:
        parse_region(text)
    assert "--region" in str(err.value)


# --- layer-wise (ED-LoRA) contexts of several parts: the global and region prompts stacked one after another ------

def _stacked_parts(parts, layers, tokens, batch=2, d=3, seed=0):
    """(per part [layers, B, L, D], their stacked contexts concatenated [B, parts·layers·L, D])."""
    g = torch.Generator().manual_seed(seed)
    per_part = [torch.randn(layers, batch, tokens, d, generator=g) for _ in range(parts)]
    return per_part, torch.cat([stack_layer_contexts(p) for p in per_part], dim=1)


@pytest.mark.parametrize("parts", [1, 2, 3])
def test_layer_context_gives_every_parts_slice_of_the_layer_in_order(parts):
    layers, tokens = 4, 5
    per_part, context = _stacked_parts(parts, layers, tokens)
    for layer in range(layers):
        out = layer_context(context, layer, layers, tokens)
        assert out.shape == (2, parts * tokens, 3)
        assert torch.equal(out, torch.cat([p[layer] for p in per_part], dim=1))


def test_layer_context_of_one_part_is_the_plain_slice():
    per_part, context = _stacked_parts(1, 3, 4)
    out = layer_context(context, 2, 3, 4)
    assert torch.equal(out, per_part[0][2]) and out.data_ptr() == context[:, 8:].data_ptr()  # a view, as before


def test_layer_context_of_a_repeated_stack_slices_each_copy():
    """ComfyUI pads a context to a common length by repeating it whole: every copy gives the same layer slice."""
    per_part, context = _stacked_parts(1, 3, 4)
    out = layer_context(context.repeat(1, 2, 1), 1, 3, 4)
    assert torch.equal(out, per_part[0][1].repeat(1, 2, 1))


@pytest.mark.parametrize("length", [4, 8, 13, 4 * 3 + 4, 0])
def test_layer_context_passes_other_lengths_unchanged(length):
    context = torch.randn(1, length, 3)
    assert layer_context(context, 1, 3, 4) is context  # not a multiple of layers·tokens (or empty)


def test_layer_context_of_one_layer_passes_everything():
    context = torch.randn(1, 8, 3)
    assert layer_context(context, 0, 1, 4) is context
