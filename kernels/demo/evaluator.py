"""Quality metrics for the demo world, mirroring the DreamBooth / CatVersion evaluation protocol.

DreamBooth (arXiv 2208.12242 §4.1) scores a personalised model with DINO and CLIP-I (subject fidelity: how
much generated images look like the real subject), CLIP-T (prompt fidelity: does the image show what the
prompt asks), and in §4.3 PRES (prior preservation: how much "a [class]" images drift towards the subject)
and DIV (diversity of the images for one prompt). CatVersion (arXiv 2311.14631) adds *masked* CLIP-I, which
removes the background before comparing, so a subject copied together with its training background earns
nothing. Here none of those networks exist, so the same roles are played by

* :class:`EvalNet`, a small fully-convolutional network (~0.13 M parameters) trained on base-world renders only
  (never on the personal concepts): context of the whole image, a foreground mask, and the class and colour
  of each cut-out foreground blob; the size word comes from the blob's extent on the world's size scale;
* a subject descriptor: the object is cut out with its mask (background replaced by the plain grey, as in
  masked CLIP-I), scaled to a canonical size, and described by mask-pooled :class:`EvalNet` features plus
  masked colour statistics (histogram, 3×3 colour layout, and the colour transitions inside the object),
  which is what tells a checker pattern, a two-tone colouring or a painted mark apart from a flat-coloured
  object of the same class — but not one layout of the same two colours from another (stripes, a checker and
  blotches of red and yellow meet in the same colour pairs);
* pattern fidelity, which asks exactly that: the layout of the object's colour edges (parallel bands, a grid,
  spots, none), rotation-invariant, from the colour structure tensor (pattern_geometry.py).

Weights ship at ``weights/evaluator.safetensors`` (loaded with safetensors only, metadata records seed, steps,
time and validation accuracy); :func:`train_evaluator` rebuilds them in about 6–7 minutes on one CPU thread.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import time
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from ..core.atomic_write import atomic_write
from . import world
from .pattern_geometry import pattern_geometry
from .world import CLASSES, COLOURS, CONTEXTS, SIZES

log = logging.getLogger(__name__)

__all__ = ["EvalNet", "Evaluator", "evaluate", "train_evaluator", "to_batch", "measure_recognition",
           "DEFAULT_WEIGHTS"]

DEFAULT_WEIGHTS = Path(__file__).resolve().parent / "weights" / "evaluator.safetensors"
FORMAT = "fewshot_personalize.demo_evaluator"
VERSION = "1"
RES = 64  # the evaluator's input resolution
CROP = 32  # resolution of the cut-out objects the network classifies and embeds
_PLAIN = torch.tensor(world._PLAIN_RGB, dtype=torch.float32).view(1, 3, 1, 1)
# share of the subject similarity per descriptor (the parts are unit vectors, so similarity = dot product)
DESCRIPTOR_WEIGHTS: dict[str, float] = {"net": 0.25, "hist": 0.2, "layout": 0.2, "pattern": 0.35}
P_TEXTURE = 0.25  # share of training objects drawn with a generic texture (stripes, dots) instead of flat
MIN_AREA = 24  # pixels (of 64×64) for a foreground blob to count as an object
# Share of the image the predicted foreground may cover in a scene of the world: above what two big objects cover,
# with a margin for objects a model draws larger than the world does. An image beyond it (noise, a texture filling
# the frame) is outside what the evaluator was trained on: it shows no object and no context (see is_scene).
MAX_FOREGROUND = 0.55
# size words by extent: thresholds halfway between the world's size ranges
_SIZE_EDGES = tuple((world.SIZE_SCALE[a][1] + world.SIZE_SCALE[b][0]) / 2 for a, b in zip(SIZES, SIZES[1:]))


# ------------------------------------------------------------------------------------------------------ network
def _conv(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.GroupNorm(8, cout), nn.ReLU())


class EvalNet(nn.Module):
    """Small U-Net (~0.13 M parameters). Full image → context logits and per-pixel foreground logits (32×32).
    Cut-out object (see :func:`_normalise_crop`) + its mask → class and colour logits from mask-pooled decoder
    features; the same pooled features are the learned part of the subject embedding."""

    def __init__(self, widths: Sequence[int] = (16, 16, 48, 64)) -> None:
        super().__init__()
        c0, c1, c2, c3 = widths
        self.widths = tuple(widths)
        self.stem = _conv(3, c0, 2)  # 64 → 32
        self.enc32 = _conv(c0, c1)
        self.enc16 = nn.Sequential(_conv(c1, c2, 2), _conv(c2, c2))
        self.enc8 = nn.Sequential(_conv(c2, c3, 2), _conv(c3, c3))
        self.reduce16 = nn.Conv2d(c3 + c2, c2, 1)
        self.dec16 = _conv(c2, c2)
        self.reduce32 = nn.Conv2d(c2 + c1, c1, 1)
        self.dec32 = _conv(c1, c1)
        self.context_head = nn.Linear(c3, len(CONTEXTS))
        self.fg_head = nn.Conv2d(c1, 1, 1)
        self.object_head = nn.Linear(c1 + c2 + c3, len(CLASSES) + len(COLOURS))

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """``x``: [B, 3, 64, 64] in [0, 1]."""
        f32 = self.enc32(self.stem((x - 0.5) / 0.25))
        f16 = self.enc16(f32)
        f8 = self.enc8(f16)
        u16 = self.dec16(self.reduce16(torch.cat([F.interpolate(f8, scale_factor=2.0, mode="nearest"), f16], 1)))
        u32 = self.dec32(self.reduce32(torch.cat([F.interpolate(u16, scale_factor=2.0, mode="nearest"), f32], 1)))
        g = f8.mean((2, 3))
        return {"context": self.context_head(g), "fg": self.fg_head(u32)[:, 0], "features": u32, "deep": u16,
                "global": g}

    @staticmethod
    def pool(out: dict[str, torch.Tensor], mask: torch.Tensor) -> list[torch.Tensor]:
        """Mask-averaged decoder features [B, c1] and [B, c2], and the global features [B, c3];
        ``mask``: [B, 64, 64] (bool or float)."""
        m = mask.to(torch.float32).unsqueeze(1)
        pooled = []
        for key in ("features", "deep"):
            f = out[key]
            mk = F.interpolate(m, size=f.shape[-2:], mode="area")
            pooled.append((f * mk).sum((2, 3)) / mk.sum((2, 3)).clamp(min=1e-6))
        return pooled + [out["global"]]

    def object_logits(self, out: dict[str, torch.Tensor], mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(class logits [B, 4], colour logits [B, 9]) of the cut-out objects."""
        z = self.object_head(torch.cat(self.pool(out, mask), 1))
        return z[:, :len(CLASSES)], z[:, len(CLASSES):]


