"""CatVersion's K/V concatenation against its residual form (arXiv 2311.14631 §3.2): with learned tokens (k_c, v_c)
prepended, attention equals (1 − Λ)·Attn(q, K, V) + Σ_j λ_j v_c,j, λ_j = the softmax weight of k_c,j."""

import pytest
import torch

from fewshot_personalize.kernels.adapters.kv_concat import causal_mask, kv_concat_attention


def _split(x, heads):
    b, n, d = x.shape
    return x.view(b, n, heads, d // heads).transpose(1, 2)


def _residual_form(q, k, v, kc, vc, heads, mask):
    """The paper's formula computed head by head with explicit softmax weights."""
    qh, kh, vh = _split(q, heads), _split(k, heads), _split(v, heads)
    dh = q.shape[-1] // heads
    kch = kc.view(kc.shape[0], heads, dh).transpose(0, 1)  # [H, n, dh]
    vch = vc.view(vc.shape[0], heads, dh).transpose(0, 1)
    scale = dh ** -0.5
    logits = qh @ kh.transpose(-1, -2) * scale + (0 if mask is None else mask)  # [B, H, L, L]
    prefix = torch.einsum("bhld,hnd->bhln", qh, kch) * scale  # [B, H, L, n]
    m = torch.maximum(logits.amax(-1, keepdim=True), prefix.amax(-1, keepdim=True))
    e_plain, e_prefix = (logits - m).exp(), (prefix - m).exp()
    z = e_plain.sum(-1, keepdim=True) + e_prefix.sum(-1, keepdim=True)
    lam = e_prefix / z  # λ_j
    plain = torch.softmax(logits, -1) @ vh
    out = (1 - lam.sum(-1, keepdim=True)) * plain + torch.einsum("bhln,hnd->bhld", lam, vch)
    return out.transpose(1, 2).reshape(q.shape), plain.transpose(1, 2).reshape(q.shape)


@pytest.mark.parametrize("n_tokens,heads,masked", [(1, 4, True), (2, 2, True), (1, 1, False), (3, 4, False)])
def test_concatenated_attention_equals_the_residual_form(n_tokens, heads, masked):
    g = torch.Generator().manual_seed(n_tokens * 10 + heads)
    b, length, d = 2, 7, 16
    q, k, v = (torch.randn(b, length, d, generator=g, dtype=torch.float64) for _ in range(3))
    kc, vc = (torch.randn(n_tokens, d, generator=g, dtype=torch.float64) for _ in range(2))
    mask = causal_mask(length, torch.float64) if masked else None
    expected, plain = _residual_form(q, k, v, kc, vc, heads, mask)
    out = kv_concat_attention(q, k, v, kc, vc, heads, mask)
    torch.testing.assert_close(out, expected, atol=1e-10, rtol=1e-10)
    assert not torch.allclose(out, plain, atol=1e-3)  # the tokens really change the attention


def test_strength_interpolates_between_plain_and_full_attention():
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 5, 8, generator=g, dtype=torch.float64) for _ in range(3))
    kc, vc = torch.randn(1, 8, generator=g, dtype=torch.float64), torch.randn(1, 8, generator=g, dtype=torch.float64)
    mask = causal_mask(5, torch.float64)
    full, plain = _residual_form(q, k, v, kc, vc, 2, mask)
    torch.testing.assert_close(kv_concat_attention(q, k, v, kc, vc, 2, mask, strength=0.0), plain)
    torch.testing.assert_close(kv_concat_attention(q, k, v, kc, vc, 2, mask, strength=0.25), 0.25 * full + 0.75 * plain)


def test_learned_tokens_are_visible_from_every_position_and_a_bool_mask_works():
    # the first query position sees only itself and the prefix: its output mixes v_0 and v_c only
    q, k, v = torch.zeros(1, 3, 4), torch.zeros(1, 3, 4), torch.arange(12.).view(1, 3, 4)
    kc, vc = torch.zeros(1, 4), torch.full((1, 4), 100.0)
    allowed = torch.ones(3, 3).tril().bool()
    out = kv_concat_attention(q, k, v, kc, vc, 1, allowed)
    torch.testing.assert_close(out[0, 0], (v[0, 0] + vc[0]) / 2)  # equal logits: half each
    torch.testing.assert_close(out[0, 2], (v[0].sum(0) + vc[0]) / 4)
