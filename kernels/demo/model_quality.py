"""How good is the demo base model? Recognition of what its captions ask for, on held-out caption combinations.

Issue 3's bar for the base model: on caption combinations never shown in pretraining (:data:`model.HOLDOUT`,
e.g. "a … kite in the snow", "a purple ball"), the evaluator recognises the requested class, colour and context
in at least 80 % of the samples. The same numbers on seen combinations and on ideal renders of the same
captions (the evaluator's own ceiling) are measured beside them, so a gap can be told apart from an evaluator
weakness. Single-object captions, one sample per caption, 80 held-out and 80 seen by default.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from . import world
from .model import HOLDOUT

ATTRIBUTES = ("cls", "colour", "context")


def holdout_captions(per_combination: int, seed: int) -> list[str]:
    """``per_combination`` single-object captions for each held-out combination (the rest drawn at random)."""
    rng = np.random.default_rng([seed, 7])
    out = []
    for spec in HOLDOUT:
        kw = {"classes": [spec["cls"]] if "cls" in spec else None,
              "colours": [spec["colour"]] if "colour" in spec else None,
              "contexts": [spec["context"]] if "context" in spec else None}
        out += [world.sample_scene(rng, n_objects=1, **kw).caption() for _ in range(per_combination)]
    return out


def seen_captions(n: int, seed: int) -> list[str]:
    """``n`` single-object captions of combinations the model was pretrained on."""
    rng = np.random.default_rng([seed, 8])
    return [world.sample_scene(rng, n_objects=1, holdout=HOLDOUT).caption() for _ in range(n)]


def recognition(evaluator, images, captions: list[str]) -> dict[str, float]:
    """Fraction of images in which the evaluator recognises the caption's class, colour and context, each and
    all three together (the object judged is the recognised blob that matches the caption best)."""
    hits = {k: [] for k in (*ATTRIBUTES, "all")}
    for rec, caption in zip(evaluator.recognise(images), captions):
        expected = world.parse_prompt(caption)
        want = expected["objects"][0]
        best = max(rec["objects"], key=lambda o: (o["cls"] == want["cls"]) + (o["colour"] == want["colour"]),
                   default=None)
        got = {"cls": best is not None and best["cls"] == want["cls"],
               "colour": best is not None and best["colour"] == want["colour"],
               "context": rec["context"] == expected["context"]}
        for k in ATTRIBUTES:
            hits[k].append(got[k])
        hits["all"].append(all(got.values()))
    return {k: float(np.mean(v)) for k, v in hits.items()}


def ideal_renders(captions: list[str], seed: int):
    """The world's own rendering of each caption (what a perfect model would draw)."""
    rng = np.random.default_rng([seed, 9])
    out = []
    for caption in captions:
        p = world.parse_prompt(caption)
        o = p["objects"][0]
        scene = world.sample_scene(rng, n_objects=1, classes=[o["cls"]], colours=[o["colour"]],
                                   contexts=[p["context"]], sizes=[o["size"] or "medium"], allow_low_contrast=True)
        out.append(world.render(scene)[0])
    return out


def measure_model_quality(evaluator, generate: Callable[[str, int], object], per_combination: int = 16,
                          n_seen: int = 80, seed: int = 0) -> dict:
    """``generate(caption, seed) -> PIL image``. Returns recognition on held-out and seen captions, and on
    ideal renders of the held-out captions. The defaults (80 captions each) put one standard error of a
    rate near 80 % at about 4.5 points; 40 captions gave 6.3, too coarse to judge an 80 % bar."""
    held = holdout_captions(per_combination, seed)
    seen = seen_captions(n_seen, seed)
    held_imgs = [generate(c, seed * 10_000 + i) for i, c in enumerate(held)]
    seen_imgs = [generate(c, seed * 10_000 + 5_000 + i) for i, c in enumerate(seen)]
    return {"held_out": recognition(evaluator, held_imgs, held), "seen": recognition(evaluator, seen_imgs, seen),
            "ideal_renders_held_out": recognition(evaluator, ideal_renders(held, seed), held),
            "captions": {"held_out": len(held), "seen": len(seen)}, "holdout": [dict(h) for h in HOLDOUT]}
