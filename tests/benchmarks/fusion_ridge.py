"""Which ridge should gradient fusion use? (issue 15) Recorded, not asserted; the table is fusion_ridge.md beside
this file.

The four bundled concepts, each an ED-LoRA trained alone with multi_concept.py's recipe (taken from its --work
cache, trained there if missing), are recorded the way fusion records them (kernels/backends/diffusers/fusion.py:
text encoder on each concept's prompt "a <ck>", UNet sampling it, 2 images × 20 DPM steps, both CFG halves), and
recorded again as held-out inputs: other prompts ("a <ck> on the beach", "a <ck> on the grass", "a big <ck>") and
another sampling seed. Every adapted layer is then solved from the first recording with each candidate, and each
result's least-squares objective Σ_i ‖X_i (W0 + ΔW_i)ᵀ − X_i Wᵀ‖² is reported on both recordings, relative to
the base weight W0's (1 = no better than not fusing). Candidates: the ridge anchored at W0 (the difference pulled
to zero) and at the weight average W̄ (kernels/multi_concept/fusion.py), at several strengths; weight averaging.

    python tests/benchmarks/fusion_ridge.py [--model DIR] [--work DIR] [--seed 0] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
HELD_OUT_PROMPTS = ("a {} on the beach", "a {} on the grass", "a big {}")
RIDGES = (1e-6, 1e-4, 1e-3, 1e-2, 0.03, 0.1, 0.3, 1.0, 3.0)


def anchored_at_base(base, deltas, grams, ridge: float) -> torch.Tensor:
    """W0 + (Σ ΔW_i G_i)(Σ G_i + λI)⁻¹, λ = ridge × the mean eigenvalue: the ridge pulls W − W0 to zero (fusion's
    anchor before this benchmark)."""
    total = sum(grams)
    lam = ridge * float(torch.diagonal(total).sum()) / total.shape[0]
    rhs = sum(d @ g for d, g in zip(deltas, grams))
    return base + torch.linalg.solve(total + lam * torch.eye(total.shape[0], dtype=total.dtype), rhs.T).T


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", type=Path, help="demo model folder (default: the shipped demo model)")
    ap.add_argument("--work", type=Path, help="multi_concept.py's cache of trained ED-LoRAs")
    ap.add_argument("--seed", type=int, default=0, help="which seed's ED-LoRAs")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(HERE / "fusion_ridge"))
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    if a.model:
        os.environ["FEWSHOT_DEMO_MODEL"] = str(a.model.resolve())
    sys.path.insert(0, str(HERE))
    import multi_concept as mc

    from fewshot_personalize.kernels.backends.diffusers.fusion import fuse_concepts, load_concept
    from fewshot_personalize.kernels.core.cache import cache_root
    from fewshot_personalize.kernels.demo.experiment import GUIDANCE, SAMPLE_STEPS, demo_pipeline
    from fewshot_personalize.kernels.demo.model import RESOLUTION, demo_model_path
    from fewshot_personalize.kernels.multi_concept import fusion as F

    start = time.perf_counter()
    pipe, names = demo_pipeline(), mc.SETS[4]
    model_key, recipe = mc.model_hash(demo_model_path()), mc.edlora_recipe()
    work = a.work or cache_root() / "bench_multi"
    files = {c: mc.train_concept(pipe, c, a.seed, recipe(c), work, model_key)["path"] for c in names}

    def record(seed: int, prompts=None):
        grams: dict[str, list] = {}

        def tap(layer, i, x):
            grams.setdefault(layer, [F.GramAccumulator() for _ in names])[i].add(x.float())

        concepts = [load_concept(pipe, files[c], f"a {mc.token(c)}") for c in names]
        for c, name in zip(concepts, names):
            c.prompts = [p.format(mc.token(name)) for p in prompts] if prompts else c.prompts
        fused = fuse_concepts(pipe, concepts, "gradient", sample_steps=SAMPLE_STEPS, samples=2, guidance=GUIDANCE,
                              resolution=RESOLUTION, seed=seed, tap=tap)
        base = fused.base
        fused.remove()
        return concepts, base, {k: [g.gram for g in v] for k, v in grams.items()}

    concepts, base, recorded = record(a.seed)
    _, _, held_out = record(a.seed + 1, HELD_OUT_PROMPTS)
    totals: dict[str, dict[str, list[float]]] = {}
    for name, grams in recorded.items():
        group = "unet" if name.startswith("lora_unet_") else "text encoder"
        w0 = base[name].double()
        deltas = [c.lora[name].delta().reshape(w0.shape).double() if name in c.lora else torch.zeros_like(w0)
                  for c in concepts]
        candidates = {"W0 (no fusion)": w0, "weight average": F.average_of_deltas(w0, deltas)}
        candidates |= {f"ridge {r:g} toward W0": anchored_at_base(w0, deltas, grams, r) for r in RIDGES}
        candidates |= {f"ridge {r:g} toward the average": F.fuse_layer(w0, deltas, grams, ridge=r) for r in RIDGES}
        for label, w in candidates.items():
            t = totals.setdefault(group, {}).setdefault(label, [0.0, 0.0])
            t[0] += F.fusion_objective(w, w0, deltas, grams)
            t[1] += F.fusion_objective(w, w0, deltas, held_out[name])
    rows = {g: {label: {"recorded": v[0] / t["W0 (no fusion)"][0], "held_out": v[1] / t["W0 (no fusion)"][1]}
                for label, v in t.items()} for g, t in totals.items()}
    record_ = {"date": time.strftime("%Y-%m-%d"), "model": str(demo_model_path()), "model_hash": model_key,
               "seed": a.seed, "concepts": {c: mc.token(c) for c in names}, "held_out_prompts": HELD_OUT_PROMPTS,
               "default_ridge": F.DEFAULT_RIDGE, "torch": torch.__version__, "seconds": time.perf_counter() - start,
               "relative_objective": rows}
    Path(a.out + ".json").write_text(json.dumps(record_, indent=1))
    lines = ["| candidate | text encoder: recorded | held out | UNet: recorded | held out |", "|---|---:|---:|---:|---:|"]
    for label in rows["unet"]:
        cells = [f"{rows[g][label][k]:.3f}" for g in ("text encoder", "unet") for k in ("recorded", "held_out")]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
