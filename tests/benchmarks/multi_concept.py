"""Mix-of-Show's multi-concept benchmark (Gu et al., NeurIPS 2023, §4) on the demo world (issue 15 §4). Recorded,
not asserted; the table is multi_concept.md beside this file, every number multi_concept.json, samples
multi_concept.png.

Training: every concept is learned alone as an ED-LoRA with the quality bench's recipe (kernels/demo/experiment.py:
layer-wise tokens + rank-4 LoRA on UNet and text encoder, prior preservation with 16 class images, 400 steps), each
with its own token (checker_toy <c1>, twotone_ball <c2>, marked_box <c3>, creature_toy <c4>), per seed (the seed
also picks the concept's 5 reference photos). The files are cached in --work, keyed by concept, seed, recipe and a
hash of the model folder, so reruns skip training.

Sets: 2 concepts (checker_toy + twotone_ball) and 4 concepts (all four, fused into one model). Prompts put two
concepts in one image, "a <ca> and a <cb>{context}", for every pair of the set (the 4-set has 6 pairs, among them
the two toys) and the contexts plain, on the beach, on the grass; --samples images per prompt, the same noise seeds
in every row; every fused model also draws each of its concepts alone ("a <ck>{context}", the alone row's seeds).
Rows:
- alone: each concept's own ED-LoRA, "a <ck>{context}" (the reference level of per-concept fidelity);
- sum / average: weight fusion, W0 + Σ ΔW_i and W0 + mean ΔW_i (every concept's tokens installed);
- gradient: Mix-of-Show's gradient fusion (kernels/backends/diffusers/fusion.py; each concept recorded on its
  instance prompt "a <ck>", 2 samples × 20 steps);
- gradient + regions: the same fused model with regional sampling (§3.4): left half "a <ca>{context}", right half
  "a <cb>{context}", the two-concept prompt as the global one;
- gradient + layout: the same boxes and prompts, no regional cross-attention; for the first 40 % of the schedule
  each half of the latent is denoised as a picture of its own with its prompt (region layout,
  kernels/multi_concept/region_layout.py), then the whole latent with the global prompt;
- gradient + layout + regions: both.

Metrics (demo evaluator, kernels/demo/evaluator.py). Per image the evaluator recognises the objects; each concept
of the prompt is paired with one object: the pairing that gives the most concepts an object of their own class,
then the most concepts an object at all, then the highest sum of each object's similarity to its concept's
references (so two concepts of the same class, the two toys, are paired with their objects by best similarity);
a concept left without an object of its class falls back on another recognised object, as the quality bench's
subject fidelity does. The similarity of an object to a concept is the evaluator's masked subject similarity of the
object's region to the concept's reference photos (their masks), averaged over the photos.
- fidelity: similarity of each concept's object to its own references (0 when no object is left for it);
- drop vs alone: per concept, fidelity alone minus fidelity in the row, averaged over the set's concepts; measured
  twice: on images of one concept each ("a <ck>[ context]" with the fused model, the alone row's seeds: what
  Mix-of-Show's Table 2a measures, goal for gradient fusion ≤ 0.025) and on the two-concept images (which also
  holds what the base model loses drawing two objects in one 64 px image);
- identity mixing: similarity of a concept's object to the OTHER concept's references, minus the same similarity
  of that concept's object in its alone images (same seed, all contexts): how much more it looks like the other
  concept than it does without it (0: no mixing; goal: regions at most half of gradient fusion's);
- more like the other: share of paired objects more similar to the other concept's references than to their own;
- both present: share of images in which both concepts have an object of their class (two toys for the two toys);
- two objects: share of images in which the evaluator finds two or more objects of any class and look (the picture
  holds two things, whether or not they are the concepts).
Means over seeds ± std over seeds. Fusion times are fuse_concepts' wall time; training times the engine's.

    .venv/bin/python tests/benchmarks/multi_concept.py [--seeds 3] [--concepts 2|4|both] [--steps N] [--samples 4]
        [--out-dir tests/benchmarks] [--model DIR] [--work DIR] [--threads 1] [--ridge X]
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import itertools
import json
import os
import platform
import subprocess
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
SETS = {2: ("checker_toy", "twotone_ball"), 4: ("checker_toy", "twotone_ball", "marked_box", "creature_toy")}
CONTEXTS = ("", " on the beach", " on the grass")
FUSIONS = ("sum", "average", "gradient")
#: Rows sampled with the gradient-fused model and regions: (regional cross-attention, region layout share).
REGIONAL_ROWS = {"gradient + regions": (True, 0.0), "gradient + layout": (False, 0.4),
                 "gradient + layout + regions": (True, 0.4)}
ROWS = ("alone", "sum", "average", "gradient", *REGIONAL_ROWS)
RECIPE_NAME = "ED-LoRA (layer-wise tokens + LoRA, prior, UNet + text encoder)"
FIDELITY_GOAL, MIXING_GOAL = 0.025, 0.5
CACHE_FORMAT = "1"


def token(concept: str) -> str:
    """The concept's token in every set: <c1>…<c4> in SETS[4]'s order."""
    return f"<c{SETS[4].index(concept) + 1}>"


def pair_prompt(concepts, context: str) -> str:
    """"a <c1> and a <c2> on the beach" (one concept: "a <c1> on the beach")."""
    return " and ".join(f"a {token(c)}" for c in concepts) + context


# --------------------------------------------------------------------------------------------------- training
def edlora_recipe(steps: int | None = None):
    """The quality bench's ED-LoRA row, with a token per concept instead of the bench's single <sks>."""
    from fewshot_personalize.kernels.demo.experiment import METHODS, Recipe
    from fewshot_personalize.kernels.methods import EdLora

    @dataclasses.dataclass
    class TokenRecipe(Recipe):
        token: str = "<c1>"

        def phrase(self, concept) -> str:
            return self.token

        def build(self, concept):
            return EdLora(dataclasses.replace(super().build(concept).settings, token=self.token))

    row = next(r for r in METHODS if r.name == RECIPE_NAME)
    fields = dataclasses.asdict(row) | ({"steps": steps} if steps else {})
    return lambda concept: TokenRecipe(**fields, token=token(concept))


def model_hash(folder: Path) -> str:
    """sha256 of the model folder's files (the pretraining log excepted), 12 hex digits."""
    h = hashlib.sha256()
    for f in sorted(p for p in folder.rglob("*") if p.is_file() and p.name != "pretrain_log.json"):
        h.update(str(f.relative_to(folder)).encode())
        h.update(f.read_bytes())
    return h.hexdigest()[:12]


