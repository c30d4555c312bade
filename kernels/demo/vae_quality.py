"""How much of a concept survives the demo model's VAE: the ceiling of every method on this model (issue 13).

Two measurements: :func:`concept_ceiling` scores the ideal renders of every held-out prompt of a concept after an
encode → decode round trip with the demo evaluator, as a fraction of the same renders' own score, separately for
one-object and two-object prompts; :func:`colour_round_trip` draws flat objects in colours the world never uses
(:data:`OFF_PALETTE`) and measures how far the colour of their inside moves in the round trip.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from ..core.images import pil_to_tensor, tensor_to_pil
from . import world
from .concepts import CONCEPTS, get_concept, prompt_specs, reference_images, render_prompt

#: Colours far from every world colour (each ≥ 60 RGB units from the nearest palette entry).
OFF_PALETTE: dict[str, tuple[int, int, int]] = {
    "lime": (150, 230, 40),
    "magenta": (220, 40, 220),
    "teal": (20, 140, 140),
    "brown": (120, 72, 30),
    "navy": (20, 30, 110),
    "olive": (120, 120, 20),
    "maroon": (110, 20, 40),
    "sky": (120, 200, 250),
    "cyan": (30, 220, 220),
    "grey": (128, 128, 128),
    "salmon": (250, 150, 120),
    "mint": (170, 250, 200),
}


@torch.no_grad()
def round_trip(vae, images: list[Image.Image], batch: int = 64) -> list[Image.Image]:
    """Encode (latent mean) and decode: the best any denoiser on this latent space could draw these images."""
    out = []
    for i in range(0, len(images), batch):
        x = pil_to_tensor(images[i:i + batch]).to(vae.device, vae.dtype)
        out += tensor_to_pil(vae.decode(vae.encode(x).latent_dist.mean).sample.float().cpu())
    return out


def _erode(mask: np.ndarray, r: int = 1) -> np.ndarray:
    out = mask.copy()
    for dy in range(-r, r + 1):
        for dx in range(-r, r + 1):
            out &= np.roll(np.roll(mask, dy, 0), dx, 1)
    return out


def off_palette_scenes(n: int, seed: int = 0, size: int = 64) -> tuple[list[Image.Image], list[np.ndarray], list[str]]:
    """``n`` one-object world scenes whose object is recoloured to an :data:`OFF_PALETTE` colour (cycled): the
    object is drawn white (base colour 246) and its pixels scaled by colour/246, so the world's shading stays.
    Returns the images, the object's inside (mask eroded by one pixel) and the colour names."""
    rng = np.random.default_rng([seed, 13])
    names = list(OFF_PALETTE)
    images, insides, colours = [], [], []
    white = np.asarray(world.PALETTE["white"], np.float32)
    for i in range(n):
        name = names[i % len(names)]
        scene = world.sample_scene(rng, n_objects=1, colours=["white"], allow_low_contrast=True)
        img, mask, _ = world.render(scene, size)
        a = np.asarray(img, np.float32)
        a[mask] = a[mask] * (np.asarray(OFF_PALETTE[name], np.float32) / white)
        images.append(Image.fromarray(np.clip(a + 0.5, 0, 255).astype(np.uint8)))
        insides.append(_erode(mask))
        colours.append(name)
    return images, insides, colours


def colour_round_trip(vae, n: int = 96, seed: int = 0) -> dict:
    """Mean absolute error per channel (fraction of 255) of the mean colour inside off-palette objects after a
    VAE round trip; overall, per colour, and the worst colour."""
    images, insides, names = off_palette_scenes(n, seed)
    back = round_trip(vae, images)
    per: dict[str, list[float]] = {}
    for a, b, m, name in zip(images, back, insides, names):
        if m.sum() < 4:
            continue
        ca = np.asarray(a, np.float32)[m].mean(0)
        cb = np.asarray(b, np.float32)[m].mean(0)
        per.setdefault(name, []).append(float(np.abs(ca - cb).mean() / 255))
    by_colour = {k: float(np.mean(v)) for k, v in per.items()}
    worst = max(by_colour, key=by_colour.get)
    return {"mean_error_per_channel": float(np.mean([e for v in per.values() for e in v])),
            "per_colour": by_colour, "worst": [worst, by_colour[worst]], "objects": sum(map(len, per.values()))}


