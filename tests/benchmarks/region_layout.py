"""Two objects in one image on the demo model: plain sampling, Mix-of-Show's regional cross-attention, and the
region layout (kernels/multi_concept/region_layout.py) at several shares, with each object's own prompt on its half.

The captions are model_quality's two-object captions ("a small blue box and a green kite in the snow"; combinations
the model was pretrained on), the score its both-objects-right rate (every object of the caption recognised with its
class and colour, each by a different blob). Regions: the first object's phrase with the context on the left half,
the second's on the right; the caption is the global prompt. One sample per caption, the demo's sampler.

    .venv/bin/python tests/benchmarks/region_layout.py [--captions 80] [--model DIR] [--threads 1]
        [--out-dir tests/benchmarks]

Writes region_layout.{md,json,png} (the png: the first 12 captions, one row per setting).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
#: (name, regional cross-attention, layout share); None: no regions at all
SETTINGS = [("plain (no regions)", None, 0.0), ("regions (Mix-of-Show 3.4)", True, 0.0),
            ("layout 0.2", False, 0.2), ("layout 0.3", False, 0.3), ("layout 0.4", False, 0.4),
            ("layout 0.6", False, 0.6), ("layout 0.8", False, 0.8), ("layout 1.0", False, 1.0),
            ("layout 0.4 + regions", True, 0.4), ("layout 0.6 + regions", True, 0.6)]
SHOWN = 12


def object_prompts(scene) -> list[str]:
    """Each object's phrase with the scene's context ("a green kite in the snow"), in the caption's order."""
    from fewshot_personalize.kernels.demo import world

    context = world.CONTEXT_PHRASES[scene.context]
    return [" ".join(p for p in (o.caption(), context) if p) for o in scene.objects]


def halves(scene, resolution: int):
    """Left half: the first object's phrase (+ context); right half: the second's."""
    from fewshot_personalize.kernels.multi_concept.regions import Region

    prompts = object_prompts(scene)
    h, r = resolution // 2, resolution
    return [(Region.from_box(box, i, label=p), p) for i, (box, p) in enumerate(zip(((0, 0, h, r), (h, 0, r, r)),
                                                                                 prompts))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--captions", type=int, default=80)
    ap.add_argument("--model", type=Path, help="demo model folder (default: the shipped demo model)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out-dir", type=Path, default=HERE)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    if a.model:
        os.environ["FEWSHOT_DEMO_MODEL"] = str(a.model.resolve())

    from fewshot_personalize.kernels.backends.diffusers.generate import generate_images
    from fewshot_personalize.kernels.core.plots import image_grid
    from fewshot_personalize.kernels.demo.evaluator import Evaluator
    from fewshot_personalize.kernels.demo.experiment import GUIDANCE, SAMPLE_STEPS, demo_pipeline
    from fewshot_personalize.kernels.demo.model import RESOLUTION, demo_model_path
    from fewshot_personalize.kernels.demo.model_quality import both_objects_right, two_object_scenes

    start = time.perf_counter()
    pipe, ev = demo_pipeline(), Evaluator.load()
    scenes = two_object_scenes(a.captions, 0)
    captions = [s.caption() for s in scenes]
    rows, shown = [], []
    for name, attention, layout in SETTINGS:
        t = time.perf_counter()
        images = []
        for i, (scene, caption) in enumerate(zip(scenes, captions)):
            kw = {} if attention is None else {"regions": halves(scene, RESOLUTION), "region_layout": layout,
                                                 "region_attention": attention}
            images += generate_images(pipe, caption, n=1, steps=SAMPLE_STEPS, seed=1000 + i, guidance=GUIDANCE,
                                      resolution=RESOLUTION, **kw)
        score = both_objects_right(ev, images, captions)
        rows.append({"setting": name, "region_attention": attention, "layout": layout, **score,
                     "seconds": time.perf_counter() - t})
        shown.append(images[:SHOWN])
        print(f"{name}: both right {score['both']:.1%} ({time.perf_counter() - t:.0f} s)", flush=True)
    record = {"date": time.strftime("%Y-%m-%d"), "machine": f"{platform.machine()}, {a.threads} thread(s)",
              "torch": torch.__version__, "model": str(demo_model_path()), "captions": len(captions),
              "sampler": f"the demo's ({SAMPLE_STEPS} steps, guidance {GUIDANCE})", "rows": rows,
              "seconds": time.perf_counter() - start}
    se = (0.25 / len(captions)) ** 0.5
    lines = [f"Two objects in one image on the demo model (tests/benchmarks/region_layout.py): {len(captions)} "
             f"two-object captions of model_quality, one sample each, {record['sampler']}; {record['machine']}, torch "
             f"{record['torch']}, {record['date']}, {record['seconds'] / 60:.0f} min in all. Regions: each object's "
             "phrase (+ context) on its half, the caption as the global prompt. One standard error is at most "
             f"{100 * se:.1f} points.", "",
             "| setting | both objects right ↑ | objects right ↑ | s per image |", "|---|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['setting']} | {100 * r['both']:.1f} % | {100 * r['objects']:.1f} % | "
                     f"{r['seconds'] / len(captions):.2f} |")
    lines += ["", "Ideal renders of the same captions score 92.5 % (model_quality's ceiling of the evaluator).", ""]
    a.out_dir.mkdir(parents=True, exist_ok=True)
    (a.out_dir / "region_layout.md").write_text("\n".join(lines))
    (a.out_dir / "region_layout.json").write_text(json.dumps(record, indent=1))
    image_grid(shown, row_labels=[r["setting"] for r in rows],
               col_labels=captions[:SHOWN], cell=96,
               label_width=120).save(a.out_dir / "region_layout.png")
    print(f"wrote {a.out_dir}/region_layout.md, .json, .png")


if __name__ == "__main__":
    main()