def train_concept(pipe, concept: str, seed: int, recipe, work: Path, model_key: str) -> dict:
    """The concept's ED-LoRA file in ``work`` (trained with experiment.personalize unless already there):
    ``{"path", "train_seconds", "cached"}``."""
    from fewshot_personalize.kernels.demo.experiment import personalize
    from fewshot_personalize.kernels.formats.safetensors_io import atomic_save, load_safetensors

    key = hashlib.sha256(json.dumps({"concept": concept, "seed": seed, "recipe": dataclasses.asdict(recipe),
                                     "model": model_key, "format": CACHE_FORMAT}, sort_keys=True).encode())
    path = work / f"{concept}_seed{seed}_{key.hexdigest()[:12]}.safetensors"
    if path.is_file():
        return {"path": str(path), "train_seconds": float(load_safetensors(path)[1]["bench.train_seconds"]),
                "cached": True}
    done = personalize(pipe, concept, recipe, seed)
    done.remove()
    art = done.artifacts["ed-lora"]
    work.mkdir(parents=True, exist_ok=True)
    atomic_save(art.tensors, path, art.metadata | {"bench.train_seconds": f"{done.result.seconds:.2f}"})
    return {"path": str(path), "train_seconds": done.result.seconds, "cached": False}


# ---------------------------------------------------------------------------------------------------- metrics
def reference_embedding(ev, concept: str, seed: int) -> torch.Tensor:
    """The evaluator's descriptors of the concept's reference photos of this seed (masked) [5, D]."""
    from fewshot_personalize.kernels.demo.concepts import reference_images

    refs = reference_images(concept, seed=seed)
    return ev.embed([im for im, _ in refs], np.stack([m for _, m in refs]))


def object_similarities(ev, image, objects: list[dict], refs: dict[str, torch.Tensor]) -> np.ndarray:
    """[objects, concepts]: each recognised object's masked similarity to each concept's references (mean over
    the photos, as Evaluator.subject_fidelity)."""
    if not objects:
        return np.zeros((0, len(refs)))
    e = ev.embed([image] * len(objects), [o["mask"] for o in objects])
    return np.array([[float((e[i] @ r.T).clamp(0, 1).mean()) for r in refs.values()] for i in range(len(objects))])


