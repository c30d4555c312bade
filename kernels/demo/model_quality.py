"""How good is the demo base model? Recognition of what its captions ask for, on held-out caption combinations.

Issue 3's bar for the base model: on caption combinations never shown in pretraining (:data:`model.HOLDOUT`,
e.g. "a … kite in the snow", "a purple ball"), the evaluator recognises the requested class, colour and context
in at least 80 % of the samples. The same numbers on seen combinations and on ideal renders of the same
captions (the evaluator's own ceiling) are measured beside them, so a gap can be told apart from an evaluator
weakness. Single-object captions, one sample per caption, 80 held-out and 80 seen by default. Issue 13 adds two-object
captions ("a red ball and a blue kite on the grass"): the share of samples in which both objects are drawn with
the right class and colour (bar: 70 %).
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
    """The world's own rendering of each caption, one or two objects (what a perfect model would draw)."""
    rng = np.random.default_rng([seed, 9])
    out = []
    for caption in captions:
        p = world.parse_prompt(caption)
        for _ in range(200):
            objs = []
            for o in p["objects"]:
                lo, hi = world.SIZE_SCALE[o["size"] or "medium"]
                objs.append(world.Obj(o["cls"], o["colour"] or "red", o["size"] or "medium",
                                      scale=float(rng.uniform(lo, hi)), variant=int(rng.integers(2**31))))
            boxes: list = []
            if all(world.place_object(obj, p["context"], rng, boxes) is not None for obj in objs):
                break
        else:
            raise ValueError(f"could not place the objects of {caption!r}")
        out.append(world.render(world.Scene(objs, p["context"], int(rng.integers(2**31))))[0])
    return out


def measure_model_quality(evaluator, generate: Callable[[str, int], object], per_combination: int = 16,
                          n_seen: int = 80, n_two: int = 80, seed: int = 0) -> dict:
    """``generate(caption, seed) -> PIL image``. Returns recognition on held-out and seen captions, and on
    ideal renders of the held-out captions; both objects right on ``n_two`` two-object captions (and on their
    ideal renders). The defaults (80 captions each) put one standard error of a
    rate near 80 % at about 4.5 points; 40 captions gave 6.3, too coarse to judge an 80 % bar."""
    held = holdout_captions(per_combination, seed)
    seen = seen_captions(n_seen, seed)
    two = two_object_scenes(n_two, seed)
    two_captions = [s.caption() for s in two]
    held_imgs = [generate(c, seed * 10_000 + i) for i, c in enumerate(held)]
    seen_imgs = [generate(c, seed * 10_000 + 5_000 + i) for i, c in enumerate(seen)]
    two_imgs = [generate(c, seed * 10_000 + 7_000 + i) for i, c in enumerate(two_captions)]
    return {"held_out": recognition(evaluator, held_imgs, held), "seen": recognition(evaluator, seen_imgs, seen),
            "ideal_renders_held_out": recognition(evaluator, ideal_renders(held, seed), held),
            "two_objects": both_objects_right(evaluator, two_imgs, two_captions),
            "two_objects_ideal_renders": both_objects_right(evaluator, [world.render(s)[0] for s in two], two_captions),
            "captions": {"held_out": len(held), "seen": len(seen), "two_objects": len(two)},
            "holdout": [dict(h) for h in HOLDOUT]}


def two_object_scenes(n: int, seed: int) -> list:
    """``n`` two-object scenes of combinations the model was pretrained on (their captions are the prompts, their
    renders the ideal answers)."""
    rng = np.random.default_rng([seed, 10])
    return [world.sample_scene(rng, n_objects=2, holdout=HOLDOUT) for _ in range(n)]


def both_objects_right(evaluator, images, captions: list[str]) -> dict:
    """Share of images in which every object of the caption is recognised with its class and colour, each by a
    different blob (``both``), and the share of the caption's objects found so (``objects``). ``failures``: the
    share of images that miss, by the first kind of miss: an object not drawn at all (``missing``: fewer blobs than
    asked), drawn in another colour (``wrong_colour``: its class is among the unmatched blobs), as another class
    (``wrong_class``: its colour is), or neither (``other``). The two "wrong" kinds are attribute binding failures
    (Chefer et al., Attend-and-Excite, SIGGRAPH 2023, §1: one object's class or colour taken by the other).
    ``hits``: per caption, whether both were right (for a paired comparison of two models on the same captions and
    seeds, :func:`paired_difference`)."""
    both, found_objects = [], []
    failures = dict.fromkeys(("missing", "wrong_colour", "wrong_class", "other"), 0)
    for rec, caption in zip(evaluator.recognise(images), captions):
        free = [(o["cls"], o["colour"]) for o in rec["objects"]]
        wanted = world.parse_prompt(caption)["objects"]
        missed = []
        for want in wanted:
            key = (want["cls"], want["colour"])
            if key in free:
                free.remove(key)
            else:
                missed.append(key)
        asked = len(wanted)
        both.append(not missed)
        found_objects.append(1 - len(missed) / asked)
        if missed:
            if len(rec["objects"]) < asked:
                kind = "missing"
            elif {cls for cls, _ in missed} & {cls for cls, _ in free}:
                kind = "wrong_colour"
            elif {colour for _, colour in missed} & {colour for _, colour in free}:
                kind = "wrong_class"
            else:
                kind = "other"
            failures[kind] += 1
    n = max(1, len(captions))
    return {"both": float(np.mean(both)), "objects": float(np.mean(found_objects)), "captions": len(captions),
            "failures": {k: v / n for k, v in failures.items()}, "hits": [bool(b) for b in both]}


