"""Does augmentation keep a concept from bringing its photos' surroundings along? (issue 14) Recorded, not asserted;
the table is augmentation_leakage.md beside this file.

Each method of the demo benchmark learns a concept from 5 references that all show it on the grass, once without and
once with augmentation (by default the ``standard`` preset: rescale, rotation, light changes and, in half the views,
a generated background behind the masked subject; ``--presets`` adds others; scale tags off, because the demo
model's vocabulary has no words for them).
Then every held-out prompt that asks for another context is sampled (2 images each) and the demo evaluator measures:
- leakage: the share of samples it sees on the grass although the prompt asks for another context;
- context: the share in the context the prompt asks for;
- subject fidelity against the references (masked), as in the main benchmark.
Without augmentation the masks are not given at all; with it they serve the background replacement only (the loss
covers the whole image in both), so the difference is the augmentation's. ``--background-weights 1,W`` adds the
same rows with a masked loss (the subject's pixels weighted 1, the rest W), with and without augmentation.

    python tests/benchmarks/augmentation_leakage.py [--seeds 3] [--concepts checker_toy,...] [--methods all|KIND,...]
        [--presets standard,strong] [--no-baseline] [--background-weights 1,W] [--keep EARLIER.json]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
TRAIN_CONTEXT = "grass"


def shared_context_references(concept: str, seed: int, n: int = 5):
    """``n`` references of the concept, poses and sizes varying as in the main benchmark, all on the grass."""
    from fewshot_personalize.kernels.demo.concepts import render_concept

    sizes = ("medium", "big", "medium", "big", "medium")
    return [render_concept(concept, TRAIN_CONTEXT, sizes[i % 5], seed * 1009 + i) for i in range(n)]


def run(concepts, seeds, recipes, augmentations: dict) -> list[dict]:
    from fewshot_personalize.kernels.demo.concepts import get_concept, prompt_specs
    from fewshot_personalize.kernels.demo.evaluator import Evaluator
    from fewshot_personalize.kernels.demo.experiment import demo_pipeline, personalize, sample

    pipe, evaluator = demo_pipeline(), Evaluator.load()
    runs = []
    for concept in concepts:
        c = get_concept(concept)
        specs = [s for s in prompt_specs(c) if s.context not in (None, "plain", TRAIN_CONTEXT)]
        for seed in range(seeds):
            refs = shared_context_references(concept, seed)
            ref_imgs, ref_masks = [im for im, _ in refs], np.stack([m for _, m in refs])
            for recipe in recipes:
                for label, (aug, background_weight) in augmentations.items():
                    start = time.perf_counter()
                    p = personalize(pipe, concept, recipe, seed, references=refs, augment=aug,
                                    background_loss_weight=background_weight)
                    leak, right, fidelity = [], [], []
                    for k, spec in enumerate(specs):
                        imgs = sample(pipe, spec.prompt(recipe.phrase(c)), 2, seed * 1000 + k, p.adapters)
                        seen = [r["context"] for r in evaluator.recognise(imgs)]
                        leak += [s == TRAIN_CONTEXT for s in seen]
                        right += [s == spec.context for s in seen]
                        fidelity.append(evaluator.subject_fidelity(imgs, ref_imgs, ref_masks, c.cls))
                    p.remove()
                    runs.append({"concept": concept, "seed": seed, "method": recipe.name, "augmentation": label,
                                 "leakage": float(np.mean(leak)), "context": float(np.mean(right)),
                                 "subject_fidelity": float(np.mean(fidelity)),
                                 "seconds": round(time.perf_counter() - start, 1)})
                    print(json.dumps(runs[-1]), flush=True)
    return runs


def summarise(runs: list[dict]) -> list[dict]:
    rows = []
    for method in dict.fromkeys(r["method"] for r in runs):
        for aug in dict.fromkeys(r["augmentation"] for r in runs):
            rs = [r for r in runs if r["method"] == method and r["augmentation"] == aug]
            if not rs:
                continue
            row = {"method": method, "augmentation": aug, "n": len(rs)}
            for k in ("leakage", "context", "subject_fidelity"):
                v = np.array([r[k] for r in rs])
                row[k] = (float(v.mean()), float(v.std(ddof=1) / np.sqrt(len(v))) if len(v) > 1 else 0.0)
            rows.append(row)
    return rows


def markdown(record: dict) -> str:
    lines = [f"# Augmentation against background leakage ({record['date']}, {record['model']})", "",
             f"References: 5 per concept, all on the {TRAIN_CONTEXT}; concepts {', '.join(record['concepts'])}; "
             f"{record['seeds']} seed(s); held-out prompts in other contexts, 2 samples each. "
             "Augmentation presets (scale tags off): " + "; ".join(f"{k}: {v}" for k, v in record["augment"].items())
             + ". Mean ± standard error over concepts × seeds.", "",
             "| method | augmentation | leakage (seen on the grass) ↓ | asked context ↑ | subject fidelity ↑ |",
             "|---|---|---|---|---|"]
    for r in record["summary"]:
        f = lambda k: f"{r[k][0]:.3f} ± {r[k][1]:.3f}"  # noqa: E731
        lines.append(f"| {r['method']} | {r['augmentation']} | {f('leakage')} | {f('context')} | "
                     f"{f('subject_fidelity')} |")
    return "\n".join(lines) + "\n"


def model_label(folder: Path) -> str:
    """The demo model a record was measured on, told apart by its pretraining log's step counts (the shipped
    model's name changes with every release; its steps do not)."""
    log = json.loads((folder / "pretrain_log.json").read_text()) if (folder / "pretrain_log.json").is_file() else {}
    steps = [f"{log[k]['steps']:,} {k} steps" for k in ("unet", "decoder") if k in log]
    return f"demo model ({folder.name}: {', '.join(steps) or 'no pretraining log'})"