def assign_objects(objects: list[dict], classes: list[str], own: np.ndarray, max_objects: int = 4) -> list[int | None]:
    """Which object (index, or None) stands for each concept: the pairing with the most concepts on an object of
    their class, then the most concepts on any object, then the highest summed own similarity
    (``own[o, k]``: object o to concept k's references). Objects are distinct; the ``max_objects`` largest count."""
    n = min(len(objects), max_objects)
    best, best_key = [None] * len(classes), None
    for choice in itertools.product([None, *range(n)], repeat=len(classes)):
        used = [o for o in choice if o is not None]
        if len(used) != len(set(used)):
            continue
        key = (sum(objects[o]["cls"] == c for o, c in zip(choice, classes) if o is not None), len(used),
               sum(own[o, k] for k, o in enumerate(choice) if o is not None))
        if best_key is None or key > best_key:
            best, best_key = list(choice), key
    return best


def score_image(ev, image, recognised: dict, concepts: list[str], refs: dict[str, torch.Tensor]) -> dict:
    """One image of a prompt naming ``concepts``: the object paired with each, its similarity to every concept in
    ``refs`` (``sims[k]``, None when no object was left for concept k), whether it is of the concept's class
    (``found``), whether every concept found one (``all_present``), and how many objects were recognised."""
    from fewshot_personalize.kernels.demo.concepts import get_concept

    objects = recognised["objects"]
    sims = object_similarities(ev, image, objects, refs)
    names = list(refs)
    classes = [get_concept(c).cls for c in concepts]
    own = sims[:, [names.index(c) for c in concepts]] if len(objects) else sims
    chosen = assign_objects(objects, classes, own)
    found = [o is not None and objects[o]["cls"] == c for o, c in zip(chosen, classes)]
    return {"objects": chosen, "found": found, "all_present": all(found), "n_objects": len(objects),
            "sims": [None if o is None else dict(zip(names, sims[o].tolist())) for o in chosen],
            "bboxes": [None if o is None else objects[o]["bbox"] for o in chosen]}


def fidelity(scored: dict, k: int, concept: str) -> float:
    """Concept k's object's similarity to its own references (0 without an object)."""
    return 0.0 if scored["sims"][k] is None else scored["sims"][k][concept]


def alone_baseline(scored: list[dict], concept: str) -> dict[str, float]:
    """Mean similarity of the concept's object in its alone images to every concept's references (identity
    mixing's zero: how much the concept resembles the others without them in the image)."""
    rows = [s["sims"][0] for s in scored if s["sims"][0] is not None]
    return {c: float(np.mean([r[c] for r in rows])) for c in rows[0]} if rows else {}


def pair_metrics(scored: list[dict], pair: tuple[str, str], baseline: dict[str, dict[str, float]]) -> dict:
    """Means over the images of one two-concept prompt: fidelity per concept, identity mixing (similarity to the
    other concept's references above the alone baseline), the share of objects more like the other concept,
    the both-present rate, and the share of images with two (or more) objects of any class."""
    mixing, confused = [], []
    for s in scored:
        for k, (c, other) in enumerate((pair, pair[::-1])):
            if s["sims"][k] is not None:
                mixing.append(s["sims"][k][other] - baseline.get(c, {}).get(other, 0.0))
                confused.append(s["sims"][k][other] > s["sims"][k][c])
    return {"fidelity": {c: float(np.mean([fidelity(s, k, c) for s in scored])) for k, c in enumerate(pair)},
            "mixing": float(np.mean(mixing)) if mixing else None,
            "more_like_other": float(np.mean(confused)) if confused else None,
            "both_present": float(np.mean([s["all_present"] for s in scored])),
            "two_objects": float(np.mean([s["n_objects"] >= 2 for s in scored]))}


# --------------------------------------------------------------------------------------------------- sampling
def sample(pipe, prompt: str, n: int, seed: int, adapters, regions=None, layout: float = 0.0,
           attention: bool = True):
    """``n`` images with the demo settings (experiment.sample's), optionally with (Region, prompt) pairs, a region
    layout share and regional cross-attention on or off."""
    from fewshot_personalize.kernels.backends.diffusers.generate import generate_images
    from fewshot_personalize.kernels.demo.experiment import GUIDANCE, SAMPLE_STEPS
    from fewshot_personalize.kernels.demo.model import RESOLUTION

    return generate_images(pipe, prompt, n=n, steps=SAMPLE_STEPS, seed=seed, guidance=GUIDANCE,
                           resolution=RESOLUTION, batch=8, adapters=adapters, regions=regions,
                           region_layout=layout if regions else 0.0, region_attention=attention)


