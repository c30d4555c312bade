"""A concept nothing was tuned on (issue 13 §1): can the shipped demo model learn a subject nobody picked a recipe
for, so that it is recognisable in new contexts? Recorded, not asserted; writes heldout_concept.{md,json,png}.

The concept, ``striped_ball`` (a red ball with yellow stripes), is defined here and nowhere else: it is not one of
the bundled concepts in kernels/demo/concepts.py, none of the recipes (kernels/demo/experiment.py) was tuned on it,
and it was first trained when this file was written, with the benchmark's default DreamBooth recipe unchanged
(prior preservation, UNet + text encoder, 400 steps at 3e-3, rank 4). The stripes are a pattern no bundled concept
and no pretraining caption has. Protocol: the quality bench's (13 held-out prompts × 2 images, seeds 0..N-1, the
seed also picks the 5 reference photos), with the base model drawing "a sks ball …" as the before-row and the
references' ideal renders (raw and through the model's VAE) as ceilings.

    python tests/benchmarks/heldout_concept.py [--seeds 3] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch

from fewshot_personalize.kernels.core.plots import image_grid
from fewshot_personalize.kernels.demo.concepts import Concept, reference_images
from fewshot_personalize.kernels.demo.evaluator import Evaluator
from fewshot_personalize.kernels.demo.experiment import (DEFAULT_METHOD, demo_pipeline, personalize, reference_score,
                                                         sample, score)
from fewshot_personalize.kernels.demo.model import demo_model_path

HERE = Path(__file__).parent
HELDOUT = Concept("striped_ball", "ball", "red", "stripes", "sks", "a red ball with yellow stripes", colour2="yellow")
METRICS = ("subject_fidelity", "prompt_fidelity", "class_prior_drift", "diversity")
SHOWN = ("a {} on the beach", "a {} in the snow", "a {} at night", "a big {} on the grass",
         "a {} with a city in the background")


def _mean_std(rows: list[dict], key: str) -> tuple[float, float]:
    v = np.array([r[key] for r in rows], dtype=float)
    return float(v.mean()), float(v.std())


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=HERE / "heldout_concept")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    ev, pipe = Evaluator.load(), demo_pipeline()
    start = time.perf_counter()
    runs, grid_rows, labels = [], [], []
    for seed in range(a.seeds):
        ceiling = reference_score(ev, HELDOUT, seed, pipe)
        before = score(ev, pipe, HELDOUT, seed)
        shown = lambda adapters=None: [sample(pipe, p.format("sks ball"), 1, 7 + k, adapters)[0]  # noqa: E731
                                       for k, p in enumerate(SHOWN)]
        if seed == 0:
            grid_rows += [[im for im, _ in reference_images(HELDOUT, seed=seed)], shown()]
            labels += ["references (seed 0)", "base model"]
        t = time.perf_counter()
        done = personalize(pipe, HELDOUT, DEFAULT_METHOD, seed)
        train_s = time.perf_counter() - t
        after = score(ev, pipe, HELDOUT, seed, personalized=done)
        if seed == 0:
            grid_rows.append(shown(done.adapters))
            labels.append("DreamBooth-LoRA")
        done.remove()
        runs.append({"seed": seed, "train_seconds": train_s,
                     "references": {k: ceiling[k] for k in ("subject_fidelity", "prompt_fidelity")},
                     "references_through_vae": ceiling["through_vae"],
                     "base": {k: before[k] for k in METRICS}, "dreambooth": {k: after[k] for k in METRICS}})
    record = {"date": time.strftime("%Y-%m-%d"), "concept": HELDOUT.__dict__, "recipe": DEFAULT_METHOD.name,
              "model": str(demo_model_path()), "seeds": a.seeds, "threads": a.threads, "torch": torch.__version__,
              "machine": platform.machine(), "minutes": (time.perf_counter() - start) / 60, "runs": runs}
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.with_suffix(".json").write_text(json.dumps(record, indent=1))
    image_grid(grid_rows, labels, [p.format("sks ball") for p in SHOWN], cell=96).save(a.out.with_suffix(".png"))
    a.out.with_suffix(".md").write_text(render(record))
    print(render(record))


def render(record: dict) -> str:
    runs = record["runs"]
    ms = lambda part, key: "%.3f ± %.3f" % _mean_std([r[part] for r in runs], key)  # noqa: E731
    lines = [f"# A held-out concept on the demo model ({record['date']})", "",
             f"Concept `{record['concept']['name']}`: {record['concept']['description']} (defined only in "
             f"heldout_concept.py; no recipe tuned on it). Recipe: {record['recipe']} (the benchmark's default, "
             f"unchanged). {record['seeds']} seeds × 13 held-out prompts × 2 images; mean ± std over seeds. "
             f"{record['machine']}, {record['threads']} thread(s), torch {record['torch']}, "
             f"{record['minutes']:.0f} min in all.", "",
             "| row | subject fidelity ↑ | prompt fidelity ↑ | class-prior drift ↓ | diversity ↑ |",
             "|---|---:|---:|---:|---:|",
             f"| base model, \"a sks ball …\" | {ms('base', 'subject_fidelity')} | {ms('base', 'prompt_fidelity')} | "
             f"{ms('base', 'class_prior_drift')} | {ms('base', 'diversity')} |",
             f"| DreamBooth-LoRA (default recipe) | {ms('dreambooth', 'subject_fidelity')} | "
             f"{ms('dreambooth', 'prompt_fidelity')} | {ms('dreambooth', 'class_prior_drift')} | "
             f"{ms('dreambooth', 'diversity')} |",
             f"| references (ceiling) | {ms('references', 'subject_fidelity')} | {ms('references', 'prompt_fidelity')} | — | — |",
             f"| references through the model's VAE | {ms('references_through_vae', 'subject_fidelity')} | "
             f"{ms('references_through_vae', 'prompt_fidelity')} | — | — |", ""]
    sf = np.mean([r["dreambooth"]["subject_fidelity"] for r in runs])
    ref = np.mean([r["references"]["subject_fidelity"] for r in runs])
    vae = np.mean([r["references_through_vae"]["subject_fidelity"] for r in runs])
    lines.append(f"DreamBooth-LoRA reaches {sf / ref:.0%} of the references' subject fidelity ({sf / vae:.0%} of what "
                 f"they keep through the VAE); training {np.mean([r['train_seconds'] for r in runs]):.0f} s per run. "
                 "Samples: heldout_concept.png (references, the base model and the trained concept in five "
                 "contexts, seed 0).")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