# -------------------------------------------------------------------------------------------------- input glue
def to_batch(images) -> torch.Tensor:
    """PIL image(s), a uint8/float array [H, W, 3] / [B, H, W, 3], or a float tensor [B, 3, H, W] / [3, H, W]
    in [0, 1] → float tensor [B, 3, 64, 64] (area-resized when needed)."""
    if isinstance(images, Image.Image):
        images = [images]
    if isinstance(images, torch.Tensor):
        x = images.detach().to(torch.float32).cpu()
        if x.dim() == 3:
            x = x.unsqueeze(0)
        if x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"image tensors must be [B, 3, H, W] (RGB, values in [0, 1]), got {tuple(x.shape)}")
    elif isinstance(images, np.ndarray):
        a = images
        if a.ndim == 3:
            a = a[None]
        if a.ndim != 4 or a.shape[-1] != 3:
            raise ValueError(f"image arrays must be [B, H, W, 3] RGB, got shape {images.shape}")
        x = torch.from_numpy(np.ascontiguousarray(a)).permute(0, 3, 1, 2).to(torch.float32)
        if a.dtype == np.uint8:
            x = x / 255.0
    elif isinstance(images, (list, tuple)):
        if not images:
            raise ValueError("no images given")
        parts = []
        for im in images:
            if isinstance(im, Image.Image):
                im = im.convert("RGB")
                if im.size != (RES, RES):
                    im = im.resize((RES, RES), Image.BOX)
                parts.append(torch.from_numpy(np.array(im)).permute(2, 0, 1).to(torch.float32) / 255.0)
            else:
                parts.append(to_batch(im)[0])
        return torch.stack(parts)
    else:
        raise ValueError(f"unsupported image type {type(images).__name__}: give PIL images, arrays or tensors")
    if x.shape[0] == 0:
        raise ValueError("no images given")
    if x.shape[-2:] != (RES, RES):
        x = F.interpolate(x, size=(RES, RES), mode="area" if x.shape[-1] > RES else "bilinear",
                          align_corners=None if x.shape[-1] > RES else False)
    return x.clamp(0, 1)


def _to_masks(masks, n: int) -> torch.Tensor:
    """Bool masks [n, 64, 64] from arrays/tensors/PIL (any size; nearest-resized)."""
    if isinstance(masks, (np.ndarray, torch.Tensor)) and getattr(masks, "ndim", 0) == 2:
        masks = [masks]
    out = []
    for m in masks:
        if isinstance(m, Image.Image):
            m = np.asarray(m.convert("L")) > 127
        t = torch.as_tensor(np.asarray(m)).to(torch.float32)
        if t.dim() != 2:
            raise ValueError(f"each mask must be 2-D [H, W], got shape {tuple(t.shape)}")
        if t.shape != (RES, RES):
            t = F.interpolate(t[None, None], size=(RES, RES), mode="nearest")[0, 0]
        out.append(t > 0.5)
    if len(out) != n:
        raise ValueError(f"got {len(out)} masks for {n} images")
    return torch.stack(out)


# ------------------------------------------------------------------------------------------ connected components
def _label(mask: np.ndarray, diagonal: bool = True) -> tuple[np.ndarray, int]:
    """Connected components (8-neighbourhood, or 4 with ``diagonal=False``) of a small bool mask:
    (labels 1..n, 0 = background; n)."""
    h, w = mask.shape
    big = h * w + 1
    lab = np.where(mask, np.arange(1, h * w + 1).reshape(h, w), big)
    while True:
        m = lab.copy()
        m[1:] = np.minimum(m[1:], lab[:-1])
        m[:-1] = np.minimum(m[:-1], lab[1:])
        m[:, 1:] = np.minimum(m[:, 1:], lab[:, :-1])
        m[:, :-1] = np.minimum(m[:, :-1], lab[:, 1:])
        if diagonal:
            m[1:, 1:] = np.minimum(m[1:, 1:], lab[:-1, :-1])
            m[:-1, :-1] = np.minimum(m[:-1, :-1], lab[1:, 1:])
            m[1:, :-1] = np.minimum(m[1:, :-1], lab[:-1, 1:])
            m[:-1, 1:] = np.minimum(m[:-1, 1:], lab[1:, :-1])
        m = np.where(mask, m, big)
        flat = m.ravel()  # pointer jumping: follow each label to the label of the pixel it names
        fm = flat < big
        flat[fm] = np.minimum(flat[fm], flat[flat[fm] - 1])
        if np.array_equal(m, lab):
            break
        lab = m
    ids = np.unique(lab[mask])
    remap = np.zeros(big + 1, np.int64)
    remap[ids] = np.arange(1, len(ids) + 1)
    return np.where(mask, remap[np.minimum(lab, big)], 0), len(ids)