def halves(pair, context: str):
    """Left/right half boxes with each concept's own prompt (regional sampling, §3.4)."""
    from fewshot_personalize.kernels.demo.model import RESOLUTION
    from fewshot_personalize.kernels.multi_concept.regions import Region

    r, half = RESOLUTION, RESOLUTION // 2
    prompts = [pair_prompt([c], context) for c in pair]
    return [(Region.from_box(box, i, label=p), p) for i, (box, p) in enumerate(zip(((0, 0, half, r), (half, 0, r, r)),
                                                                                 prompts))]


def sample_seed(pipe, ev, seed: int, sets: list[int], files: dict[str, dict], samples: int, log,
                ridge: float | None = None) -> dict:
    """Every row of every set for one seed: per-prompt metrics, fusion times, and the first image of each prompt
    (with the evaluator's pairing) for the grid."""
    from fewshot_personalize.kernels.backends.diffusers.adapters import PipelineAdapters
    from fewshot_personalize.kernels.backends.diffusers.fusion import fuse_concepts, load_concept
    from fewshot_personalize.kernels.demo.experiment import GUIDANCE, SAMPLE_STEPS
    from fewshot_personalize.kernels.demo.model import RESOLUTION

    names = list(files)
    refs = {c: reference_embedding(ev, c, seed) for c in names}
    records, shown, fuse_s = [], {}, {}

    def scored_images(prompt, concepts, sample_seed_, adapters, regions=None, layout=0.0, attention=True):
        imgs = sample(pipe, prompt, samples, sample_seed_, adapters, regions, layout, attention)
        return imgs, [score_image(ev, im, rec, list(concepts), refs) for im, rec in zip(imgs, ev.recognise(imgs))]

    baseline = {}
    for ci, c in enumerate(names):  # alone
        adapters = PipelineAdapters(pipe)
        adapters.load(files[c]["path"])
        scored_all = []
        for xi, ctx in enumerate(CONTEXTS):
            imgs, scored = scored_images(pair_prompt([c], ctx), [c], seed * 100_000 + 50_000 + ci * 1000 + xi * 100,
                                         adapters)
            scored_all += scored
            shown[("alone", (c,), ctx)] = (imgs[0], scored[0])
            records.append({"seed": seed, "row": "alone", "concepts": [c], "context": ctx.strip() or "plain",
                            "fidelity": {c: float(np.mean([fidelity(s, 0, c) for s in scored]))},
                            "present": float(np.mean([s["all_present"] for s in scored]))})
        adapters.remove()
        baseline[c] = alone_baseline(scored_all, c)
    log(f"seed {seed}: alone rows done")
    for n in sets:
        pairs = list(itertools.combinations(SETS[n], 2))
        for fusion in FUSIONS:
            concepts = [load_concept(pipe, files[c]["path"], f"a {token(c)}") for c in SETS[n]]
            t = time.perf_counter()
            fused = fuse_concepts(pipe, concepts, fusion, sample_steps=SAMPLE_STEPS, samples=2, guidance=GUIDANCE,
                                  resolution=RESOLUTION, seed=seed, **({} if ridge is None else {"ridge": ridge}))
            fuse_s[f"{n}:{fusion}"] = time.perf_counter() - t
            try:
                for c in SETS[n]:  # one concept per image, the alone row's seeds: Mix-of-Show's Table 2a measure
                    ci = names.index(c)
                    for xi, ctx in enumerate(CONTEXTS):
                        imgs, scored = scored_images(pair_prompt([c], ctx), [c],
                                                     seed * 100_000 + 50_000 + ci * 1000 + xi * 100, fused.adapters)
                        records.append({"seed": seed, "set": n, "row": fusion, "kind": "single", "concepts": [c],
                                        "context": ctx.strip() or "plain",
                                        "fidelity": {c: float(np.mean([fidelity(s, 0, c) for s in scored]))},
                                        "present": float(np.mean([s["all_present"] for s in scored]))})
                for row in (fusion, *REGIONAL_ROWS) if fusion == "gradient" else (fusion,):
                    for pi, pair in enumerate(pairs):
                        for xi, ctx in enumerate(CONTEXTS):
                            regions = halves(pair, ctx) if row in REGIONAL_ROWS else None
                            attention, layout = REGIONAL_ROWS.get(row, (True, 0.0))
                            imgs, scored = scored_images(pair_prompt(pair, ctx), pair,
                                                         seed * 100_000 + pi * 1000 + xi * 100, fused.adapters, regions,
                                                         layout, attention)
                            shown[(f"{n}:{row}", pair, ctx)] = (imgs[0], scored[0])
                            records.append({"seed": seed, "set": n, "row": row, "kind": "pair", "concepts": list(pair),
                                            "context": ctx.strip() or "plain", **pair_metrics(scored, pair, baseline)})
            finally:
                fused.remove()
            log(f"seed {seed}: {n} concepts, {fusion} fusion done ({fuse_s[f'{n}:{fusion}']:.1f} s to fuse)")
    return {"records": records, "fuse_seconds": fuse_s, "baseline": baseline, "shown": shown}