def main(argv=None) -> None:
    import torch

    from fewshot_personalize.kernels.augment.settings import preset
    from fewshot_personalize.kernels.demo.experiment import DEFAULT_METHOD, METHODS

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--concepts", default="checker_toy")
    ap.add_argument("--methods", default="all",
                    help="'all' (DreamBooth-LoRA default row, TI, CatVersion, pivotal) or a comma list of method kinds: "
                         "dreambooth-lora,textual-inversion,catversion,pivotal")
    ap.add_argument("--presets", default="standard", help="augmentation presets compared with none, e.g. standard,strong")
    ap.add_argument("--no-baseline", action="store_true", help="leave out the rows without augmentation")
    ap.add_argument("--background-weights", default="1",
                    help="loss weights of the background's pixels, one set of rows each (1: the whole image, as "
                         "without masks; W < 1: a masked loss), e.g. 1,0.1")
    ap.add_argument("--keep", help="an earlier record (.json) whose runs are kept beside the new ones")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(HERE / "augmentation_leakage"))
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    kinds = ("dreambooth-lora", "textual-inversion", "catversion", "pivotal")
    wanted = kinds if a.methods == "all" else tuple(a.methods.replace("dreambooth", "dreambooth-lora")
                                                    .replace("-lora-lora", "-lora").split(","))
    if unknown := [k for k in wanted if k not in kinds]:
        ap.error(f"--methods: unknown {', '.join(unknown)} (known: all, {', '.join(kinds)})")
    recipes = [r for r in [DEFAULT_METHOD] + [m for m in METHODS if m.method in kinds[1:]] if r.method in wanted]
    settings = {} if a.no_baseline else {"none": None}
    settings.update({name: preset(name, scale_tags=False) for name in a.presets.split(",")})
    try:
        weights = [float(w) for w in a.background_weights.split(",")]
    except ValueError:
        ap.error(f"--background-weights takes numbers separated by commas, got {a.background_weights!r}")
    if not all(0 <= w <= 1 for w in weights):
        ap.error(f"--background-weights must each be in [0, 1], got {a.background_weights}")
    augmentations = {label + ("" if w == 1 else f" + masked loss (background {w:g})"): (aug, w)
                     for w in weights for label, aug in settings.items()}
    concepts = a.concepts.split(",")
    earlier = json.loads(Path(a.keep).read_text()) if a.keep else {"runs": [], "augment": {}}
    runs = earlier["runs"] + run(concepts, a.seeds, recipes, augmentations)
    from fewshot_personalize.kernels.demo.model import demo_model_path

    record = {"date": time.strftime("%Y-%m-%d"), "model": model_label(Path(demo_model_path())),
              "concepts": concepts, "seeds": a.seeds,
              "augment": earlier["augment"] | {k: v.describe() for k, v in settings.items() if v is not None},
              "runs": runs,
              "summary": summarise(runs)}
    Path(a.out + ".json").write_text(json.dumps(record, indent=1))
    Path(a.out + ".md").write_text(markdown(record))
    print(markdown(record))


if __name__ == "__main__":
    main()