def _fill_holes(mask: np.ndarray) -> np.ndarray:
    """Background regions that do not touch the border become foreground (white checker cells, eyes)."""
    lab, n = _label(~mask, diagonal=False)
    border = set(np.unique(np.concatenate([lab[0], lab[-1], lab[:, 0], lab[:, -1]]))) - {0}
    holes = (lab > 0) & ~np.isin(lab, list(border))
    return mask | holes


def _size_word(cls: str, bbox: tuple[float, float, float, float]) -> str:
    """The size word for a blob: its extent (height for toys and kites, which the world scales by height;
    largest side for balls and boxes) against the world's size ranges."""
    w, h = bbox[2] - bbox[0], bbox[3] - bbox[1]
    extent = h if cls in ("toy", "kite") else max(w, h)
    return SIZES[int(np.searchsorted(_SIZE_EDGES, extent))]


# ------------------------------------------------------------------------------------------------- descriptors
def _soft_rgb_bins(x: torch.Tensor) -> torch.Tensor:
    """[B, 3, H, W] → [B, 64, H, W]: soft (trilinear) assignment to a 4×4×4 RGB grid."""
    levels = torch.linspace(0, 1, 4).view(1, 1, 4, 1, 1)
    w = (1 - (x.unsqueeze(2) - levels).abs() * 3).clamp(min=0)  # [B, 3, 4, H, W]
    r, g, b = w[:, 0], w[:, 1], w[:, 2]
    return torch.einsum("bihw,bjhw,bkhw->bijkhw", r, g, b).flatten(1, 3)


def _unit(v: torch.Tensor) -> torch.Tensor:
    return v / v.norm(dim=1, keepdim=True).clamp(min=1e-8)


def _transitions(xn: torch.Tensor, mf: torch.Tensor, step: int = 2, tau: float = 0.35,
                 flat: float = 0.03) -> torch.Tensor:
    """Pattern descriptor: which colours meet which *inside* the object (pairs of pixels ``step`` apart,
    both inside the 1-pixel-eroded mask, differing by more than ``tau`` in RGB), per object pixel, as a
    64×64 colour-transition histogram plus a constant ``flat`` bin, square-rooted and unit-normalised. A
    flat-coloured object is (almost) all ``flat``; checkers, halves and painted marks each leave their own
    colour pairs."""
    inner = -F.max_pool2d(-mf, 3, 1, 1)
    bins = _soft_rgb_bins(xn) * inner
    acc = torch.zeros(xn.shape[0], bins.shape[1], bins.shape[1])
    for a, b, xa, xb in ((bins[..., :-step], bins[..., step:], xn[..., :-step], xn[..., step:]),
                         (bins[..., :-step, :], bins[..., step:, :], xn[..., :-step, :], xn[..., step:, :])):
        gate = ((xa - xb).norm(dim=1, keepdim=True) > tau).to(torch.float32)
        acc = acc + torch.einsum("bihw,bjhw->bij", a * gate, b)
    acc = (acc + acc.transpose(1, 2)).flatten(1) / inner.sum((2, 3)).clamp(min=1)
    acc = torch.cat([acc, torch.full((acc.shape[0], 1), flat)], 1)
    return _unit(acc.clamp(min=0).sqrt())


