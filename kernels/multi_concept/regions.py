"""Mix-of-Show's regionally controllable sampling (Gu et al., NeurIPS 2023, §3.4), as backend-independent math.

Each region (a pixel box or a mask) has its own prompt. In cross-attention only, the output at the image
tokens inside a region is the attention of those queries with that region's prompt's keys and values;
elsewhere it is the attention with the global prompt's; where regions overlap their outputs are averaged.

Pipeline, per cross-attention layer:

1. ``region_masks``: rasterise the regions to image-size masks [R, H, W] (once per image);
2. ``token_weights``: pool the masks to the layer's token grid [R, N] (area-weighted, so a token half inside
   a region gets weight 0.5; callers may cache the result per N);
3. ``regional_attention``: global_w·Attn(q, K_g, V_g) + Σ_r region_w_r·Attn(q, K_r, V_r), with the
   overlap averaging of ``combine_weights``.

A ComfyUI attention patch and a diffusers attention processor call these; nothing here knows either.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from ..core.errors import UserInputError

Box = tuple[int, int, int, int]
#: ``attention(q, k, v, heads)`` on [B, N, C] / [B, L, C] tensors → [B, N, C] (heads merged).
AttentionFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, int], torch.Tensor]

_REGION_SYNTAX = "expected 'x0,y0,x1,y1:prompt' (a pixel box, x1 and y1 exclusive, then ':' and the prompt)"


@dataclass(frozen=True, eq=False)
class Region:
    """One region of Mix-of-Show's regional sampling (§3.4): where, and which prompt.

    Exactly one of ``box`` (pixels ``(x0, y0, x1, y1)``, x1/y1 exclusive) and ``mask`` (float [H, W] in [0, 1],
    any size; resized to the image by ``region_masks``) is set. ``prompt_index`` is the index of the region's
    prompt / conditioning in the caller's list; ``label`` (e.g. the prompt text) only names the region in
    messages. Regions compare by identity (a mask tensor has no meaningful ``==``).
    """

    box: Box | None = None
    mask: torch.Tensor | None = None
    prompt_index: int = 0
    label: str = ""

    def __post_init__(self) -> None:
        if (self.box is None) == (self.mask is None):
            raise UserInputError("a region needs exactly one of a box (x0, y0, x1, y1) and a mask")
        if isinstance(self.prompt_index, bool) or not isinstance(self.prompt_index, int) or self.prompt_index < 0:
            raise UserInputError(f"a region's prompt index must be a whole number >= 0, got {self.prompt_index!r}")

    @classmethod
    def from_box(cls, box: Sequence[int], prompt_index: int = 0, label: str = "") -> Region:
        """A box region; ``box`` = (x0, y0, x1, y1) in pixels, x1/y1 exclusive (checked against the image later)."""
        values = list(box)
        if len(values) != 4:
            raise UserInputError(f"a region box needs 4 numbers (x0, y0, x1, y1), got {len(values)}: {box!r}")
        whole = []
        for v in values:
            if isinstance(v, bool) or not isinstance(v, (int, float)) or (isinstance(v, float) and not v.is_integer()):
                raise UserInputError(f"a region box needs whole pixel numbers, got {v!r} in {tuple(values)!r}")
            whole.append(int(v))
        return cls(box=(whole[0], whole[1], whole[2], whole[3]), prompt_index=prompt_index, label=label)

    @classmethod
    def from_mask(cls, mask: torch.Tensor, prompt_index: int = 0, label: str = "") -> Region:
        """A mask region; ``mask`` is [H, W] (or [1, H, W]) with values in [0, 1] (bool is accepted)."""
        if not isinstance(mask, torch.Tensor):
            raise UserInputError(f"a region mask must be a tensor, got {type(mask).__name__}")
        return cls(mask=mask, prompt_index=prompt_index, label=label)

    def describe(self, index: int) -> str:
        """How messages name this region: 'region 2 ('a <A> toy')' (1-based)."""
        return f"region {index + 1}" + (f" ({self.label!r})" if self.label else "")


def parse_region(text: str) -> tuple[Box, str]:
    """Parse the command line's ``--region "x0,y0,x1,y1:prompt"`` into ``((x0, y0, x1, y1), prompt)``.

    Only the syntax and the box's own consistency (whole numbers, x0 < x1, y0 < y1, no negatives) are checked
    here; whether it fits the image is checked by ``region_masks``. The prompt is everything after the first ':'.
    """
    where = f"--region {text!r}"
    coords, colon, prompt = text.partition(":")
    if not colon:
        raise UserInputError(f"{where}: no ':' between the box and the prompt; {_REGION_SYNTAX}")
    parts = [p.strip() for p in coords.split(",")]
    if len(parts) != 4:
        raise UserInputError(f"{where}: the box has {len(parts)} number(s), not 4; {_REGION_SYNTAX}")
    values = []
    for p in parts:
        try:
            values.append(int(p))
        except ValueError:
            raise UserInputError(f"{where}: {p!r} is not a whole pixel number; {_REGION_SYNTAX}") from None
    x0, y0, x1, y1 = values
    if min(values) < 0:
        raise UserInputError(f"{where}: box coordinates cannot be negative")
    if x1 <= x0 or y1 <= y0:
        raise UserInputError(f"{where}: the box has zero area (need x0 < x1 and y0 < y1; x1 and y1 are exclusive)")
    prompt = prompt.strip()
    if not prompt:
        raise UserInputError(f"{where}: the prompt after ':' is empty; {_REGION_SYNTAX}")
    return (x0, y0, x1, y1), prompt


def _image_size(height: int, width: int) -> str:
    return f"{width}x{height} image (width x height)"


def _box_mask(region: Region, index: int, height: int, width: int) -> torch.Tensor:
    x0, y0, x1, y1 = region.box  # type: ignore[misc]
    name, box = region.describe(index), f"{x0},{y0},{x1},{y1}"
    if x1 <= x0 or y1 <= y0:
        raise UserInputError(f"{name}: box {box} has zero area (need x0 < x1 and y0 < y1; x1 and y1 are exclusive)")
    if x0 < 0 or y0 < 0 or x1 > width or y1 > height:
        raise UserInputError(f"{name}: box {box} reaches outside the {_image_size(height, width)}; "
                             f"boxes must lie within 0,0,{width},{height} (x1 and y1 are exclusive)")
    m = torch.zeros(height, width)
    m[y0:y1, x0:x1] = 1.0
    return m


def _resized_mask(region: Region, index: int, height: int, width: int, notes: list[str]) -> torch.Tensor:
    name = region.describe(index)
    m = region.mask.detach()  # type: ignore[union-attr]
    if m.dim() == 3 and m.shape[0] == 1:
        m = m[0]
    if m.dim() != 2:
        raise UserInputError(f"{name}: a mask must be [H, W] (or [1, H, W]), got shape {tuple(region.mask.shape)}")
    if 0 in m.shape:
        raise UserInputError(f"{name}: the mask is empty (shape {tuple(m.shape)})")
    m = m.to(device="cpu", dtype=torch.float32)
    if not torch.isfinite(m).all() or m.min() < 0 or m.max() > 1:
        raise UserInputError(f"{name}: mask values must lie in [0, 1] (found {m.min().item():g}..{m.max().item():g})")
    if not (m > 0).any():
        raise UserInputError(f"{name}: the mask is all zero, so the region selects no pixels")
    if tuple(m.shape) != (height, width):
        mh, mw = m.shape
        stretch = "" if mh * width == mw * height else "; its aspect ratio differs, so it is stretched"
        # bilinear with antialiasing: plain bilinear when enlarging, an area-like filter when shrinking
        m = F.interpolate(m[None, None], size=(height, width), mode="bilinear", align_corners=False,
                          antialias=True)[0, 0].clamp(0.0, 1.0)
        notes.append(f"{name}: mask of {mw}x{mh} resized to the {_image_size(height, width)}{stretch}")
        if not (m > 0).any():
            raise UserInputError(f"{name}: the mask vanishes when resized to the {_image_size(height, width)}")
    return m


def region_masks(regions: Sequence[Region], height: int, width: int) -> tuple[torch.Tensor, list[str]]:
    """Rasterise regions to image-size masks for Mix-of-Show's regional sampling (§3.4).

    Returns ``(masks, notes)``: masks [R, height, width] float32 on the CPU in [0, 1] (a box is exactly 1 inside,
    0 outside), and notes (sentences) the user should be told, e.g. that a mask was resized or regions overlap.
    Raises UserInputError for a box outside the image or of zero area, a mask of the wrong rank, with values
    outside [0, 1], or all zero.
    """
    if isinstance(height, bool) or isinstance(width, bool) or not isinstance(height, int) \
            or not isinstance(width, int) or height <= 0 or width <= 0:
        raise UserInputError(f"the image size must be positive whole numbers, got width {width!r}, height {height!r}")
    notes: list[str] = []
    masks = []
    for i, region in enumerate(regions):
        if region.box is not None:
            masks.append(_box_mask(region, i, height, width))
        else:
            masks.append(_resized_mask(region, i, height, width, notes))
    if not masks:
        return torch.zeros(0, height, width), notes
    stacked = torch.stack(masks)
    inside = stacked > 0
    for i in range(len(masks)):
        for j in range(i + 1, len(masks)):
            shared = int((inside[i] & inside[j]).sum())
            if shared:
                notes.append(f"{regions[i].describe(i)} and {regions[j].describe(j)} overlap on {shared} pixels: "
                             f"their prompts are averaged there")
    if bool((stacked.sum(0) >= 1).all()):
        notes.append("the regions cover the whole image, so the global prompt has no effect")
    return stacked, notes


def _grid_and_cell(n_tokens: int, height: int, width: int) -> tuple[int, int, float, float]:
    """(gh, gw, cell_h, cell_w): the token grid of an attention layer with n_tokens tokens for an image (or latent)
    of height x width, and each token's footprint in those units."""
    # A UNet halves its latent with stride-2 convolutions (padding 1): size ceil(n / 2) per level, so a layer's
    # grid is ceil(H / f) x ceil(W / f) for a power of two f (the VAE's factor times 2^level).
    for j in range(0, 24):
        f = 2 ** j
        gh, gw = -(-height // f), -(-width // f)
        if gh * gw == n_tokens:
            return gh, gw, float(f), float(f)
        if gh * gw < n_tokens:
            break
    # Otherwise: a factorisation gh * gw = n_tokens within one token of the image's aspect
    # (like ComfyUI's attention-couple code: gh ≈ sqrt(n_tokens * H / W)).
    scale = math.sqrt(height * width / n_tokens)
    want_h, want_w = height / scale, width / scale
    best = None
    for gh in sorted({max(1, math.floor(want_h)), math.ceil(want_h)}):
        if n_tokens % gh:
            continue
        gw = n_tokens // gh
        if abs(gh - want_h) < 1 and abs(gw - want_w) < 1:
            err = abs(math.log(gh / gw) - math.log(height / width))
            if best is None or err < best[0]:
                best = (err, gh, gw)
    if best is None:
        raise UserInputError(f"cannot lay {n_tokens} attention tokens out as a grid with the aspect of a "
                             f"{_image_size(height, width)}: no gh x gw = {n_tokens} fits; is the image size right?")
    _, gh, gw = best
    return gh, gw, height / gh, width / gw


def token_grid(n_tokens: int, height: int, width: int) -> tuple[int, int]:
    """The (rows, columns) of an attention layer's token grid: gh * gw == n_tokens with the aspect of height x width.

    UNet layers run at ceil(latent / 2^k); that is tried first, then any factorisation within one token of the
    aspect. Raises UserInputError when none fits.
    """
    if n_tokens <= 0:
        raise UserInputError(f"an attention layer needs at least one token, got {n_tokens}")
    gh, gw, _, _ = _grid_and_cell(n_tokens, height, width)
    return gh, gw


def _coverage_matrix(cells: int, cell: float, pixels: int) -> torch.Tensor:
    """[cells, pixels]: the fraction of each cell's in-image footprint [i·cell, (i+1)·cell) ∩ [0, pixels) that
    pixel [y, y+1) makes up (rows sum to 1)."""
    i = torch.arange(cells, dtype=torch.float64)[:, None]
    y = torch.arange(pixels, dtype=torch.float64)[None, :]
    start, end = i * cell, (i + 1) * cell
    overlap = (torch.minimum(end, y + 1) - torch.maximum(start, y)).clamp(min=0)
    return overlap / overlap.sum(1, keepdim=True)  # the row sum is the footprint's length inside the image


def token_weights(masks: torch.Tensor, n_tokens: int, aspect: tuple[int, int] | None = None,
                  grid: tuple[int, int] | None = None) -> torch.Tensor:
    """Region masks [R, H, W] pooled to one attention layer's tokens → [R, n_tokens] (row-major, like the flattened
    image tokens), for Mix-of-Show's regional sampling (§3.4).

    Each weight is the mean of the mask over the token's footprint (exact area pooling, so a token a quarter
    inside a box gets 0.25). The grid is ``grid`` if given, else inferred from n_tokens and ``aspect``
    = (height, width) of the image or latent (default: the masks' own size) by ``token_grid``; the footprint
    follows UNet downsampling (ceil(H / f) tokens of f pixels, the last clipped to the image) when it matches,
    else an even split. Pure: callers may cache it per n_tokens. Returns float32 on the masks' device.
    """
    if masks.dim() != 3:
        raise ValueError(f"masks must be [R, H, W], got shape {tuple(masks.shape)}")
    r, mh, mw = masks.shape
    ah, aw = aspect if aspect is not None else (mh, mw)
    if grid is not None:
        gh, gw = grid
        if gh * gw != n_tokens:
            raise ValueError(f"grid {gh}x{gw} does not hold {n_tokens} tokens")
        cell_h, cell_w = mh / gh, mw / gw
    else:
        if n_tokens <= 0:
            raise UserInputError(f"an attention layer needs at least one token, got {n_tokens}")
        gh, gw, cell_h, cell_w = _grid_and_cell(n_tokens, ah, aw)
        cell_h, cell_w = cell_h * mh / ah, cell_w * mw / aw  # footprint in mask pixels
    rows = _coverage_matrix(gh, cell_h, mh).to(masks.device)
    cols = _coverage_matrix(gw, cell_w, mw).to(masks.device)
    pooled = torch.einsum("ih,rhw,jw->rij", rows, masks.to(torch.float64), cols)
    return pooled.reshape(r, gh * gw).to(torch.float32)


def combine_weights(weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Overlap averaging of Mix-of-Show's regional sampling (§3.4): token weights [R, N] → (region_w [R, N],
    global_w [N]).

    With s = Σ_r w_r per token: region_w_r = w_r / max(s, 1) and global_w = 1 − min(s, 1). So a token fully
    inside two regions gets 1/2 from each and none from the global prompt, a token outside every region gets
    the global prompt only, and fractional edges blend; region_w.sum(0) + global_w = 1 everywhere.
    """
    total = weights.sum(0)
    region_w = weights / total.clamp(min=1.0)
    global_w = 1.0 - total.clamp(max=1.0)
    return region_w, global_w


def multihead_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    """softmax(Q Kᵀ / √d) V per head on projected [B, N, C] queries and [B, L, C] keys/values → [B, N, C]
    (heads split from C, merged back; d = C / heads)."""
    b, n, c = q.shape
    if c % heads:
        raise ValueError(f"{c} channels do not split into {heads} heads")

    def split(x: torch.Tensor) -> torch.Tensor:
        return x.reshape(x.shape[0], x.shape[1], heads, x.shape[2] // heads).transpose(1, 2)

    out = F.scaled_dot_product_attention(split(q), split(k), split(v))
    return out.transpose(1, 2).reshape(b, n, out.shape[1] * out.shape[3])


def regional_attention(q: torch.Tensor, k_global: torch.Tensor, v_global: torch.Tensor,
                       k_regions: Sequence[torch.Tensor], v_regions: Sequence[torch.Tensor],
                       weights: torch.Tensor, heads: int, attention: AttentionFn | None = None) -> torch.Tensor:
    """Region-restricted cross-attention (Mix-of-Show §3.4).

    out = global_w·Attn(q, k_global, v_global) + Σ_r region_w_r·Attn(q, k_regions[r], v_regions[r]),
    with (region_w, global_w) = ``combine_weights(weights)``.

    Args:
        q: projected image queries [B, N, C].
        k_global, v_global: the global prompt's projected keys/values [B, L, C].
        k_regions, v_regions: each region's prompt, projected by the same to_k / to_v, [B, L_r, C] (batch 1 is
            broadcast to B).
        weights: [R, N] from ``token_weights`` (not yet combined); the same for every batch row, so cond and
            uncond rows in one batch are treated alike.
        heads: number of attention heads.
        attention: ``attention(q, k, v, heads)`` → [B, N, C]; default ``multihead_attention`` (ComfyUI may pass
            its optimized attention).
    Regions whose weights are all zero at this layer are not computed, nor the global prompt where no token
    uses it. Returns [B, N, C] in q's dtype.
    """
    attend = attention or multihead_attention
    b, n, _ = q.shape
    if len(k_regions) != len(v_regions) or weights.dim() != 2 or weights.shape[0] != len(k_regions):
        raise ValueError(f"{len(k_regions)} region keys, {len(v_regions)} region values and weights of shape "
                         f"{tuple(weights.shape)} do not match ([R, N] with one row per region)")
    if weights.shape[1] != n:
        raise ValueError(f"weights cover {weights.shape[1]} tokens but q has {n}")
    region_w, global_w = combine_weights(weights.to(device=q.device, dtype=torch.float32))
    acc_dtype = torch.promote_types(q.dtype, torch.float32)

    def batch(x: torch.Tensor) -> torch.Tensor:
        return x.expand(b, *x.shape[1:]) if x.shape[0] == 1 and b != 1 else x

    out = torch.zeros(q.shape, dtype=acc_dtype, device=q.device)
    if bool((global_w != 0).any()):
        out += global_w[None, :, None].to(acc_dtype) * attend(q, batch(k_global), batch(v_global), heads)
    for w, k, v in zip(region_w, k_regions, v_regions):
        if bool((w != 0).any()):
            out += w[None, :, None].to(acc_dtype) * attend(q, batch(k), batch(v), heads)
    return out.to(q.dtype)
