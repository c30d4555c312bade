"""The quality benchmark on the demo world: methods × concepts × held-out prompts × seeds, mean ± std.

Writes ``quality.md`` (the table README shows), ``quality.json`` (every number) and ``quality.png`` (a chart).
Targets (issue 3, recorded not asserted): with prior preservation, subject fidelity ≥ 80 % of the references'
own score, prompt fidelity ≥ 85 % of the base model's, class-prior drift at least halved vs no prior.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import platform
import time
from pathlib import Path

import numpy as np
import torch

from .concepts import CONCEPTS
from .evaluator import Evaluator
from .experiment import DEFAULT_METHOD, METHODS, demo_pipeline, personalize, reference_score, sample, score
from .model_quality import ATTRIBUTES, measure_model_quality

log = logging.getLogger(__name__)
METRICS = ("subject_fidelity", "pattern_fidelity", "prompt_fidelity", "class_prior_drift", "diversity", "train_seconds")
CEILING = ("subject_fidelity", "pattern_fidelity", "prompt_fidelity")


def run_bench(out: Path, seeds: int = 3, concepts: list[str] | None = None, methods=METHODS,
              rows: list[str] | None = None) -> dict:
    """Run the benchmark and write quality.{md,json,png} into ``out``.

    ``rows``: run only the rows of these names and keep every other row (and the base-model measurement and the
    reference ceilings) from the record already in ``out``, which must be of the same seeds and concepts; each
    row records the date it was run (``row_dates``)."""
    from tqdm import tqdm

    torch.set_num_threads(2)
    concepts = concepts or list(CONCEPTS)
    ev = Evaluator.load()
    pipe = demo_pipeline()
    start = time.perf_counter()
    today = time.strftime("%Y-%m-%d")
    earlier = _earlier_record(out, seeds, concepts) if rows else None
    if rows:
        unknown = sorted(set(rows) - {m.name for m in methods})
        if unknown:
            raise ValueError(f"unknown benchmark rows {unknown}; rows are {[m.name for m in methods]}")
    if earlier is not None:
        base_quality, refs, vae_refs = earlier["base_model_quality"], earlier["references"], earlier["references_through_vae"]
        runs = [r for r in earlier["runs"] if r["method"] not in rows]
        row_dates = {name: d for name, d in earlier.get("row_dates", {}).items() if name not in rows}
        row_dates.update({r["method"]: earlier["date"] for r in runs if r["method"] not in row_dates})
    else:
        base_quality = measure_model_quality(ev, lambda caption, seed: sample(pipe, caption, 1, seed)[0])
        log.info("base model recognition on held-out captions: %s", base_quality["held_out"])
        refs = [reference_score(ev, c, s, pipe) | {"concept": c, "seed": s} for c in concepts for s in range(seeds)]
        vae_refs = [r.pop("through_vae") | {"concept": r["concept"], "seed": r["seed"]} for r in refs]
        runs, row_dates = [], {}
    todo = [m for m in methods if not rows or m.name in rows]
    jobs = [(m, c, s) for m in todo for c in concepts for s in range(seeds)]
    for m, c, s in tqdm(jobs, desc="bench", unit="run"):
        done = personalize(pipe, c, m, s)
        metrics = score(ev, pipe, c, s, personalized=done)
        if done is not None:
            done.remove()
        runs.append({"method": m.name, "concept": c, "seed": s, "train_seconds": done.result.seconds if done else 0.0,
                     **{k: metrics[k] for k in METRICS if k in metrics}, "per_prompt": metrics["per_prompt"]})
        row_dates[m.name] = today
    order = {m.name: i for i, m in enumerate(methods)}
    runs.sort(key=lambda r: order.get(r["method"], len(order)))
    summary = summarise(runs, refs, vae_refs)
    record = {"seeds": seeds, "concepts": concepts, "methods": [dataclasses.asdict(m) for m in methods],
              "summary": summary, "base_model_quality": base_quality,
              "references": refs, "references_through_vae": vae_refs, "runs": runs, "row_dates": row_dates,
              "seconds": time.perf_counter() - start + (earlier["seconds"] if earlier else 0.0),
              "torch": torch.__version__,
              "machine": f"{platform.machine()}, {torch.get_num_threads()} threads", "date": today}
    out.mkdir(parents=True, exist_ok=True)
    (out / "quality.json").write_text(json.dumps(record, indent=1))
    (out / "quality.md").write_text(markdown(record))
    chart(summary).save(out / "quality.png")
    print(markdown(record))
    return record


def _earlier_record(out: Path, seeds: int, concepts: list[str]) -> dict:
    path = out / "quality.json"
    if not path.is_file():
        raise ValueError(f"--rows needs an earlier record to keep the other rows from, and {path} does not exist")
    record = json.loads(path.read_text())
    if record["seeds"] != seeds or record["concepts"] != concepts:
        raise ValueError(f"{path} was run with {record['seeds']} seeds on {record['concepts']}; run the same to merge")
    return record


REFERENCES, THROUGH_VAE = "references (ceiling)", "references through the model's VAE (ceiling of this model)"


def _mean_std(rows: list[dict], keys) -> dict[str, tuple[float, float]]:
    """Mean and std of each key that every row has (records older than a metric lack it)."""
    return {k: (float(np.mean([r[k] for r in rows])), float(np.std([r[k] for r in rows]))) for k in keys
            if all(k in r for r in rows)}


def summarise(runs: list[dict], refs: list[dict], vae_refs: list[dict] | None = None) -> dict:
    out = {name: _mean_std([r for r in runs if r["method"] == name], METRICS)
           for name in dict.fromkeys(r["method"] for r in runs)}
    for name, rows in ((REFERENCES, refs), (THROUGH_VAE, vae_refs or [])):
        if rows:
            out[name] = _mean_std(rows, CEILING)
    return out


def markdown(record: dict) -> str:
    s = record["summary"]
    lines = [f"Demo-world quality benchmark: {len(record['concepts'])} concepts × 13 held-out prompts × 2 images × "
             f"{record['seeds']} seed(s) per row; mean ± std over concept×seed runs. {record['machine']}, torch "
             f"{record['torch']}, {record['date']}, {record['seconds'] / 60:.0f} min in all.",
             "",
             "| method | subject fidelity ↑ | pattern fidelity ↑ | prompt fidelity ↑ | class-prior drift ↓ | "
             "diversity ↑ | train s |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for name, m in s.items():
        cells = [f"{m[k][0]:.3f} ± {m[k][1]:.3f}" if k in m else "—" for k in METRICS[:5]]
        cells.append(f"{m['train_seconds'][0]:.0f}" if "train_seconds" in m else "—")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", "Targets (DreamBooth-LoRA with prior preservation, UNet + text encoder):"]
    prior = s.get("DreamBooth-LoRA, prior, UNet + text encoder")
    noprior = s.get("DreamBooth-LoRA, no prior, UNet + text encoder")
    base, ref, vae_ref = s.get("base model (no personalization)"), s[REFERENCES], s.get(THROUGH_VAE)
    if prior and base and noprior:
        sf = prior["subject_fidelity"][0] / ref["subject_fidelity"][0]
        pf = prior["prompt_fidelity"][0] / base["prompt_fidelity"][0]
        drift_base = base["class_prior_drift"][0]
        excess_prior = prior["class_prior_drift"][0] - drift_base
        excess_noprior = noprior["class_prior_drift"][0] - drift_base
        of_vae = (f"; {100 * prior['subject_fidelity'][0] / vae_ref['subject_fidelity'][0]:.0f} % of what the "
                  f"references keep through the model's VAE" if vae_ref else "")
        lines += [f"- subject fidelity = {100 * sf:.0f} % of the references' own score (target ≥ 80 %){of_vae}",
                  f"- prompt fidelity = {100 * pf:.0f} % of the base model's (target ≥ 85 %)",
                  f"- class-prior drift above the base model: {excess_prior:+.3f} with prior vs {excess_noprior:+.3f} "
                  f"without (target: at most half)"]
    default = s.get(DEFAULT_METHOD.name)
    if default and base and default is not prior:
        of_vae = (f"; {100 * default['subject_fidelity'][0] / vae_ref['subject_fidelity'][0]:.0f} % of what the "
                  f"references keep through the model's VAE" if vae_ref else "")
        lines += [f"- the default recipe ({DEFAULT_METHOD.name}): subject fidelity = "
                  f"{100 * default['subject_fidelity'][0] / ref['subject_fidelity'][0]:.0f} % of the references' own "
                  f"score{of_vae}; prompt fidelity = "
                  f"{100 * default['prompt_fidelity'][0] / base['prompt_fidelity'][0]:.0f} % of the base model's"]
    ti, cv = s.get("Textual Inversion"), s.get("CatVersion")
    if ti and cv:
        lines += ["", "CatVersion vs Textual Inversion (the paper's claim: at least TI's subject fidelity at equal or "
                      "better prompt fidelity):",
                  f"- subject fidelity {cv['subject_fidelity'][0]:.3f} vs {ti['subject_fidelity'][0]:.3f}; prompt "
                  f"fidelity {cv['prompt_fidelity'][0]:.3f} vs {ti['prompt_fidelity'][0]:.3f}; class-prior drift "
                  f"{cv['class_prior_drift'][0]:.3f} vs {ti['class_prior_drift'][0]:.3f} (CatVersion acts on every "
                  "prompt, so the bare class prompt shows the concept)"]
    dates = record.get("row_dates", {})
    if len(set(dates.values())) > 1:
        lines += ["", "Rows run on: " + "; ".join(f"{name} {d}" for name, d in dates.items()) + "."]
    q = record.get("base_model_quality")
    if q:
        names = {"cls": "class", "colour": "colour", "context": "context", "all": "all three"}
        lines += ["", f"Base model: the evaluator recognises what a single-object caption asks for "
                      f"({q['captions']['held_out']} held-out-combination captions, {q['captions']['seen']} seen ones, "
                      "one sample each; target ≥ 80 % on held-out combinations):", "",
                  "| captions | " + " | ".join(names[k] for k in (*ATTRIBUTES, "all")) + " |",
                  "|---|" + "---:|" * (len(ATTRIBUTES) + 1)]
        for key, label in (("held_out", "held-out combinations (base model)"), ("seen", "seen combinations (base model)"),
                           ("ideal_renders_held_out", "held-out combinations, ideal renders (evaluator ceiling)")):
            lines.append(f"| {label} | " + " | ".join(f"{100 * q[key][k]:.0f} %" for k in (*ATTRIBUTES, "all")) + " |")
    return "\n".join(lines) + "\n"


def chart(summary: dict):
    """Grouped bars per metric (PIL only)."""
    from PIL import Image, ImageDraw

    from ..core.plots import _font

    metrics = METRICS[:5]
    names = list(summary)
    w, left, bottom = 900, 40, 30 + 14 * len(names)  # room below the axis for one legend line per row
    h = 260 + bottom
    im = Image.new("RGB", (w, h), "white")
    d = ImageDraw.Draw(im)
    font = _font(11)
    colours = [(120, 120, 120), (230, 140, 60), (60, 140, 220), (200, 90, 160), (40, 160, 90), (150, 60, 200),
               (200, 180, 30), (210, 50, 50), (20, 20, 20), (90, 190, 200), (150, 110, 70), (100, 100, 220)]
    group = (w - left - 20) / len(metrics)
    bar = group / (len(names) + 1)
    d.line([(left, h - bottom), (w - 10, h - bottom)], fill="black")
    for gi, metric in enumerate(metrics):
        x0 = left + gi * group
        d.text((x0 + 4, h - bottom + 4), metric.replace("_", " "), fill="black", font=font)
        for ni, name in enumerate(names):
            if metric not in summary[name]:
                continue
            v = max(0.0, min(1.0, summary[name][metric][0]))
            top = h - bottom - v * (h - bottom - 20)
            d.rectangle([x0 + ni * bar + 4, top, x0 + (ni + 1) * bar + 2, h - bottom], fill=colours[ni % len(colours)])
    for ni, name in enumerate(names):
        y = h - bottom + 24 + 14 * ni
        d.rectangle([left, y + 2, left + 10, y + 12], fill=colours[ni % len(colours)])
        d.text((left + 16, y), name, fill="black", font=font)
    return im