def _normalise_crop(x: torch.Tensor, m: torch.Tensor, size: int = RES, inner: int = 48
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Cut the masked object out (background := plain grey, as masked CLIP-I), centre it and scale its
    bounding box to ``inner`` of 64 pixels; the canvas is then area-resized to ``size``.
    x [B, 3, 64, 64], m [B, 64, 64] bool → ([B, 3, size, size], [B, size, size] bool)."""
    b = x.shape[0]
    theta = torch.zeros(b, 2, 3)
    for i in range(b):
        ys, xs = torch.nonzero(m[i], as_tuple=True)
        if len(ys) == 0:
            theta[i, 0, 0] = theta[i, 1, 1] = 1.0
            continue
        y0, y1, x0, x1 = ys.min().item(), ys.max().item() + 1, xs.min().item(), xs.max().item() + 1
        side = max(y1 - y0, x1 - x0) * RES / inner
        cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
        s = side / RES
        theta[i] = torch.tensor([[s, 0, cx / RES * 2 - 1], [0, s, cy / RES * 2 - 1]])
    grid = F.affine_grid(theta, [b, 3, RES, RES], align_corners=False)
    mf = m.to(torch.float32).unsqueeze(1)
    fg = (x - _PLAIN) * mf
    fg = F.grid_sample(torch.cat([fg, mf], 1), grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    if size != RES:
        fg = F.interpolate(fg, size=(size, size), mode="area")
    mn = fg[:, 3] > 0.5
    xn = (fg[:, :3] + _PLAIN) * mn.unsqueeze(1) + _PLAIN * (~mn).unsqueeze(1)
    return xn.clamp(0, 1), mn


# --------------------------------------------------------------------------------------------------- evaluator
def _mean_agreement(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean pairwise similarity of unit descriptors [A, D] and [B, D], negatives counted as 0 (no likeness)."""
    return float((a @ b.T).clamp(0, 1).mean())


class Evaluator:
    """The demo benchmark's judge: recognition (CLIP-T analogue) and subject similarity (DINO / masked CLIP-I
    analogue). Build with :meth:`load`."""

    def __init__(self, net: EvalNet, metadata: dict[str, str] | None = None) -> None:
        self.net = net.eval()
        self.metadata = dict(metadata or {})

    # ------------------------------------------------------------------ loading
    @classmethod
    def load(cls, path: str | os.PathLike | None = None) -> "Evaluator":
        """Load weights written by :func:`train_evaluator` (safetensors only; default: the shipped file)."""
        p = Path(path) if path is not None else DEFAULT_WEIGHTS
        if not p.is_file():
            raise FileNotFoundError(f"evaluator weights {p} not found; train them with train_evaluator() or "
                                    f"`python -m fewshot_personalize.kernels.demo.evaluator --out {p}`")
        with safe_open(str(p), framework="pt") as f:
            meta = f.metadata() or {}
            state = {k: f.get_tensor(k).to(torch.float32) for k in f.keys()}
        if meta.get("format") != FORMAT or meta.get("version") != VERSION:
            raise ValueError(f"{p} is not a demo evaluator file of version {VERSION} (format={meta.get('format')!r},"
                             f" version={meta.get('version')!r})")
        widths = tuple(json.loads(meta.get("widths", "[16, 16, 48, 64]")))
        net = EvalNet(widths)
        missing, unexpected = net.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise ValueError(f"{p} does not match the evaluator network: missing {missing}, unexpected {unexpected}")
        return cls(net, meta)

    # ------------------------------------------------------------------ raw network
    @torch.no_grad()
    def _run(self, x: torch.Tensor, batch: int = 128) -> dict[str, torch.Tensor]:
        outs: list[dict[str, torch.Tensor]] = []
        for i in range(0, x.shape[0], batch):
            outs.append(self.net(x[i:i + batch]))
        return {k: torch.cat([o[k] for o in outs]) for k in outs[0]}

    @torch.no_grad()
    def _raw_foreground(self, x: torch.Tensor) -> torch.Tensor:
        fg = self._run(x)["fg"]
        m = F.interpolate(fg.unsqueeze(1), size=(RES, RES), mode="bilinear", align_corners=False)[:, 0] > 0
        return torch.from_numpy(np.stack([_fill_holes(a) for a in m.numpy()]))

    def _scene_foreground(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(object masks [B, 64, 64], emptied where the image is not a scene; scene flags [B])."""
        m = self._raw_foreground(x)
        scene = m.flatten(1).float().mean(1) <= MAX_FOREGROUND
        m[~scene] = False
        return m, scene

    @torch.no_grad()
    def is_scene(self, images) -> torch.Tensor:
        """[B] bool: does the image look like a scene of the world at all? False when the predicted foreground
        covers more than ``MAX_FOREGROUND`` of it, which no scene does but noise and frame-filling textures do.
        Without this check a noise image earns a subject fidelity of the same order as a real object of the
        class, because its "foreground" shares colours and transitions with any subject."""
        return self._scene_foreground(to_batch(images))[1]

    @torch.no_grad()
    def foreground(self, images) -> torch.Tensor:
        """Predicted object masks [B, 64, 64] bool (holes filled); empty for images that are not a scene
        (:meth:`is_scene`)."""
        return self._scene_foreground(to_batch(images))[0]

    @torch.no_grad()
    def classify_objects(self, images, masks) -> tuple[torch.Tensor, torch.Tensor]:
        """Class and colour probabilities ([B, 4], [B, 9]) of the objects cut out of ``images`` by ``masks``."""
        x = to_batch(images)
        xn, mn = _normalise_crop(x, _to_masks(masks, x.shape[0]), CROP)
        out = self._run(xn)
        cls_logits, col_logits = self.net.object_logits(out, mn)
        return cls_logits.softmax(1), col_logits.softmax(1)

    @torch.no_grad()
    def recognise(self, images) -> list[dict]:
        """What each image shows: ``{"scene", "context", "context_confidence", "objects": [{"cls", "colour",
        "size", "confidence", "area", "bbox", "mask"}...]}``. Objects are the connected blobs of the predicted
        foreground (largest first); class and colour come from the cut-out blob, the size word from its extent
        (height for toys and kites, largest side for balls and boxes) on the world's size scale. ``mask`` is a
        64×64 bool array, ``area`` and ``bbox`` are fractions of the image. An image that is not a scene
        (:meth:`is_scene`: noise, a texture filling the frame) has ``scene`` False, context None and no objects."""
        x = to_batch(images)
        ctx = self._run(x)["context"].softmax(1)
        fg, scene_t = self._scene_foreground(x)
        fg, scene = fg.numpy(), scene_t.tolist()
        blobs: list[tuple[int, np.ndarray]] = []
        for i in range(x.shape[0]):
            lab, n = _label(fg[i])
            for k in range(1, n + 1):
                blob = lab == k
                if blob.sum() >= MIN_AREA:
                    blobs.append((i, blob))
        results = [{"scene": scene[i], "context": CONTEXTS[int(ctx[i].argmax())] if scene[i] else None,
                    "context_confidence": float(ctx[i].max()) if scene[i] else 0.0, "objects": []}
                   for i in range(x.shape[0])]
        if blobs:
            idx = torch.tensor([i for i, _ in blobs])
            cls_p, col_p = self.classify_objects(x[idx], [b for _, b in blobs])
            for (i, blob), cp, kp in zip(blobs, cls_p, col_p):
                ys, xs = np.nonzero(blob)
                bbox = (xs.min() / RES, ys.min() / RES, (xs.max() + 1) / RES, (ys.max() + 1) / RES)
                cls = CLASSES[int(cp.argmax())]
                results[i]["objects"].append({
                    "cls": cls, "colour": COLOURS[int(kp.argmax())], "size": _size_word(cls, bbox),
                    "confidence": float(cp.max()), "area": float(blob.mean()), "bbox": bbox, "mask": blob})
        for r in results:
            r["objects"].sort(key=lambda o: -o["area"])
        return results

    @staticmethod
    def _score(rec: dict, expected: dict) -> tuple[int, int]:
        """(attributes found, attributes asked) for one recognised image."""
        asked = found = 0
        if expected.get("context") is not None:
            asked += 1
            found += rec["context"] == expected["context"]
        free = list(rec["objects"])
        for want in expected.get("objects", []):
            keys = [k for k in ("cls", "colour", "size") if want.get(k) is not None]
            asked += len(keys)
            best, best_n = None, -1
            for o in free:
                n = sum(o[k] == want[k] for k in keys)
                if n > best_n:
                    best, best_n = o, n
            if best is not None:
                found += best_n
                free.remove(best)
        return found, asked

    def prompt_fidelity(self, images, expected: dict | str) -> float:
        """CLIP-T analogue (DreamBooth §4.1): mean fraction of the requested attributes (context, and per object
        class, colour and size where asked) that the evaluator recognises. ``expected``: a prompt, or a dict
        in :func:`world.parse_prompt`'s format (``{"context": …, "objects": [{"cls": …, "colour": …,
        "size": …}]}``, ``None`` = not asked)."""
        if isinstance(expected, str):
            expected = world.parse_prompt(expected)
        if not isinstance(expected, dict):
            raise ValueError(f"expected must be a prompt string or a dict, got {type(expected).__name__}")
        scores = []
        for rec in self.recognise(images):
            found, asked = self._score(rec, expected)
            if asked == 0:
                raise ValueError(f"nothing to check: expected {expected} asks for no context or object attribute")
            scores.append(found / asked)
        return float(np.mean(scores))

    # ------------------------------------------------------------------ subject similarity
    @torch.no_grad()
    def _subject_masks(self, x: torch.Tensor, masks=None, cls: str | None = None) -> torch.Tensor:
        """[B, 64, 64] bool: ``masks`` when given; else the predicted foreground, restricted to blobs recognised
        as ``cls`` when that is given and found."""
        if masks is not None:
            return _to_masks(masks, x.shape[0])
        if cls is None:
            return self.foreground(x)
        if cls not in CLASSES:
            raise ValueError(f"unknown class {cls!r}; expected one of {CLASSES}")
        m = torch.zeros(x.shape[0], RES, RES, dtype=torch.bool)
        for i, rec in enumerate(self.recognise(x)):
            blobs = [o["mask"] for o in rec["objects"] if o["cls"] == cls] or [o["mask"] for o in rec["objects"]]
            if blobs:
                m[i] = torch.from_numpy(np.logical_or.reduce(blobs))
        return m

    def embed(self, images, masks=None, cls: str | None = None) -> torch.Tensor:
        """Subject descriptors [B, D], unit length, so that similarity = dot product (the DINO / masked CLIP-I
        embedding's role). ``masks``: the object masks (e.g. the references'); by default the predicted
        foreground, restricted to blobs recognised as ``cls`` when that is given and found."""
        x = to_batch(images)
        m = self._subject_masks(x, masks, cls)
        xs, ms = _normalise_crop(x, m, CROP)
        p32, p16, _ = self.net.pool(self._run(xs), ms)
        xn, mn = _normalise_crop(x, m)
        mf = mn.to(torch.float32).unsqueeze(1)
        area = mf.sum((2, 3)).clamp(min=1)
        bins = _soft_rgb_bins(xn) * mf  # [B, 64, H, W]
        hist = bins.sum((2, 3)) / area
        cells = F.adaptive_avg_pool2d(bins[:, :, 8:56, 8:56], 3).flatten(1)
        parts = {"net": torch.cat([_unit(p32), _unit(p16)], 1) / math.sqrt(2), "hist": _unit(hist.sqrt()),
                 "layout": _unit(cells.clamp(min=0).sqrt()), "pattern": _transitions(xn, mf)}
        emb = torch.cat([math.sqrt(DESCRIPTOR_WEIGHTS[k]) * v for k, v in parts.items()], 1)
        emb[mn.flatten(1).sum(1) == 0] = 0.0  # nothing found: similar to nothing
        return emb

    def similarity(self, images_a, images_b, masks_a=None, masks_b=None, cls: str | None = None) -> torch.Tensor:
        """Pairwise subject similarity [A, B] in [0, 1] (1 = same-looking object)."""
        ea = self.embed(images_a, masks_a, cls)
        eb = self.embed(images_b, masks_b, cls)
        return (ea @ eb.T).clamp(0, 1)

    def subject_fidelity(self, images, references, ref_masks=None, cls: str | None = None) -> float:
        """DINO / masked CLIP-I analogue (DreamBooth §4.1, CatVersion): mean pairwise similarity between the
        objects in the generated ``images`` and the subject in the ``references``, background masked out.
        ``ref_masks``: the references' object masks (predicted when omitted); ``cls``: compare only the
        generated blobs of that class (prompts with several objects)."""
        return float(self.similarity(images, references, None, ref_masks, cls).mean())

    def pattern_embed(self, images, masks=None, cls: str | None = None) -> torch.Tensor:
        """Pattern-geometry descriptors [B, D] (pattern_geometry.py: stripes, grid, spots or flat, whatever the
        colours), of the object cut out as :meth:`embed` cuts it; zero where nothing is found."""
        x = to_batch(images)
        xn, mn = _normalise_crop(x, self._subject_masks(x, masks, cls))
        emb = pattern_geometry(xn, mn.to(torch.float32).unsqueeze(1))
        emb[mn.flatten(1).sum(1) == 0] = 0.0
        return emb

    def pattern_fidelity(self, images, references, ref_masks=None, cls: str | None = None) -> float:
        """Mean pairwise pattern-geometry similarity in [0, 1] between the objects in ``images`` and the subject
        in ``references`` (masks and ``cls`` as in :meth:`subject_fidelity`). Subject fidelity credits the
        colours that meet inside an object; this asks whether they are laid out alike: red/yellow blotches score
        high on subject fidelity against red/yellow stripes and low here."""
        return _mean_agreement(self.pattern_embed(images, None, cls), self.pattern_embed(references, ref_masks))

    def fidelities(self, images, references, ref_masks=None, cls: str | None = None) -> dict[str, float]:
        """``subject_fidelity`` and ``pattern_fidelity`` together (as the two methods give them), finding the
        objects in ``images`` once for both."""
        x, refs = to_batch(images), to_batch(references)
        m, rm = self._subject_masks(x, None, cls), self._subject_masks(refs, ref_masks)
        return {"subject_fidelity": _mean_agreement(self.embed(x, m), self.embed(refs, rm)),
                "pattern_fidelity": _mean_agreement(self.pattern_embed(x, m), self.pattern_embed(refs, rm))}

    def prior_preservation(self, class_images, references, ref_masks=None) -> float:
        """PRES analogue (DreamBooth §4.3): subject fidelity of images generated from the bare class prompt
        ("a toy") to the subject's references; higher = the class prior drifted towards the subject."""
        return self.subject_fidelity(class_images, references, ref_masks)

    def diversity(self, images, masks=None) -> float:
        """DIV analogue (DreamBooth §4.3): 1 − mean pairwise subject similarity among images of one prompt."""
        x = to_batch(images)
        if x.shape[0] < 2:
            raise ValueError(f"diversity needs at least 2 images, got {x.shape[0]}")
        e = self.embed(x, masks)
        s = (e @ e.T).clamp(0, 1)
        n = s.shape[0]
        off = s[~torch.eye(n, dtype=torch.bool)]
        return float(1 - off.mean())

    def evaluate(self, images, prompt: str, references=None, ref_masks=None, subject_cls: str | None = None) -> dict:
        """All metrics for the images of one prompt: prompt fidelity from the prompt parsed with the world's
        vocabulary, subject fidelity against ``references`` (blobs of the subject's class: the class of the object
        the identifier stands in, or ``subject_cls`` for a prompt that describes the subject in plain words),
        diversity, and the share of images that are scenes at all (``scene_rate``; noise scores 0 everywhere, see
        :meth:`is_scene`)."""
        expected = world.parse_prompt(prompt)
        x = to_batch(images)
        out: dict = {"prompt": prompt, "expected": {k: expected[k] for k in ("context", "objects")},
                     "prompt_fidelity": self.prompt_fidelity(x, expected), "n_images": int(x.shape[0]),
                     "scene_rate": float(self.is_scene(x).float().mean())}
        idx = expected.get("subject_index")
        cls = expected["objects"][idx]["cls"] if idx is not None else subject_cls
        if references is not None:
            out |= self.fidelities(x, references, ref_masks, cls)
        if x.shape[0] >= 2:
            out["diversity"] = self.diversity(x)
        return out


