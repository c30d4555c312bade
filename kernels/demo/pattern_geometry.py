"""Pattern geometry of a cut-out object: are its colour edges parallel bands, a grid, spots or none at all?

The subject descriptor of evaluator.py compares *which colours* meet inside an object, not *how* they are laid
out: red/yellow stripes, a red/yellow checker and red/yellow blotches leave the same colour pairs. This descriptor
is the layout, rotation-invariant, from the colour structure tensor (Di Zenzo 1986, "A note on the gradient of a
multi-image"; the orientation moments of Bigün & Granlund 1987): at each inner pixel, with colour gradients
``g_x, g_y`` summed over RGB,

    J = [[Σ g_x², Σ g_x g_y], [Σ g_x g_y, Σ g_y²]],   z = ((J_xx − J_yy) + 2i J_xy) / (J_xx + J_yy) = e^{2iθ}

and over the object's strong-edge pixels (weights ``w``, per object pixel) the moments

    d = Σ w / area (edge density),   c₁ = |Σ w z| / Σ w,   c₂ = |Σ w z²| / Σ w.

Parallel stripes have one edge orientation (c₁ ≈ c₂ ≈ 1); a checker has two at right angles (c₁ ≈ 0, c₂ high);
spots and blotches have every orientation (both low); a flat object has almost no edges (d small). Rotating the
object multiplies z by a unit phase, which the moduli drop. The descriptor soft-bins (c₁, c₂) jointly, weighted by
how textured the object is, beside a "flat" bin, at two scales; unit length, so similarity is a dot product.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["orientation_moments", "pattern_geometry"]

LEVELS = 4  # soft bins per coherence axis (0, 1/3, 2/3, 1)
EDGE = 0.125  # colour-gradient magnitude (Sobel, RGB in [0, 1]) that counts as an edge inside the object
#: edge density at which an object counts as flat (≤ lo) or fully textured (≥ hi), at scale 1; ×2 at scale 2
FLAT_LO, FLAT_HI = 0.05, 0.15
_SOBEL = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]]) / 8


def orientation_moments(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(d, c₁, c₂) of the module docstring for images ``x`` [B, 3, H, W] in [0, 1] inside ``mask`` [B, 1, H, W]
    (float, 1 = object); pixels within 2 of the mask's edge are left out (the silhouette is not a pattern).
    Returns [B, 3]; c₁ = c₂ = 0 where the object has no edge."""
    b, _, h, w = x.shape
    k = torch.stack([_SOBEL, _SOBEL.T]).unsqueeze(1)
    g = F.conv2d(x.reshape(b * 3, 1, h, w), k, padding=1).view(b, 3, 2, h, w)
    gx, gy = g[:, :, 0], g[:, :, 1]
    jxx, jyy, jxy = (gx * gx).sum(1), (gy * gy).sum(1), (gx * gy).sum(1)
    trace = jxx + jyy
    inner = -F.max_pool2d(-mask, 5, 1, 2)[:, 0]
    weight = (trace.sqrt() > EDGE).to(x.dtype) * inner
    z = torch.complex(jxx - jyy, 2 * jxy) / trace.clamp(min=1e-8)
    total = weight.sum((1, 2))
    d = total / inner.sum((1, 2)).clamp(min=1)
    c1 = (weight * z).sum((1, 2)).abs() / total.clamp(min=1e-8)
    c2 = (weight * z * z).sum((1, 2)).abs() / total.clamp(min=1e-8)
    return torch.stack([d, c1, c2], 1)


def _encode(moments: torch.Tensor, flat_lo: float, flat_hi: float) -> torch.Tensor:
    d, c = moments[:, 0], moments[:, 1:].clamp(0, 1)
    levels = torch.linspace(0, 1, LEVELS)
    soft = (1 - (c.unsqueeze(2) - levels).abs() * (LEVELS - 1)).clamp(min=0)  # [B, 2, LEVELS]
    joint = torch.einsum("bi,bj->bij", soft[:, 0], soft[:, 1]).flatten(1)
    textured = ((d - flat_lo) / (flat_hi - flat_lo)).clamp(0, 1).unsqueeze(1)
    v = torch.cat([joint / joint.norm(dim=1, keepdim=True).clamp(min=1e-8) * textured, 1 - textured], 1)
    return v / v.norm(dim=1, keepdim=True).clamp(min=1e-8)


def pattern_geometry(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Unit descriptors [B, 2·(LEVELS² + 1)] of the objects in ``x`` [B, 3, 64, 64] (cut out, centred and
    scaled as evaluator._normalise_crop leaves them) inside ``mask`` [B, 1, 64, 64]: the module docstring's
    (c₁, c₂) soft bins and flat bin at full and at half resolution, each half weighted equally."""
    half_x = F.avg_pool2d(x, 2)
    half_m = (F.avg_pool2d(mask, 2) > 0.99).to(x.dtype)
    parts = [_encode(orientation_moments(x, mask), FLAT_LO, FLAT_HI),
             _encode(orientation_moments(half_x, half_m), 2 * FLAT_LO, 2 * FLAT_HI)]
    return torch.cat(parts, 1) / 2**0.5
