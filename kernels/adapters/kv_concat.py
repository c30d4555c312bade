"""CatVersion's change to CLIP self-attention: learned key/value tokens concatenated to every prompt's keys and
values in chosen layers (Zhao et al. 2023, arXiv 2311.14631, §3.2).

For one head with queries q, the prompt's keys K and values V (already projected) and n learned tokens
(k_c, v_c), attention over the concatenation is

    Attn(q, [k_c; K], [v_c; V]) = (1 − Λ)·Attn(q, K, V) + Σ_j λ_j·v_c,j,     λ_j = softmax weight of k_c,j,

i.e. a residual towards the learned values whose size the query decides (§3.2, eq. 6 for n = 1); Λ = Σ λ_j.
The learned tokens are visible from every position (the prompt's causal mask does not apply to them; the
reference code instead adds +1 to their logits, which this implementation does not do). ``strength`` s scales
the residual: s·Attn(q,[k_c;K],[v_c;V]) + (1 − s)·Attn(q, K, V), so 0 is the plain model and 1 the adapter.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F


def _heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """[B, L, D] → [B, heads, L, D/heads]."""
    b, n, d = x.shape
    return x.view(b, n, heads, d // heads).transpose(1, 2)


def _additive(mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    if mask is None:
        return None
    if mask.dtype == torch.bool:  # True = may attend
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, torch.finfo(dtype).min)
    return mask.to(dtype)


def kv_concat_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_tokens: torch.Tensor,
                        v_tokens: torch.Tensor, heads: int, mask: torch.Tensor | None = None,
                        strength: float = 1.0, scale: float | None = None) -> torch.Tensor:
    """Multi-head attention with ``k_tokens`` / ``v_tokens`` [n, D] prepended to the keys and values.

    Args:
        q, k, v: projected queries, keys and values [B, L, D] of the prompt.
        k_tokens, v_tokens: the learned tokens [n, D] (split over heads like k and v).
        heads: number of attention heads (D must divide by it).
        mask: the prompt's own attention mask over L×L (additive float, or bool with True = attend),
            broadcastable to [B, heads, L, L]; the learned tokens are always visible.
        strength: s in s·Attn(q,[k_c;K],[v_c;V]) + (1 − s)·Attn(q,K,V).
        scale: logit scale (default 1/√(D/heads)).
    Returns:
        [B, L, D], heads merged, before the output projection.
    """
    b, n_q, d = q.shape
    n = k_tokens.shape[0]
    kc = k_tokens.to(k.dtype).unsqueeze(0).expand(b, n, d)
    vc = v_tokens.to(v.dtype).unsqueeze(0).expand(b, n, d)
    qh, kh, vh = _heads(q, heads), _heads(torch.cat([kc, k], 1), heads), _heads(torch.cat([vc, v], 1), heads)
    m = _additive(mask, q.dtype)
    full = None
    if m is not None:
        prefix = torch.zeros(*m.shape[:-1], n, dtype=m.dtype, device=m.device)
        full = torch.cat([prefix, m], -1)
    out = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=full, scale=scale)
    if strength != 1.0:
        plain = F.scaled_dot_product_attention(qh, kh[:, :, n:], vh[:, :, n:], attn_mask=m, scale=scale)
        out = strength * out + (1.0 - strength) * plain
    return out.transpose(1, 2).reshape(b, n_q, d)


@functools.lru_cache(maxsize=16)
def causal_mask(length: int, dtype: torch.dtype = torch.float32, device=None) -> torch.Tensor:
    """CLIP's additive causal mask [L, L]: position i sees positions ≤ i (cached: built once per shape, outside
    inference mode so training may use it too; never modify the returned tensor)."""
    with torch.inference_mode(False):
        return torch.full((length, length), torch.finfo(dtype).min, dtype=dtype, device=device).triu_(1)


def init_kv_tokens(n: int, width: int, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Initial K and V tokens as the reference code draws them: standard normal, [n, width] each."""
    return torch.randn(n, width, generator=generator), torch.randn(n, width, generator=generator)