@lru_cache(maxsize=1)
def _default_evaluator() -> Evaluator:
    return Evaluator.load()


def evaluate(images, prompt: str, references=None, ref_masks=None, evaluator: Evaluator | None = None,
             subject_cls: str | None = None) -> dict:
    """Convenience: :meth:`Evaluator.evaluate` with the shipped evaluator."""
    return (evaluator or _default_evaluator()).evaluate(images, prompt, references, ref_masks, subject_cls)


# ------------------------------------------------------------------------------------------------------ training
def _render_dataset(rng: np.random.Generator, n: int) -> dict[str, np.ndarray]:
    """n base-world renders with labels: context, foreground at 32×32, and per object slot (≤ 2) its 64×64
    mask, class and colour (255 = empty slot)."""
    imgs = np.zeros((n, RES, RES, 3), np.uint8)
    ctx = np.zeros(n, np.int64)
    fg = np.zeros((n, 32, 32), np.uint8)
    obj_mask = np.zeros((n, 2, RES, RES), bool)
    obj_cls = np.full((n, 2), 255, np.uint8)
    obj_col = np.full((n, 2), 255, np.uint8)
    for i in range(n):
        u = rng.uniform()
        scene = world.sample_scene(rng, n_objects=0 if u < 0.04 else (2 if u < 0.40 else 1))
        plain_colour = []
        for obj in scene.objects:  # texture augmentation (never a concept's pattern): see world.PATTERNS
            plain_colour.append(rng.uniform() >= P_TEXTURE)
            if not plain_colour[-1]:
                obj.pattern = ("stripes", "dots")[int(rng.integers(2))]
                obj.colour2 = COLOURS[int(rng.integers(len(COLOURS)))]
        img, full, masks = world.render(scene, RES)
        imgs[i] = np.asarray(img)
        ctx[i] = CONTEXTS.index(scene.context)
        fg[i] = full.reshape(32, 2, 32, 2).mean((1, 3)) >= 0.5
        for k, (obj, m) in enumerate(zip(scene.objects, masks)):
            obj_mask[i, k] = m
            obj_cls[i, k] = CLASSES.index(obj.cls)
            obj_col[i, k] = COLOURS.index(obj.colour) if plain_colour[k] else 255
    return {"images": imgs, "context": ctx, "fg": fg, "obj_mask": obj_mask, "obj_cls": obj_cls,
            "obj_col": obj_col}