def paired_difference(hits_a: list[bool], hits_b: list[bool]) -> dict:
    """B's rate minus A's on the same captions and seeds, with its standard error from the discordant pairs
    (McNemar's view: only captions one model gets right and the other not carry information) and the exact
    two-sided sign-test p-value over those pairs."""
    from math import comb

    if len(hits_a) != len(hits_b) or not hits_a:
        raise ValueError(f"paired hits need the same captions: got {len(hits_a)} and {len(hits_b)}")
    a, b = np.asarray(hits_a, bool), np.asarray(hits_b, bool)
    only_b, only_a, n = int((b & ~a).sum()), int((a & ~b).sum()), len(a)
    diff = (only_b - only_a) / n
    se = float(np.sqrt(max(only_a + only_b - (only_b - only_a) ** 2 / n, 0.0)) / n)
    k, m = min(only_a, only_b), only_a + only_b
    p = min(1.0, 2 * sum(comb(m, i) for i in range(k + 1)) / 2 ** m) if m else 1.0
    return {"difference": diff, "standard_error": se, "only_a": only_a, "only_b": only_b, "sign_test_p": p,
            "captions": n}


def breakdown(evaluator, images, captions: list[str], by: str) -> dict[str, dict[str, float]]:
    """:func:`recognition` per value of the caption's ``by`` (``cls``, ``colour`` or ``context``): which classes,
    colours or contexts the model fails on."""
    groups: dict[str, list[int]] = {}
    for i, caption in enumerate(captions):
        p = world.parse_prompt(caption)
        value = p["context"] if by == "context" else p["objects"][0][by]
        groups.setdefault(str(value), []).append(i)
    return {v: {**recognition(evaluator, [images[i] for i in idx], [captions[i] for i in idx]), "n": len(idx)}
            for v, idx in sorted(groups.items())}


def main(argv=None) -> None:
    """``python -m fewshot_personalize.kernels.demo.model_quality [--model DIR] [--json FILE] [--grid PNG]``: the
    measurement of :func:`measure_model_quality` at the demo's sampler, with a per-class and per-context breakdown of
    the seen captions and a grid of the first samples to look at."""
    import argparse
    import json
    from pathlib import Path

    import torch

    from ..backends.diffusers import load_pipeline
    from ..backends.diffusers.generate import use_sampler
    from .evaluator import Evaluator
    from .experiment import sample
    from .model import demo_model_path

    ap = argparse.ArgumentParser(description=main.__doc__)
    ap.add_argument("--model", help="a demo-architecture model folder (default: the shipped demo model)")
    ap.add_argument("--json", help="write the numbers here")
    ap.add_argument("--grid", help="write a PNG grid of the first 16 samples of each caption set here")
    ap.add_argument("--captions", type=int, default=80, help="captions per set (default 80; held-out: a fifth per "
                                                                 "held-out combination)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--paired-with", help="a JSON this command wrote for another model with the same --captions: "
                                          "adds the two-object difference paired caption by caption")
    a = ap.parse_args(argv)
    earlier = None
    if a.paired_with:
        try:
            earlier = json.loads(Path(a.paired_with).read_text())["two_objects"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            ap.exit(2, f"error: --paired-with {a.paired_with}: not a JSON this command wrote ({e})\n")
        if "hits" not in earlier or len(earlier["hits"]) != a.captions:
            ap.exit(2, f"error: {a.paired_with} holds no per-caption hits for {a.captions} two-object captions\n")
    per_combination = max(1, a.captions // len(HOLDOUT))
    torch.set_num_threads(a.threads)
    pipe = load_pipeline(a.model or str(demo_model_path()))
    use_sampler(pipe, "dpm")
    ev = Evaluator.load()
    kept: dict[str, list] = {}

    def generate(caption: str, seed: int):
        img = sample(pipe, caption, 1, seed)[0]
        kept.setdefault(caption, []).append(img)
        return img

    result = measure_model_quality(ev, generate, per_combination=per_combination, n_seen=a.captions, n_two=a.captions)
    seen = seen_captions(a.captions, 0)
    seen_imgs = [kept[c][0] for c in seen]
    result["seen_by_class"] = breakdown(ev, seen_imgs, seen, "cls")
    result["seen_by_context"] = breakdown(ev, seen_imgs, seen, "context")
    if earlier is not None:
        result["two_objects_paired"] = {"with": a.paired_with} | paired_difference(earlier["hits"],
                                                                                 result["two_objects"]["hits"])
    shown = ("held_out", "seen", "two_objects", "two_objects_ideal_renders", "two_objects_paired")
    print(json.dumps({k: {i: v for i, v in result[k].items() if i != "hits"} for k in shown if k in result}, indent=1))
    for by in ("seen_by_class", "seen_by_context"):
        print(by, {v: f"{r['all']:.2f} (cls {r['cls']:.2f}, colour {r['colour']:.2f}, context {r['context']:.2f}, n {r['n']})"
                   for v, r in result[by].items()})
    if a.json:
        from ..core.atomic_write import atomic_write_text

        atomic_write_text(Path(a.json), json.dumps(result, indent=1))
    if a.grid:
        from PIL import Image

        held = holdout_captions(per_combination, 0)
        rows = [held[::max(1, len(held) // 16)][:16], seen[:16],
                [s.caption() for s in two_object_scenes(a.captions, 0)][:16]]
        size = 64
        grid = Image.new("RGB", (16 * size, len(rows) * size), "white")
        for r, captions in enumerate(rows):
            for c, caption in enumerate(captions):
                grid.paste(kept[caption][0].resize((size, size)), (c * size, r * size))
        grid.save(a.grid)


if __name__ == "__main__":
    main()
