"""Two objects both right on the demo model against classifier-free guidance rescale (Lin et al., "Common Diffusion
Noise Schedules and Sample Steps are Flawed", WACV 2024, §3.4 eq. 15-16: the guided prediction rescaled to the
conditional one's standard deviation, mixed with weight φ), which the paper pairs with the zero-terminal-SNR
schedule the demo model uses. Does it lift the base model's two-object bar (issue 13: 70 %)?

The captions are model_quality's 80 two-object captions; each (guidance, φ) setting samples every caption with two
seeds (image i of seed s: generator seed 1000 s + i), the demo's sampler (DPM-Solver, 20 steps), and scores the
both-objects-right rate (every object of the caption recognised with its class and colour, each by a different blob).

    .venv/bin/python tests/benchmarks/guidance_rescale.py [--model DIR] [--guidance 3,4,7] [--rescale 0,0.7]
        [--threads 1] [--out-dir tests/benchmarks]

Writes guidance_rescale.{md,json}.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
SEEDS = (0, 1)


def both_right_rate(pipe, evaluator, captions: list[str], guidance: float, rescale: float, seed: int) -> float:
    from fewshot_personalize.kernels.demo.experiment import SAMPLE_STEPS
    from fewshot_personalize.kernels.demo.model import RESOLUTION
    from fewshot_personalize.kernels.demo.model_quality import both_objects_right

    images = []
    for i, caption in enumerate(captions):
        gen = torch.Generator().manual_seed(1000 * seed + i)
        images += pipe(prompt=[caption], num_inference_steps=SAMPLE_STEPS, guidance_scale=guidance,
                       guidance_rescale=rescale, height=RESOLUTION, width=RESOLUTION, generator=[gen]).images
    return both_objects_right(evaluator, images, captions)["both"]


def _shown(model: str) -> str:
    """The model folder relative to the repository where it lies inside it (records stay machine-independent)."""
    try:
        return str(Path(model).resolve().relative_to(HERE.parent.parent))
    except ValueError:
        return model


def render_md(record: dict) -> str:
    rescales = record["rescale"]
    lines = ["# Two objects both right vs guidance rescale (demo model)", "",
             (f"model `{record['model']}`; {record['captions']} two-object captions × seeds {record['seeds']}, "
              f"DPM-Solver 20 steps; torch {record['torch']}, {record['machine']}, {record['date']}"), "",
             "| guidance | " + " | ".join(f"φ = {r:g}" for r in rescales) + " |",
             "|---:|" + "---:|" * len(rescales)]
    for g in record["guidance"]:
        cells = []
        for r in rescales:
            per_seed = record["results"][f"{g:g}/{r:g}"]
            cells.append(f"{100 * np.mean(per_seed):.1f} % ({', '.join(f'{100 * x:.1f}' for x in per_seed)})")
        lines.append(f"| {g:g} | " + " | ".join(cells) + " |")
    n = record["captions"] * len(record["seeds"])
    lines += ["", (f"Each cell: the mean over seeds (per seed in brackets); one standard error of a cell is about "
                   f"{100 * np.sqrt(0.65 * 0.35 / n):.1f} points.")]
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", help="a demo-architecture model folder (default: the shipped demo model)")
    ap.add_argument("--guidance", default="3,4,7")
    ap.add_argument("--rescale", default="0,0.7")
    ap.add_argument("--captions", type=int, default=80)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out-dir", default=str(HERE))
    a = ap.parse_args(argv)
    from fewshot_personalize.kernels.backends.diffusers import load_pipeline
    from fewshot_personalize.kernels.backends.diffusers.generate import use_sampler
    from fewshot_personalize.kernels.core.atomic_write import atomic_write_text
    from fewshot_personalize.kernels.demo.evaluator import Evaluator
    from fewshot_personalize.kernels.demo.model import demo_model_path
    from fewshot_personalize.kernels.demo.model_quality import two_object_scenes

    torch.set_num_threads(a.threads)
    model = a.model or str(demo_model_path())
    pipe = load_pipeline(model)
    use_sampler(pipe, "dpm")
    evaluator = Evaluator.load()
    captions = [s.caption() for s in two_object_scenes(a.captions, 0)]
    guidance = [float(x) for x in a.guidance.split(",")]
    rescale = [float(x) for x in a.rescale.split(",")]
    results = {}
    for g in guidance:
        for r in rescale:
            results[f"{g:g}/{r:g}"] = [both_right_rate(pipe, evaluator, captions, g, r, s) for s in SEEDS]
            print(f"guidance {g:g} rescale {r:g}: {results[f'{g:g}/{r:g}']}", flush=True)
    record = {"model": _shown(model), "captions": a.captions, "seeds": list(SEEDS), "guidance": guidance, "rescale": rescale,
              "results": results, "torch": torch.__version__, "machine": platform.machine(),
              "date": time.strftime("%Y-%m-%d")}
    out = Path(a.out_dir)
    atomic_write_text(out / "guidance_rescale.json", json.dumps(record, indent=1))
    atomic_write_text(out / "guidance_rescale.md", render_md(record))


if __name__ == "__main__":
    main()