def _augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Random horizontal flip is done by the caller; here: blur (down-up sampling, as from a small latent
    decoder), noise and brightness jitter, so generated images are judged like renders."""
    b = x.shape[0]
    r = torch.rand(b, 3, generator=g)
    down2 = F.interpolate(F.interpolate(x, scale_factor=0.5, mode="area"), size=(RES, RES), mode="bilinear",
                          align_corners=False)
    down4 = F.interpolate(F.interpolate(x, scale_factor=0.25, mode="area"), size=(RES, RES), mode="bilinear",
                          align_corners=False)
    sel = r[:, 0].view(b, 1, 1, 1)
    x = torch.where(sel < 0.35, down2, torch.where(sel < 0.45, down4, x))
    x = x * (1 + (r[:, 1].view(b, 1, 1, 1) - 0.5) * 0.16)
    x = x + torch.randn(x.shape, generator=g) * (r[:, 2].view(b, 1, 1, 1) * 0.04)
    return x.clamp(0, 1)


def _images(data: dict[str, np.ndarray], idx: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(data["images"][idx]).permute(0, 3, 1, 2).to(torch.float32) / 255.0


def _jitter_masks(m: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Randomly grow or shrink masks by a pixel (predicted masks are never exact)."""
    mf = m.to(torch.float32).unsqueeze(1)
    grow = F.max_pool2d(mf, 3, 1, 1)
    shrink = -F.max_pool2d(-mf, 3, 1, 1)
    r = torch.rand(m.shape[0], 1, 1, 1, generator=g)
    out = torch.where(r < 0.25, grow, torch.where(r < 0.5, shrink, mf))[:, 0] > 0.5
    return torch.where(out.flatten(1).any(1).view(-1, 1, 1), out, m)


