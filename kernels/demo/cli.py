"""Command-line verbs of the demo world: ``demo`` and ``bench``, and the demo evaluator that ``evaluate`` uses without
``--clip`` (see kernels/cli/evaluate.py)."""

from __future__ import annotations

import json
import time
from pathlib import Path

from ..core.errors import UserInputError

DEMO_PROMPTS = ("a {}", "a {} on the beach", "a {} in the snow", "a {} at night", "a {} on the grass",
                "a {} with a city in the background")


def add_commands(sub) -> None:
    d = sub.add_parser("demo", help="the whole job on the shipped demo model, on a CPU, in a few minutes")
    d.add_argument("--out", default="demo_out", help="folder for the grid, loss curve, metrics and the adapter file "
                                                     "(default demo_out)")
    d.add_argument("--concept", default="checker_toy", help="bundled concept: checker_toy, twotone_ball, marked_box, creature_toy")
    d.add_argument("--method", default="dreambooth-lora",
                   choices=["dreambooth-lora", "textual-inversion", "catversion", "pivotal", "ed-lora"],
                   help="what to train, with the benchmark's recipe for it (default dreambooth-lora: prior + UNet + text)")
    d.add_argument("--steps", type=int, help="training steps (default: the benchmark's recipe)")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--overwrite", action="store_true")

    b = sub.add_parser("bench", help="quality benchmark: methods × concepts × held-out prompts × seeds")
    b.add_argument("--seeds", type=int, default=3)
    b.add_argument("--concepts", default="all")
    b.add_argument("--rows", help="row names separated by ';' to run (names contain commas); the other rows are kept "
                                  "from the record in --out")
    b.add_argument("--out", default=str(Path(__file__).resolve().parents[2] / "tests" / "benchmarks"),
                   help="folder for quality.md, quality.json and quality.png")


def load_evaluator():
    """The shipped demo evaluator, or a one-line error naming what is missing."""
    from .evaluator import Evaluator

    try:
        return Evaluator.load()
    except (FileNotFoundError, ValueError) as e:
        raise UserInputError(str(e)) from None


def cmd_demo(a) -> int:
    import dataclasses

    from tqdm import tqdm

    from ..formats.safetensors_io import atomic_save
    from ..core.plots import image_grid, loss_curve
    from .concepts import CONCEPTS, get_concept, reference_images
    from .experiment import demo_pipeline, personalize, recipe_for, reference_score, sample

    if a.concept not in CONCEPTS:
        raise UserInputError(f"unknown concept {a.concept!r}; choose one of {', '.join(CONCEPTS)}")
    out = Path(a.out)
    targets = [out / n for n in ("grid.png", "loss.png", "metrics.json", f"{a.concept}.safetensors")]
    if any(t.exists() for t in targets) and not a.overwrite:
        raise UserInputError(f"{out} already holds demo results (pass --overwrite to replace them)")
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    c = get_concept(a.concept)
    method = recipe_for(a.method)
    method = method if a.steps is None else dataclasses.replace(method, steps=a.steps)
    if method.steps < 1:
        raise UserInputError(f"--steps must be at least 1, got {method.steps}")
    pipe = demo_pipeline()
    ev = load_evaluator()
    refs = reference_images(c, seed=a.seed)
    ref_imgs = [im for im, _ in refs]
    prompts = [p.format(method.phrase(c)) for p in DEMO_PROMPTS]

    def sample_all(tag):
        return [sample(pipe, p, 1, a.seed + k, adapters)[0]
                for k, p in enumerate(tqdm(prompts, desc=f"sample {tag}", leave=False))]

    adapters = None

    before = sample_all("before")
    bar = tqdm(total=method.steps, desc="train", unit="step")

    def on_step(step, total, loss):
        bar.n = step
        bar.set_postfix(loss=f"{loss:.4f}")
        bar.refresh()

    done = personalize(pipe, a.concept, method, a.seed, on_step=on_step)
    result, adapters = done.result, done.adapters
    bar.close()
    after = sample_all("after")

    import numpy as np

    masks = np.stack([m for _, m in refs])
    metrics = {"concept": a.concept, "identifier": c.identifier, "method": method.name, "steps": result.steps,
               "train_seconds": round(result.seconds, 1), "prompts": prompts,
               "before": {**ev.fidelities(before, ref_imgs, masks, c.cls),
                          "prompt_fidelity": float(np.mean([ev.evaluate([im], p)["prompt_fidelity"] for im, p in zip(before, prompts)]))},
               "after": {**ev.fidelities(after, ref_imgs, masks, c.cls),
                         "prompt_fidelity": float(np.mean([ev.evaluate([im], p)["prompt_fidelity"] for im, p in zip(after, prompts)]))},
               "references_ceiling": reference_score(ev, a.concept, a.seed)}
    grid = image_grid([ref_imgs, before, after], row_labels=["reference photos", "before (base model)",
                                                            f"after ({method.name}, {result.steps} steps)"],
                      col_labels=None, cell=96)
    header = image_grid([[im for im in after]], col_labels=prompts, cell=96)
    grid.save(out / "grid.png")
    header.save(out / "prompts.png")
    loss_curve(result.losses, title=f"{a.concept}: {method.name} loss").save(out / "loss.png")
    (out / "metrics.json").write_text(json.dumps(metrics, indent=1))
    main = done.artifacts.get("pivotal") or next(iter(done.artifacts.values()))
    atomic_save(main.tensors, out / f"{a.concept}.safetensors", main.metadata, overwrite=a.overwrite)
    b, f = metrics["before"], metrics["after"]
    print(f"{a.concept} ('{method.phrase(c)}', {method.name}): subject fidelity {b['subject_fidelity']:.3f} → {f['subject_fidelity']:.3f} "
          f"(references {metrics['references_ceiling']['subject_fidelity']:.3f}), prompt fidelity "
          f"{b['prompt_fidelity']:.2f} → {f['prompt_fidelity']:.2f}; {time.perf_counter() - start:.0f} s in all")
    print(f"wrote {out / 'grid.png'}, {out / 'prompts.png'}, {out / 'loss.png'}, {out / 'metrics.json'}, "
          f"{out / (a.concept + '.safetensors')}")
    return 0


def evaluate_folders(images: str, prompt: str, references: str) -> dict:
    """The demo evaluator's metrics of a folder of generated images against a folder of references (``evaluate``
    without ``--clip``)."""
    from ..core.images import list_images, open_rgb

    imgs = [open_rgb(p) for p in list_images(images)]
    refs = [open_rgb(p) for p in list_images(references)]
    if not prompt.strip():
        raise UserInputError("the prompt is empty")
    return load_evaluator().evaluate(imgs, prompt, refs)


def cmd_bench(a) -> int:
    from .bench import run_bench

    rows = [r.strip() for r in a.rows.split(";") if r.strip()] if a.rows else None
    try:
        run_bench(Path(a.out), seeds=a.seeds, concepts=None if a.concepts == "all" else a.concepts.split(","), rows=rows)
    except ValueError as e:
        raise UserInputError(str(e)) from None
    return 0


COMMANDS = {"demo": cmd_demo, "bench": cmd_bench}
