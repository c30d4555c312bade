"""The metrics as functions of feature tensors [N, D] (one row per image or prompt); all cosines.

DreamBooth (arXiv 2208.12242): CLIP-I and DINO are the mean cosine over all generated × real image pairs (§4.1);
CLIP-T the mean cosine between each generated image and its prompt (§4.1); PRES the mean pairwise DINO cosine
between class-prompt images of the personalised model and the real subject images (§4.3, lower = less drift of the
class prior). DIV there is LPIPS between generated images of one prompt (§4.3); LPIPS's weights cannot be loaded
offline, so :func:`diversity` is a stand-in: 1 − the mean cosine between distinct generated images' features.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..core.errors import UserInputError


def cosine_matrix(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """[N,D], [M,D] → [N,M] cosine similarities."""
    return F.normalize(a.double(), dim=-1) @ F.normalize(b.double(), dim=-1).T


def mean_pairwise(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean cosine over every pair (row of ``a``, row of ``b``): CLIP-I, DINO, PRES."""
    return float(cosine_matrix(a, b).mean())


def prompt_similarity(images: torch.Tensor, text: torch.Tensor) -> float:
    """CLIP-T: mean cosine of each image's features with the prompt's (``text`` [1,D])."""
    return mean_pairwise(images, text)


def diversity(features: torch.Tensor) -> float:
    """1 − mean cosine over distinct pairs of rows (DIV stand-in; 0 = all alike). Needs two rows or more."""
    n = features.shape[0]
    if n < 2:
        raise UserInputError("diversity needs at least 2 generated images")
    sim = cosine_matrix(features, features)
    return float(1 - (sim.sum() - sim.diagonal().sum()) / (n * (n - 1)))