# ---------------------------------------------------------------------------------------------------- summary
def _mean_std(values) -> list[float] | None:
    values = [v for v in values if v is not None]
    return [float(np.mean(values)), float(np.std(values))] if values else None


def summarise(records: list[dict], sets: list[int], seeds: int) -> dict:
    """Per set and row: fidelity, drop vs alone, identity mixing, more like the other, both present; each the
    mean ± std over seeds of the per-seed value (concepts weighted equally)."""
    out = {}
    for n in sets:
        per_seed: dict[str, dict[str, list]] = {}
        for s in range(seeds):
            alone = {c: np.mean([r["fidelity"][c] for r in records if r["seed"] == s and r["row"] == "alone"
                                 and r["concepts"] == [c]]) for c in SETS[n]}
            present = np.mean([r["present"] for r in records if r["seed"] == s and r["row"] == "alone"
                               and r["concepts"][0] in SETS[n]])
            rows = {"alone": {"fidelity": float(np.mean(list(alone.values()))), "drop": 0.0, "mixing": None,
                              "more_like_other": None, "both_present": None, "two_objects": None,
                              "present": float(present),
                              "single_fidelity": float(np.mean(list(alone.values()))), "single_drop": 0.0}}
            for row in ROWS[1:]:
                rs = [r for r in records if r["seed"] == s and r.get("set") == n and r["row"] == row
                      and r.get("kind", "pair") == "pair"]
                if not rs:
                    continue
                ones = [r for r in records if r["seed"] == s and r.get("set") == n and r["row"] == row
                        and r.get("kind") == "single"]
                fid = {c: np.mean([r["fidelity"][c] for r in rs if c in r["fidelity"]]) for c in SETS[n]}
                one = {c: np.mean([r["fidelity"][c] for r in ones if c in r["fidelity"]]) for c in SETS[n]} \
                    if ones else None
                rows[row] = {"fidelity": float(np.mean(list(fid.values()))),
                             "drop": float(np.mean([alone[c] - fid[c] for c in SETS[n]])),
                             "mixing": _mean([r["mixing"] for r in rs]),
                             "more_like_other": _mean([r["more_like_other"] for r in rs]),
                             "both_present": float(np.mean([r["both_present"] for r in rs])),
                             "two_objects": _mean([r.get("two_objects") for r in rs]),
                             "single_fidelity": float(np.mean(list(one.values()))) if one else None,
                             "single_drop": float(np.mean([alone[c] - one[c] for c in SETS[n]])) if one else None}
            for row, m in rows.items():
                for k, v in m.items():
                    per_seed.setdefault(row, {}).setdefault(k, []).append(v)
        out[str(n)] = {row: {k: _mean_std(v) for k, v in m.items()} for row, m in per_seed.items()}
    return out


def _mean(values) -> float | None:
    values = [v for v in values if v is not None]
    return float(np.mean(values)) if values else None


def per_pair(records: list[dict], n: int) -> dict:
    """4-set detail: identity mixing and both-present per pair, gradient fusion without and with regions."""
    out = {}
    for pair in itertools.combinations(SETS[n], 2):
        for row in ("gradient", *REGIONAL_ROWS):
            rs = [r for r in records if r.get("set") == n and r["row"] == row and tuple(r["concepts"]) == pair]
            out.setdefault(" + ".join(pair), {})[row] = {"mixing": _mean([r["mixing"] for r in rs]),
                                                         "both_present": _mean([r["both_present"] for r in rs]),
                                                         "two_objects": _mean([r.get("two_objects") for r in rs])}
    return out


