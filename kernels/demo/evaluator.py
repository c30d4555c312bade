"""Quality metrics for the demo world, mirroring the DreamBooth / CatVersion evaluation protocol.

DreamBooth (arXiv 2208.12242 §4.1) scores a personalised model with DINO and CLIP-I (subject fidelity: how
much generated images look like the real subject), CLIP-T (prompt fidelity: does the image show what the
prompt asks), and in §4.3 PRES (prior preservation: how much "a [class]" images drift towards the subject)
and DIV (diversity of the images for one prompt). CatVersion (arXiv 2311.14631) adds *masked* CLIP-I, which
removes the background before comparing, so a subject copied together with its training background earns
nothing. Here none of those networks exist, so the same roles are played by

* :class:`EvalNet`, a small fully-convolutional network (~0.17 M parameters) trained on base-world renders only
  (never on the personal concepts) to classify the context and, per pixel, foreground / class / colour / size;
* a subject descriptor: the object is cut out with its mask (background replaced by the plain grey, as in
  masked CLIP-I), scaled to a canonical size, and described by mask-pooled :class:`EvalNet` features plus
  masked colour statistics (histogram, spatial colour layout, colour co-occurrence), which is what tells a
  checker pattern, a two-tone colouring or a painted mark apart from a flat-coloured object of the same class.

Weights ship at ``weights/evaluator.safetensors`` (loaded with safetensors only); :func:`train_evaluator`
rebuilds them in a few minutes on two CPU cores.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import tempfile
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

from . import world
from .world import CLASSES, COLOURS, CONTEXTS, SIZES

log = logging.getLogger(__name__)

__all__ = ["EvalNet", "Evaluator", "evaluate", "train_evaluator", "to_batch", "measure_recognition",
           "DEFAULT_WEIGHTS"]

DEFAULT_WEIGHTS = Path(__file__).resolve().parent / "weights" / "evaluator.safetensors"
FORMAT = "fewshot_personalize.demo_evaluator"
VERSION = "1"
RES = 64  # the evaluator's input resolution
_PLAIN = torch.tensor(world._PLAIN_RGB, dtype=torch.float32).view(1, 3, 1, 1)
# share of the subject similarity per descriptor (the parts are unit vectors, so similarity = dot product)
DESCRIPTOR_WEIGHTS: dict[str, float] = {"net": 0.3, "hist": 0.15, "layout": 0.3, "cooc": 0.25}
MIN_AREA = 6  # pixels (at the 32×32 head resolution) for a blob to count as an object


# ------------------------------------------------------------------------------------------------------ network
def _conv(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.GroupNorm(8, cout), nn.ReLU())


class EvalNet(nn.Module):
    """Small U-Net (~0.17 M parameters): context logits from the deepest features; per-pixel heads at 32×32
    (foreground 1, class 4, colour 9, size 3); the decoder feature maps serve as subject embeddings."""

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
        self.pixel_head = nn.Conv2d(c1, 1 + len(CLASSES) + len(COLOURS) + len(SIZES), 1)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """``x``: [B, 3, 64, 64] in [0, 1]."""
        f32 = self.enc32(self.stem((x - 0.5) / 0.25))
        f16 = self.enc16(f32)
        f8 = self.enc8(f16)
        u16 = self.dec16(self.reduce16(torch.cat([F.interpolate(f8, scale_factor=2.0, mode="nearest"), f16], 1)))
        u32 = self.dec32(self.reduce32(torch.cat([F.interpolate(u16, scale_factor=2.0, mode="nearest"), f32], 1)))
        px = self.pixel_head(u32)
        n1, n2 = 1 + len(CLASSES), 1 + len(CLASSES) + len(COLOURS)
        return {
            "context": self.context_head(f8.mean((2, 3))),
            "fg": px[:, 0],
            "cls": px[:, 1:n1],
            "colour": px[:, n1:n2],
            "size": px[:, n2:],
            "features": u32,
            "deep": u16,
        }


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
def _label(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """4-connected components of a small bool mask: (labels 1..n, 0 = background; n)."""
    h, w = mask.shape
    big = h * w + 1
    lab = np.where(mask, np.arange(1, h * w + 1).reshape(h, w), big)
    while True:
        m = lab.copy()
        m[1:] = np.minimum(m[1:], lab[:-1])
        m[:-1] = np.minimum(m[:-1], lab[1:])
        m[:, 1:] = np.minimum(m[:, 1:], lab[:, :-1])
        m[:, :-1] = np.minimum(m[:, :-1], lab[:, 1:])
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
    lab, n = _label(~mask)
    border = set(np.unique(np.concatenate([lab[0], lab[-1], lab[:, 0], lab[:, -1]]))) - {0}
    holes = (lab > 0) & ~np.isin(lab, list(border))
    return mask | holes


# ------------------------------------------------------------------------------------------------- descriptors
def _soft_rgb_bins(x: torch.Tensor) -> torch.Tensor:
    """[B, 3, H, W] → [B, 64, H, W]: soft (trilinear) assignment to a 4×4×4 RGB grid."""
    levels = torch.linspace(0, 1, 4).view(1, 1, 4, 1, 1)
    w = (1 - (x.unsqueeze(2) - levels).abs() * 3).clamp(min=0)  # [B, 3, 4, H, W]
    r, g, b = w[:, 0], w[:, 1], w[:, 2]
    return torch.einsum("bihw,bjhw,bkhw->bijkhw", r, g, b).flatten(1, 3)


def _unit(v: torch.Tensor) -> torch.Tensor:
    return v / v.norm(dim=1, keepdim=True).clamp(min=1e-8)


def _normalise_crop(x: torch.Tensor, m: torch.Tensor, inner: int = 48) -> tuple[torch.Tensor, torch.Tensor]:
    """Cut the masked object out (background := plain grey, as masked CLIP-I), centre it and scale its
    bounding box to ``inner`` pixels inside a 64×64 canvas. x [B, 3, 64, 64], m [B, 64, 64] bool."""
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
    mn = fg[:, 3] > 0.5
    xn = (fg[:, :3] + _PLAIN) * mn.unsqueeze(1) + _PLAIN * (~mn).unsqueeze(1)
    return xn.clamp(0, 1), mn


# --------------------------------------------------------------------------------------------------- evaluator
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
            raise FileNotFoundError(f"evaluator weights {p} not found; build them with "
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
    def foreground(self, images) -> torch.Tensor:
        """Predicted object masks [B, 64, 64] bool (holes filled)."""
        x = to_batch(images)
        fg = self._run(x)["fg"]
        m = F.interpolate(fg.unsqueeze(1), size=(RES, RES), mode="bilinear", align_corners=False)[:, 0] > 0
        return torch.from_numpy(np.stack([_fill_holes(a) for a in m.numpy()]))

    # ------------------------------------------------------------------ recognition
    @torch.no_grad()
    def recognise(self, images) -> list[dict]:
        """What each image shows: ``{"context", "context_confidence", "objects": [{"cls", "colour", "size",
        "area", "bbox", "mask"}...]}``; objects are blobs of one predicted class (largest first); ``mask`` is
        a 64×64 bool array, ``area`` a fraction of the image."""
        x = to_batch(images)
        out = self._run(x)
        ctx = out["context"].softmax(1)
        fg = (out["fg"] > 0).numpy()
        cls_p, col_p, size_p = out["cls"].softmax(1), out["colour"].softmax(1), out["size"].softmax(1)
        cls_arg = cls_p.argmax(1).numpy()
        results = []
        for i in range(x.shape[0]):
            objects = []
            for c in range(len(CLASSES)):
                lab, n = _label(fg[i] & (cls_arg[i] == c))
                for k in range(1, n + 1):
                    blob = lab == k
                    area = int(blob.sum())
                    if area < MIN_AREA:
                        continue
                    bt = torch.from_numpy(blob)
                    ys, xs = np.nonzero(blob)
                    big = F.interpolate(bt[None, None].float(), size=(RES, RES), mode="nearest")[0, 0] > 0
                    objects.append({
                        "cls": CLASSES[c],
                        "colour": COLOURS[int(col_p[i][:, bt].sum(1).argmax())],
                        "size": SIZES[int(size_p[i][:, bt].sum(1).argmax())],
                        "area": area / blob.size,
                        "bbox": (xs.min() / blob.shape[1], ys.min() / blob.shape[0], (xs.max() + 1) / blob.shape[1],
                                 (ys.max() + 1) / blob.shape[0]),
                        "mask": big.numpy(),
                    })
            objects.sort(key=lambda o: -o["area"])
            results.append({"context": CONTEXTS[int(ctx[i].argmax())], "context_confidence": float(ctx[i].max()),
                            "objects": objects})
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
    def embed(self, images, masks=None, cls: str | None = None) -> torch.Tensor:
        """Subject descriptors [B, D], unit length, so that similarity = dot product (the DINO / masked CLIP-I
        embedding's role). ``masks``: the object masks (e.g. the references'); by default the predicted
        foreground, restricted to blobs recognised as ``cls`` when that is given and found."""
        x = to_batch(images)
        if masks is not None:
            m = _to_masks(masks, x.shape[0])
        elif cls is not None:
            if cls not in CLASSES:
                raise ValueError(f"unknown class {cls!r}; expected one of {CLASSES}")
            fg = self.foreground(x)
            m = fg.clone()
            for i, rec in enumerate(self.recognise(x)):
                blobs = [o["mask"] for o in rec["objects"] if o["cls"] == cls]
                if blobs:
                    m[i] = fg[i] & torch.from_numpy(np.logical_or.reduce(blobs))
        else:
            m = self.foreground(x)
        xn, mn = _normalise_crop(x, m)
        out = self._run(xn)
        mf = mn.to(torch.float32).unsqueeze(1)
        area = mf.sum((2, 3)).clamp(min=1)
        m32 = F.interpolate(mf, size=out["features"].shape[-2:], mode="area")
        m16 = F.interpolate(mf, size=out["deep"].shape[-2:], mode="area")
        net = torch.cat([_unit((out["features"] * m32).sum((2, 3)) / m32.sum((2, 3)).clamp(min=1e-6)),
                         _unit((out["deep"] * m16).sum((2, 3)) / m16.sum((2, 3)).clamp(min=1e-6))], 1)
        bins = _soft_rgb_bins(xn) * mf  # [B, 64, H, W]
        hist = bins.sum((2, 3)) / area
        cells = F.adaptive_avg_pool2d(bins[:, :, 8:56, 8:56], 3).flatten(1) * 9 * 48 * 48 / area
        d = 3
        cooc = (torch.einsum("bihw,bjhw->bij", bins[:, :, :, :-d], bins[:, :, :, d:])
                + torch.einsum("bihw,bjhw->bij", bins[:, :, :-d, :], bins[:, :, d:, :]))
        cooc = (cooc + cooc.transpose(1, 2)).flatten(1)
        cooc = cooc / cooc.sum(1, keepdim=True).clamp(min=1e-8)
        parts = {"net": _unit(net), "hist": _unit(hist.clamp(min=0).sqrt()),
                 "layout": _unit(cells.clamp(min=0).sqrt()), "cooc": _unit(cooc.clamp(min=0).sqrt())}
        emb = torch.cat([math.sqrt(DESCRIPTOR_WEIGHTS[k]) * v for k, v in parts.items()], 1)
        empty = mn.flatten(1).sum(1) == 0
        emb[empty] = 0.0  # nothing found: similar to nothing
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

    def evaluate(self, images, prompt: str, references=None, ref_masks=None) -> dict:
        """All metrics for the images of one prompt: prompt fidelity from the prompt parsed with the world's
        vocabulary, subject fidelity against ``references`` (blobs of the subject's class), diversity."""
        expected = world.parse_prompt(prompt)
        x = to_batch(images)
        out: dict = {"prompt": prompt, "expected": {k: expected[k] for k in ("context", "objects")},
                     "prompt_fidelity": self.prompt_fidelity(x, expected), "n_images": int(x.shape[0])}
        idx = expected.get("subject_index")
        cls = expected["objects"][idx]["cls"] if idx is not None else None
        if references is not None:
            out["subject_fidelity"] = self.subject_fidelity(x, references, ref_masks, cls)
        if x.shape[0] >= 2:
            out["diversity"] = self.diversity(x)
        return out


@lru_cache(maxsize=1)
def _default_evaluator() -> Evaluator:
    return Evaluator.load()


def evaluate(images, prompt: str, references=None, ref_masks=None, evaluator: Evaluator | None = None) -> dict:
    """Convenience: :meth:`Evaluator.evaluate` with the shipped evaluator."""
    return (evaluator or _default_evaluator()).evaluate(images, prompt, references, ref_masks)


# ------------------------------------------------------------------------------------------------------ training
def _render_dataset(rng: np.random.Generator, n: int) -> dict[str, np.ndarray]:
    """n base-world renders with per-pixel labels at 32×32 (255 = background / ignore)."""
    imgs = np.zeros((n, RES, RES, 3), np.uint8)
    ctx = np.zeros(n, np.int64)
    fg = np.zeros((n, 32, 32), np.uint8)
    cls = np.full((n, 32, 32), 255, np.uint8)
    col = np.full((n, 32, 32), 255, np.uint8)
    size = np.full((n, 32, 32), 255, np.uint8)
    for i in range(n):
        u = rng.uniform()
        scene = world.sample_scene(rng, n_objects=0 if u < 0.04 else (2 if u < 0.40 else 1))
        img, _, masks = world.render(scene, RES)
        imgs[i] = np.asarray(img)
        ctx[i] = CONTEXTS.index(scene.context)
        for obj, m in zip(scene.objects, masks):
            m32 = m.reshape(32, 2, 32, 2).mean((1, 3)) >= 0.5
            fg[i][m32] = 1
            cls[i][m32] = CLASSES.index(obj.cls)
            col[i][m32] = COLOURS.index(obj.colour)
            size[i][m32] = SIZES.index(obj.size)
    return {"images": imgs, "context": ctx, "fg": fg, "cls": cls, "colour": col, "size": size}


def _augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Blur (down-up sampling, as from a small latent decoder), noise and brightness jitter, so generated
    images are judged like renders."""
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


def _batch_tensors(data: dict[str, np.ndarray], idx: np.ndarray, flip: np.ndarray) -> dict[str, torch.Tensor]:
    out = {k: torch.from_numpy(v[idx]) for k, v in data.items()}
    x = out.pop("images").permute(0, 3, 1, 2).to(torch.float32) / 255.0
    f = torch.from_numpy(flip)
    x[f] = x[f].flip(-1)
    for k in ("fg", "cls", "colour", "size"):
        t = out[k].long()
        t[f] = t[f].flip(-1)
        out[k] = t
    out["images"] = x
    return out


def _loss(out: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> torch.Tensor:
    loss = F.cross_entropy(out["context"], b["context"])
    loss = loss + F.binary_cross_entropy_with_logits(out["fg"], b["fg"].float())
    for k in ("cls", "colour", "size"):
        loss = loss + F.cross_entropy(out[k], b[k], ignore_index=255)
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


def train_evaluator(out_path: str | os.PathLike = DEFAULT_WEIGHTS, seed: int = 0, minutes: float = 8.0,
                    steps: int = 1800, n_images: int = 10000, batch: int = 64, lr: float = 3e-3,
                    threads: int = 2) -> dict:
    """Train :class:`EvalNet` on fresh base-world renders (never on personal concepts) and save it as
    safetensors with seed, steps, time and validation accuracy in the metadata. Stops after ``steps`` or
    when ``minutes`` (data rendering included) are used up, whichever comes first."""
    if minutes <= 0 or steps <= 0 or n_images < batch:
        raise ValueError(f"need minutes > 0, steps > 0 and n_images >= batch, got {minutes}, {steps}, {n_images}")
    torch.set_num_threads(threads)
    t0 = time.time()
    torch.manual_seed(seed)
    rng = np.random.default_rng([seed, 1])
    data = _render_dataset(rng, n_images)
    t_data = time.time() - t0
    log.info("rendered %d training images in %.0f s", n_images, t_data)
    net = EvalNet()
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    g = torch.Generator().manual_seed(seed)
    deadline = t0 + minutes * 60
    step = 0
    net.train()
    losses: list[float] = []
    for step in range(1, steps + 1):
        for grp in opt.param_groups:  # warm-up then cosine decay
            grp["lr"] = lr * min(1.0, step / 50) * 0.5 * (1 + math.cos(math.pi * step / steps))
        idx = rng.integers(0, n_images, batch)
        b = _batch_tensors(data, idx, rng.uniform(size=batch) < 0.5)
        out = net(_augment(b["images"], g))
        loss = _loss(out, b)
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
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out_path.parent, suffix=".tmp")
    os.close(fd)
    try:
        save_file(state, tmp, metadata=meta)
        os.replace(tmp, out_path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    ev.metadata = meta
    return {"path": str(out_path), "steps": step, "seconds": train_s, "accuracy": acc}


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m fewshot_personalize.kernels.demo.evaluator --out weights.safetensors``"""
    ap = argparse.ArgumentParser(description="Train the demo world's evaluator network.")
    ap.add_argument("--out", default=str(DEFAULT_WEIGHTS))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--minutes", type=float, default=8.0)
    ap.add_argument("--steps", type=int, default=1800)
    ap.add_argument("--images", type=int, default=10000)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    res = train_evaluator(args.out, args.seed, args.minutes, args.steps, args.images)
    log.info("%s", json.dumps(res))


if __name__ == "__main__":
    main()