def concept_ceiling(evaluator, vae, concept: str, seeds: int = 1, images_per_prompt: int = 2) -> dict:
    """Subject fidelity of a concept's ideal renders (every held-out prompt) and of the same renders after a VAE
    round trip, for one-object and two-object prompts; ``ratio`` = through the VAE / ideal (issue 13: ≥ 0.9).
    ``pattern``: the same for pattern fidelity (is the layout of the concept's colours still there)."""
    c = get_concept(concept)
    groups = ("one_object", "two_object")
    got = {k: {m: {"ideal": [], "vae": []} for m in ("subject", "pattern")} for k in groups}
    for seed in range(seeds):
        refs = reference_images(c, seed=seed)
        ref_imgs, ref_masks = [im for im, _ in refs], np.stack([m for _, m in refs])
        for k, spec in enumerate(prompt_specs(c)):
            renders = [render_prompt(c, spec, seed=seed * 1000 + k * 10 + j)[0] for j in range(images_per_prompt)]
            group = got["two_object" if spec.others else "one_object"]
            for view, imgs in (("ideal", renders), ("vae", round_trip(vae, renders))):
                got_view = evaluator.fidelities(imgs, ref_imgs, ref_masks, c.cls)
                group["subject"][view].append(got_view["subject_fidelity"])
                group["pattern"][view].append(got_view["pattern_fidelity"])

    def kept(v: dict) -> dict:
        ideal, through = float(np.mean(v["ideal"])), float(np.mean(v["vae"]))
        return {"ideal": ideal, "through_vae": through, "ratio": through / max(ideal, 1e-8)}

    return {k: kept(got[k]["subject"]) | {"pattern": kept(got[k]["pattern"])} for k in groups}


def vae_report(evaluator, vae, concepts=None, seeds: int = 1) -> dict:
    """:func:`concept_ceiling` for every bundled concept and :func:`colour_round_trip`, in one record."""
    concepts = list(concepts or CONCEPTS)
    ceilings = {c: concept_ceiling(evaluator, vae, c, seeds) for c in concepts}
    return {"concepts": ceilings,
            "min_ratio": min(v[k]["ratio"] for v in ceilings.values() for k in v),
            "min_pattern_ratio": min(v[k]["pattern"]["ratio"] for v in ceilings.values() for k in v),
            "colour": colour_round_trip(vae)}


def round_trip_grid(vae, concepts=None, n: int = 6, cell: int = 128):
    """A picture to look at: for each concept, ``n`` ideal renders of its held-out prompts and the same after a
    round trip through ``vae``, row under row."""
    from ..core.plots import image_grid

    rows, labels = [], []
    for c in concepts or CONCEPTS:
        renders = [render_prompt(c, spec, seed=k)[0] for k, spec in enumerate(prompt_specs(c)[:n])]
        rows += [renders, round_trip(vae, renders)]
        labels += [f"{c}: ideal", f"{c}: through the VAE"]
    return image_grid(rows, labels, None, cell=cell)


def main(argv=None) -> None:
    """``python -m fewshot_personalize.kernels.demo.vae_quality VAE_FOLDER``: print :func:`vae_report` as JSON."""
    import argparse
    import json

    from diffusers import AutoencoderKL

    from .evaluator import Evaluator

    ap = argparse.ArgumentParser(description="What a VAE keeps of the demo concepts and of off-palette colours.")
    ap.add_argument("vae", help="a diffusers AutoencoderKL folder (e.g. kernels/demo/weights/model/vae)")
    ap.add_argument("--seeds", type=int, default=1)
    ap.add_argument("--grid", help="also write this PNG: each concept's renders and their round trip")
    a = ap.parse_args(argv)
    vae = AutoencoderKL.from_pretrained(a.vae, use_safetensors=True).eval()
    print(json.dumps(vae_report(Evaluator.load(), vae, seeds=a.seeds), indent=1))
    if a.grid:
        round_trip_grid(vae).save(a.grid)


if __name__ == "__main__":
    main()