def _train_step(net: EvalNet, data: dict[str, np.ndarray], objects: np.ndarray, rng: np.random.Generator,
                g: torch.Generator, batch: int) -> torch.Tensor:
    """Scene losses (context, foreground) on ``batch // 2`` images + object losses (class, colour) on ``batch``
    cut-out objects (at ``CROP`` resolution)."""
    idx = rng.integers(0, len(data["images"]), batch // 2)
    x = _images(data, idx)
    fg = torch.from_numpy(data["fg"][idx]).to(torch.float32)
    flip = torch.from_numpy(rng.uniform(size=len(idx)) < 0.5)
    x[flip], fg[flip] = x[flip].flip(-1), fg[flip].flip(-1)
    out = net(_augment(x, g))
    loss = F.cross_entropy(out["context"], torch.from_numpy(data["context"][idx]))
    loss = loss + F.binary_cross_entropy_with_logits(out["fg"], fg)
    pick = objects[rng.integers(0, len(objects), batch)]
    xo = _images(data, pick[:, 0])
    mo = torch.from_numpy(data["obj_mask"][pick[:, 0], pick[:, 1]])
    flip = torch.from_numpy(rng.uniform(size=batch) < 0.5)
    xo[flip], mo[flip] = xo[flip].flip(-1), mo[flip].flip(-1)
    xn, mn = _normalise_crop(_augment(xo, g), _jitter_masks(mo, g), CROP)
    cls_logits, col_logits = net.object_logits(net(xn), mn)
    loss = loss + F.cross_entropy(cls_logits, torch.from_numpy(data["obj_cls"][pick[:, 0], pick[:, 1]]).long())
    loss = loss + F.cross_entropy(col_logits, torch.from_numpy(data["obj_col"][pick[:, 0], pick[:, 1]]).long(),
                                  ignore_index=255)
    return loss


def measure_recognition(ev: Evaluator, n: int = 200, seed: int = 12345) -> dict[str, float]:
    """Accuracy on fresh base-world renders: context per image; class / colour / size per object (the
    recognised blob that overlaps the true object most; an object with no overlapping blob counts wrong)."""
    rng = np.random.default_rng([seed, 2])
    scenes = [world.sample_scene(rng) for _ in range(n)]
    rendered = [world.render(s, RES) for s in scenes]
    recs = ev.recognise([r[0] for r in rendered])
    hits = {"context": 0, "cls": 0, "colour": 0, "size": 0, "found": 0}
    n_obj = 0
    for scene, (_, _, masks), rec in zip(scenes, rendered, recs):
        hits["context"] += rec["context"] == scene.context
        for obj, m in zip(scene.objects, masks):
            n_obj += 1
            best = max(rec["objects"], key=lambda o: (o["mask"] & m).sum(), default=None)
            if best is None or (best["mask"] & m).sum() == 0:
                continue
            hits["found"] += 1
            for k in ("cls", "colour", "size"):
                hits[k] += best[k] == getattr(obj, k)
    return {"context": hits["context"] / n, **{k: hits[k] / max(n_obj, 1) for k in ("cls", "colour", "size",
                                                                                     "found")}}


def train_evaluator(out_path: str | os.PathLike = DEFAULT_WEIGHTS, seed: int = 0, minutes: float = 9.0,
                    steps: int = 1500, n_images: int = 5000, batch: int = 48, lr: float = 4e-3,
                    threads: int = 1) -> dict:
    """Train :class:`EvalNet` on fresh base-world renders (never on personal concepts) and save it as
    safetensors with seed, steps, time and validation accuracy in the metadata. Stops after ``steps`` or
    when ``minutes`` (data rendering included) are used up, whichever comes first. ``threads``: torch CPU
    threads; on a shared 2-core machine one thread is far faster than two (measured 0.23 s vs 5 s per step
    while other processes held the cores: OpenMP threads wait for each other when descheduled)."""
    if minutes <= 0 or steps <= 0 or n_images < batch:
        raise ValueError(f"need minutes > 0, steps > 0 and n_images >= batch, got {minutes}, {steps}, {n_images}")
    old_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return _train(Path(out_path), seed, minutes, steps, n_images, batch, lr, threads)
    finally:
        torch.set_num_threads(old_threads)


def _train(out_path: Path, seed: int, minutes: float, steps: int, n_images: int, batch: int, lr: float,
           threads: int) -> dict:
    t0 = time.time()
    torch.manual_seed(seed)
    rng = np.random.default_rng([seed, 1])
    data = _render_dataset(rng, n_images)
    t_data = time.time() - t0
    log.info("rendered %d training images in %.0f s", n_images, t_data)
    net = EvalNet()
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    g = torch.Generator().manual_seed(seed)
    objects = np.argwhere(data["obj_cls"] != 255)  # (image, slot) of every object
    deadline = t0 + minutes * 60
    step = 0
    net.train()
    losses: list[float] = []
    t_train = time.time()
    for step in range(1, steps + 1):
        # warm-up, then cosine decay over the steps or the time left, whichever runs out first
        progress = min(1.0, max(step / steps, (time.time() - t_train) / max(deadline - t_train, 1e-6)))
        for grp in opt.param_groups:
            grp["lr"] = lr * min(1.0, step / 50) * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress)))
        loss = _train_step(net, data, objects, rng, g, batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if step % 100 == 0:
            log.info("step %d loss %.4f (%.0f s)", step, float(np.mean(losses[-100:])), time.time() - t0)
        if time.time() > deadline:
            log.warning("time budget of %.1f min used up after %d of %d steps", minutes, step, steps)
            break
    train_s = time.time() - t0
    ev = Evaluator(net.eval())
    acc = measure_recognition(ev, n=300, seed=seed + 777)
    log.info("validation accuracy %s", acc)
    meta = {"format": FORMAT, "version": VERSION, "widths": json.dumps(list(net.widths)), "seed": str(seed),
            "steps": str(step), "batch": str(batch), "n_train_images": str(n_images),
            "train_seconds": f"{train_s:.1f}", "render_seconds": f"{t_data:.1f}", "threads": str(threads),
            "final_loss": f"{float(np.mean(losses[-50:])):.4f}", "validation_accuracy": json.dumps(acc),
            "torch": torch.__version__,
            "note": "trained on base-world renders only (no personal concepts); see evaluator.train_evaluator"}
    state = {k: v.detach().to(torch.float16).contiguous() for k, v in net.state_dict().items()}
    out_path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(out_path, lambda tmp: save_file(state, tmp, metadata=meta))
    ev.metadata = meta
    return {"path": str(out_path), "steps": step, "seconds": train_s, "accuracy": acc}


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m fewshot_personalize.kernels.demo.evaluator --out weights.safetensors``"""
    ap = argparse.ArgumentParser(description="Train the demo world's evaluator network.")
    ap.add_argument("--out", default=str(DEFAULT_WEIGHTS))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--minutes", type=float, default=9.0)
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--images", type=int, default=5000)
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (2 only on an idle machine)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    res = train_evaluator(args.out, args.seed, args.minutes, args.steps, args.images, threads=args.threads)
    log.info("%s", json.dumps(res))


if __name__ == "__main__":
    main()
