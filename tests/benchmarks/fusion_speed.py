"""How fast is closed-form gradient fusion against Mix-of-Show's LBFGS solve, on the same recorded activations?
(issue 15) Recorded, not asserted; the table is fusion_speed.md beside this file.

Two concepts with random rank-4 LoRAs on every adapted layer (text encoder q/k/v/out, UNet attention
q/k/v/out) and layer-wise tokens go through the fusion's recording on the demo model: the text encoder encodes each
concept's prompts with its own weights; the UNet samples each concept's prompts (--steps DPM steps, --samples images,
both halves of classifier-free guidance) with its own weights and the fused text encoder. The raw activations of
every layer are kept, so both solvers see exactly the same inputs:
- closed form: the Gram matrices accumulated from the activations, then one Cholesky solve per layer
  (kernels/multi_concept/fusion.py; the time includes accumulating the Grams);
- LBFGS with Mix-of-Show's settings (lr 1, history 25, strong Wolfe line search, 500 iterations on text-encoder
  layers, 50 on UNet layers, started from W0), float32 as Mix-of-Show runs it.
Reported per group: seconds, and the least-squares objective of each result, relative to the optimum's: on the
activations it was solved from (Eq. 5's objective), and on held-out activations of the same concepts recorded again
on other prompts (HELD_OUT_PROMPTS) with another sampling seed: how well the fused layer reproduces each concept on
inputs it was not fitted to, which is what sampling with the fused model asks of it. The closed form is solved
twice: at ridge 1e-4 (the least-squares optimum, to four digits) and at fusion's default ridge. Solver times only;
the recording itself (shared by both) is timed separately.

    python tests/benchmarks/fusion_speed.py [--steps 20] [--samples 2] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
PROMPTS = ("a photo of a {}", "{}")
HELD_OUT_PROMPTS = ("a {} on the beach", "a big {} in the snow")


def random_concepts(pipe, n: int = 2, rank: int = 4, scale: float = 0.1, prompts=PROMPTS):
    from fewshot_personalize.kernels.adapters.lora import LoraWeights, adapter_paths
    from fewshot_personalize.kernels.backends.diffusers import DiffusersDenoiser, DiffusersTextEncoder
    from fewshot_personalize.kernels.backends.diffusers.adapters import adapter_modules
    from fewshot_personalize.kernels.formats.concept_file import Concept

    layers = DiffusersDenoiser(pipe).cross_attention_layers()
    width = DiffusersTextEncoder(pipe).encoders[0].width
    out = []
    for i in range(n):
        g = torch.Generator().manual_seed(100 + i)
        lora = {}
        for prefix, root in adapter_modules(pipe).items():
            targets = ("to_q", "to_k", "to_v", "to_out.0") if prefix == "lora_unet_" else ("q_proj", "k_proj", "v_proj",
                                                                                          "out_proj")
            modules = dict(root.named_modules())
            for path in adapter_paths(root, targets):
                m = modules[path]
                lora[prefix + path.replace(".", "_")] = LoraWeights(
                    torch.randn(rank, m.in_features, generator=g) * scale,
                    torch.randn(m.out_features, rank, generator=g) * scale, float(rank))
        token = f"<c{i}>"
        out.append(Concept(token, lora, {token: {"clip_l": torch.randn(layers, 2, width, generator=g) * 0.02}},
                           [p.format(token) for p in prompts]))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--samples", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)

    from fewshot_personalize.kernels.backends.diffusers.fusion import fuse_concepts
    from fewshot_personalize.kernels.demo.experiment import demo_pipeline
    from fewshot_personalize.kernels.demo.model import RESOLUTION
    from fewshot_personalize.kernels.multi_concept import fusion as F

    pipe = demo_pipeline()
    concepts = random_concepts(pipe)
    recorded: dict[str, list[list[torch.Tensor]]] = {}  # layer → per concept → activation rows

    def keep(layer: str, concept: int, x: torch.Tensor) -> None:
        recorded.setdefault(layer, [[] for _ in concepts])[concept].append(x.reshape(-1, x.shape[-1]).float().clone())

    def record(seed: int, tap, concepts=concepts) -> tuple[dict, float]:
        t0 = time.perf_counter()
        fused = fuse_concepts(pipe, concepts, "gradient", sample_steps=a.steps, samples=a.samples,
                              resolution=RESOLUTION, seed=seed, tap=tap)
        seconds, base = time.perf_counter() - t0, fused.base
        fused.remove()
        return base, seconds

    base, record_s = record(0, keep)
    held_out: dict[str, list[F.GramAccumulator]] = {}

    def keep_gram(layer: str, concept: int, x: torch.Tensor) -> None:
        held_out.setdefault(layer, [F.GramAccumulator() for _ in concepts])[concept].add(x.float())

    record(1, keep_gram, random_concepts(pipe, prompts=HELD_OUT_PROMPTS))  # the same LoRAs and tokens
    default_ridge = F.DEFAULT_RIDGE
    solvers = ("optimum", "default", "lbfgs")  # closed form at ridge 1e-4, closed form at the default ridge, LBFGS

    rows = {g: {"layers": 0, "tokens": 0, "iterations": it, **{f"{k}_s": 0.0 for k in solvers},
                **{f"{k}_obj": 0.0 for k in solvers}, **{f"{k}_held_out_obj": 0.0 for k in solvers}}
            for g, it in (("text encoder", 500), ("unet", 50))}
    for name, per_concept in recorded.items():
        group = rows["unet" if name.startswith("lora_unet_") else "text encoder"]
        w0 = base[name].float()
        deltas = [c.lora[name].delta().reshape(w0.shape) for c in concepts]
        xs = [torch.cat(chunks) for chunks in per_concept]
        results = {}
        for solver, ridge in (("optimum", 1e-4), ("default", default_ridge)):
            t = time.perf_counter()
            grams = []
            for x in xs:
                acc = F.GramAccumulator()
                acc.add(x)
                grams.append(acc)
            results[solver] = F.fuse_layer(w0, deltas, grams, ridge=ridge)
            group[f"{solver}_s"] += time.perf_counter() - t
        t = time.perf_counter()
        results["lbfgs"] = F.fuse_layer_lbfgs(w0, deltas, xs, group["iterations"])
        group["lbfgs_s"] += time.perf_counter() - t
        g64 = [g.gram for g in grams]
        for solver, w in results.items():
            group[f"{solver}_obj"] += F.fusion_objective(w, w0, deltas, g64)
            group[f"{solver}_held_out_obj"] += F.fusion_objective(w, w0, deltas, [g.gram for g in held_out[name]])
        group["layers"] += 1
        group["tokens"] += sum(len(x) for x in xs)
        print(f"{name}: {len(xs[0])}+{len(xs[1])} rows", flush=True)
    for g in rows.values():
        g["speedup"] = g["lbfgs_s"] / max(g["default_s"], 1e-9)
        for k in ("", "held_out_"):
            for solver in ("default", "lbfgs"):
                g[f"{solver}_{k}obj_over_optimum"] = g[f"{solver}_{k}obj"] / max(g[f"optimum_{k}obj"], 1e-30)
    record = {"date": time.strftime("%Y-%m-%d"), "torch": torch.__version__, "threads": a.threads,
              "model": "demo", "concepts": len(concepts), "sample_steps": a.steps, "samples": a.samples,
              "recording_s": record_s, "default_ridge": default_ridge, "held_out_seed": 1, "groups": rows}
    (HERE / "fusion_speed.json").write_text(json.dumps(record, indent=1))
    print(json.dumps(record, indent=1))


if __name__ == "__main__":
    main()