def goals(summary: dict) -> dict:
    """The issue's goals per set: fidelity drop after gradient fusion ≤ 0.025, measured as Mix-of-Show's Table 2a
    measures it (each concept alone in its images, fused model vs the concept's own ED-LoRA; the drop on
    two-concept images is recorded beside it: it also holds what the base model loses drawing two objects at once);
    identity mixing with regions at most half of gradient fusion's."""
    out = {}
    for n, rows in summary.items():
        g, r = rows.get("gradient"), rows.get("gradient + regions")
        if not g or not r:
            continue
        mix_g, mix_r = (g["mixing"] or [None])[0], (r["mixing"] or [None])[0]
        single = (g.get("single_drop") or [None])[0]
        halved = None if mix_g is None or mix_r is None or mix_g <= 0 else mix_r <= MIXING_GOAL * mix_g
        out[n] = {"fidelity_drop": single, "fidelity_drop_met": None if single is None else single <= FIDELITY_GOAL,
                  "fidelity_drop_two_concept_images": g["drop"][0], "mixing_gradient": mix_g,
                  "mixing_regions": mix_r, "mixing_halved": halved}
    return out


def _cell(v, digits: int = 3, percent: bool = False) -> str:
    if v is None:
        return "—"
    if percent:
        return f"{100 * v[0]:.0f} ± {100 * v[1]:.0f} %"
    return f"{v[0]:.{digits}f} ± {v[1]:.{digits}f}"


def markdown(record: dict) -> str:
    st = record["settings"]
    lines = [f"Demo-world multi-concept benchmark (Mix-of-Show §4; issue 15 §4): ED-LoRA per concept "
             f"({st['train_steps']} steps), {st['seeds']} seed(s), {len(CONTEXTS)} contexts × {st['samples']} images "
             f"per two-concept prompt, every pair of the set; gradient fusion's ridge {st.get('ridge', 1e-4):g}. "
             f"Model {st['model']} ({st['model_hash']}); "
             f"{record['machine']}, torch {record['versions']['torch']}, {record['date']}, "
             f"{record['seconds'] / 60:.0f} min in all. Mean ± std over seeds.", "",
             "| concepts | row | one concept per image: fidelity ↑ | its drop vs alone ↓ | two concepts per image: "
             "fidelity ↑ | its drop vs alone ↓ | identity mixing ↓ | more like the other ↓ | both present ↑ | "
             "two objects ↑ |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for n, rows in record["summary"].items():
        for row, m in rows.items():
            alone = row == "alone"
            both = f"({_cell(m['present'], percent=True)} found)" if alone else _cell(m["both_present"], percent=True)
            lines.append(f"| {n} | {row} | {_cell(m.get('single_fidelity'))} | "
                         f"{'—' if alone else _cell(m.get('single_drop'))} | {'—' if alone else _cell(m['fidelity'])} | "
                         f"{'—' if alone else _cell(m['drop'])} | {_cell(m['mixing'])} | "
                         f"{_cell(m['more_like_other'], percent=True)} | {both} | "
                         f"{_cell(m.get('two_objects'), percent=True)} |")
    lines += ["", "Goals (recorded, not asserted):"]
    for n, g in record["goals"].items():
        mix = ("no mixing to halve (gradient fusion's is ≤ 0)" if g["mixing_halved"] is None else
               f"{g['mixing_gradient']:.3f} → {g['mixing_regions']:.3f} with regions "
               f"({'met' if g['mixing_halved'] else 'not met'}: at most half)")
        drop = ("not measured" if g["fidelity_drop"] is None else
                f"{g['fidelity_drop']:+.3f} ({'met' if g['fidelity_drop_met'] else 'not met'}: ≤ {FIDELITY_GOAL})")
        lines.append(f"- {n} concepts: fidelity drop after gradient fusion, one concept per image (Mix-of-Show's "
                     f"Table 2a measure) {drop}; on two-concept images {g['fidelity_drop_two_concept_images']:+.3f}; "
                     f"identity mixing {mix}")
    if record.get("per_pair"):
        shown = [r for r in ("gradient", *REGIONAL_ROWS) if r in next(iter(record["per_pair"].values()))]
        lines += ["", f"4 concepts, per pair ({' → '.join(shown)}; the two toys are paired with their objects by "
                      "best similarity):", "",
                  "| pair | identity mixing | both present | two objects |", "|---|---:|---:|---:|"]
        f = lambda v, p=False: "—" if v is None else (f"{100 * v:.0f} %" if p else f"{v:.3f}")  # noqa: E731
        for pair, m in record["per_pair"].items():
            lines.append(f"| {pair} | {' → '.join(f(m[r]['mixing']) for r in shown)} | "
                         f"{' → '.join(f(m[r]['both_present'], True) for r in shown)} | "
                         f"{' → '.join(f(m[r].get('two_objects'), True) for r in shown)} |")
    fs = record["fuse_seconds"]
    lines += ["", "Fusion wall time (fuse_concepts, s; mean ± std over seeds):", "",
              "| concepts | " + " | ".join(FUSIONS) + " |", "|---|" + "---:|" * len(FUSIONS)]
    for n in record["settings"]["sets"]:
        lines.append(f"| {n} | " + " | ".join(_cell(fs.get(f"{n}:{f}"), 2) for f in FUSIONS) + " |")
    tr = record["training"]
    fresh = [t["train_seconds"] for t in tr if not t["cached"]]
    lines += ["", f"Training: {_cell(_mean_std([t['train_seconds'] for t in tr]), 0)} s per concept (engine time, "
                  f"{len(tr)} ED-LoRAs, {len(tr) - len(fresh)} of them from the --work cache, timed when trained).",
              "", "Definitions: fidelity = masked subject similarity of the object paired with a concept to that "
                  "concept's references (0 if none is left for it), on images of one concept (\"a <ck>[ context]\", "
                  "the alone row's seeds, with the fused model) or of two; identity mixing = its similarity to the other "
                  "concept's references minus the same for the concept's alone images; more like the other = share "
                  "of paired objects more similar to the other concept than to their own; both present = both "
                  "concepts' classes recognised (two toys for the two toys); two objects = two or more objects "
                  "recognised, of any class and look (the image holds two things, right or not). Objects are "
                  "paired with concepts by class, then by best similarity (see multi_concept.py).", ""]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------------- grid
BOX_COLOURS = ((0, 220, 230), (235, 0, 235))  # first / second concept of the prompt


def tile(image, scored: dict, cell: int = 96, colours=BOX_COLOURS):
    """The image scaled to ``cell`` with the evaluator's pairing drawn: first concept cyan, second magenta."""
    from PIL import Image, ImageDraw

    im = image.convert("RGB").resize((cell, cell), Image.NEAREST)
    d = ImageDraw.Draw(im)
    for bbox, colour in zip(scored["bboxes"], colours):
        if bbox is not None:
            x0, y0, x1, y1 = (v * cell for v in bbox)
            d.rectangle([x0, y0, x1 - 1, y1 - 1], outline=colour)
    return im


def grid(shown: dict, sets: list[int], seed: int):
    """References, then per set: rows alone (first / second concept), sum, average, gradient, gradient + regions;
    columns (pair, context): all contexts for the 2-set, every pair on the beach for the 4-set."""
    from PIL import Image, ImageDraw

    from fewshot_personalize.kernels.core.plots import _font, image_grid
    from fewshot_personalize.kernels.demo.concepts import reference_images

    names = list(dict.fromkeys(c for n in sets for c in SETS[n]))
    blocks = [("references (seed %d)" % seed,
               image_grid([[reference_images(c, seed=seed)[0][0] for c in names]],
                          col_labels=[f"{token(c)} {c}" for c in names], cell=96))]
    for n in sets:
        cols = ([(SETS[2], ctx) for ctx in CONTEXTS] if n == 2 else
                [(p, CONTEXTS[1]) for p in itertools.combinations(SETS[n], 2)])
        rows, labels = [], []
        for k, label in ((0, "first concept alone"), (1, "second concept alone")):
            rows.append([tile(*shown[("alone", (p[k],), ctx)], colours=BOX_COLOURS[k:]) for p, ctx in cols])
            labels.append(label)
        for row in ROWS[1:]:
            rows.append([tile(*shown[(f"{n}:{row}", p, ctx)]) for p, ctx in cols])
            labels.append(f"{row} fusion" if row in FUSIONS else row)
        blocks.append((f"{n} concepts: prompt \"a <ca> and a <cb>[ context]\"\nboxes: the objects the evaluator "
                       "paired with the\nfirst (cyan) and second (magenta) concept",
                       image_grid(rows, row_labels=labels,
                                  col_labels=[f"{token(p[0])} + {token(p[1])}, {ctx.strip() or 'plain'}"
                                              for p, ctx in cols], cell=96, label_width=120)))
    width = max(b.width for _, b in blocks)
    heads = [16 * (title.count("\n") + 1) + 6 for title, _ in blocks]
    out = Image.new("RGB", (width, sum(b.height + h for (_, b), h in zip(blocks, heads))), "white")
    d, y = ImageDraw.Draw(out), 0
    for (title, b), h in zip(blocks, heads):
        d.multiline_text((4, y + 4), title, fill="black", font=_font(12))
        out.paste(b, (0, y + h))
        y += b.height + h
    return out


# ------------------------------------------------------------------------------------------------------- main
def versions() -> dict:
    import diffusers
    import transformers

    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=HERE, capture_output=True, text=True,
                                check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = None
    return {"python": platform.python_version(), "torch": torch.__version__, "diffusers": diffusers.__version__,
            "transformers": transformers.__version__, "numpy": np.__version__, "commit": commit}


def main() -> None:
    from fewshot_personalize.kernels.core.cache import cache_root

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--concepts", default="both", choices=["2", "4", "both"], help="which concept set(s)")
    ap.add_argument("--steps", type=int, help="ED-LoRA training steps (default: the recipe's 400)")
    ap.add_argument("--samples", type=int, default=4, help="images per prompt and row")
    ap.add_argument("--out-dir", type=Path, default=HERE)
    ap.add_argument("--model", type=Path, help="demo model folder (default: the shipped demo model)")
    ap.add_argument("--work", type=Path, default=cache_root() / "bench_multi", help="cache of trained ED-LoRAs")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--ridge", type=float, help="gradient fusion's relative ridge (default: fuse_concepts' default)")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    if a.model:
        os.environ["FEWSHOT_DEMO_MODEL"] = str(a.model.resolve())

    from fewshot_personalize.kernels.demo.evaluator import Evaluator
    from fewshot_personalize.kernels.demo.experiment import demo_pipeline
    from fewshot_personalize.kernels.demo.model import demo_model_path
    from fewshot_personalize.kernels.multi_concept.fusion import DEFAULT_RIDGE

    start = time.perf_counter()
    log = lambda msg: print(f"[{time.perf_counter() - start:6.0f} s] {msg}", flush=True)  # noqa: E731
    sets = [2, 4] if a.concepts == "both" else [int(a.concepts)]
    names = list(dict.fromkeys(c for n in sets for c in SETS[n]))
    model_dir = demo_model_path()
    model_key = model_hash(model_dir)
    recipe = edlora_recipe(a.steps)
    pipe, ev = demo_pipeline(), Evaluator.load()
    training, records, fuse_s, baselines, shown = [], [], {}, {}, None
    for seed in range(a.seeds):
        files = {}
        for c in names:
            files[c] = train_concept(pipe, c, seed, recipe(c), a.work, model_key)
            training.append({"concept": c, "seed": seed, **files[c]})
            log(f"seed {seed}: {c} {'from the cache' if files[c]['cached'] else 'trained'} "
                f"({files[c]['train_seconds']:.0f} s)")
        out = sample_seed(pipe, ev, seed, sets, files, a.samples, log, a.ridge)
        records += out["records"]
        baselines[seed] = out["baseline"]
        for k, v in out["fuse_seconds"].items():
            fuse_s.setdefault(k, []).append(v)
        shown = shown or out["shown"]
    summary = summarise(records, sets, a.seeds)
    record = {"date": time.strftime("%Y-%m-%d"), "machine": f"{platform.machine()}, {a.threads} thread(s)",
              "versions": versions(), "seconds": time.perf_counter() - start,
              "settings": {"seeds": a.seeds, "sets": sets, "concepts": {c: token(c) for c in names},
                           "contexts": [c.strip() or "plain" for c in CONTEXTS], "samples": a.samples,
                           "recipe": dataclasses.asdict(recipe(names[0])) | {"token": "<ck>"},
                           "train_steps": recipe(names[0]).steps, "model": str(model_dir), "model_hash": model_key,
                           "ridge": a.ridge if a.ridge is not None else DEFAULT_RIDGE,
                           "fusion_recording": "instance prompt 'a <ck>', 2 samples x 20 DPM steps, guidance 4",
                           "regions": "left half (0,0,32,64): 'a <ca>[ context]'; right half (32,0,64,64): "
                                      "'a <cb>[ context]'; global: the two-concept prompt",
                           "regional_rows": {k: {"attention": v[0], "layout": v[1]} for k, v in REGIONAL_ROWS.items()}},
              "summary": summary, "goals": goals(summary),
              "per_pair": per_pair(records, 4) if 4 in sets else None,
              "fuse_seconds": {k: _mean_std(v) for k, v in fuse_s.items()},
              "fuse_seconds_per_seed": fuse_s, "training": training,
              "alone_baseline_similarity": baselines, "records": records}
    a.out_dir.mkdir(parents=True, exist_ok=True)
    (a.out_dir / "multi_concept.json").write_text(json.dumps(record, indent=1))
    (a.out_dir / "multi_concept.md").write_text(markdown(record))
    grid(shown, sets, 0).save(a.out_dir / "multi_concept.png")
    print(markdown(record))
    log(f"wrote {a.out_dir / 'multi_concept.json'}, .md, .png")


if __name__ == "__main__":
    main()
