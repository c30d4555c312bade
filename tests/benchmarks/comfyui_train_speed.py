"""Seconds per training step: our FSP_TrainConcept vs ComfyUI's own TrainLoraNode, side by side.

Same tiny SD1-style model (kernels.testing.tiny_models, built into ComfyUI objects by nodes.backend.diffusers_loader), the same
4 training images at 32x32 pixels (16x16 latents), LoRA rank 4, batch 1, fp32, AdamW, lr 1e-3, UNet only.
Each node runs with a short and a long step budget; per-step time = (t_long - t_short) / (steps difference),
which removes set-up costs (model cloning, VAE encoding, adapter creation). Runs alternate between the nodes and
the median of the repeats is reported, so load from other processes hits both alike.

Not a test (no assertions). Run:
    COMFYUI_PATH=/work/ComfyUI /work/comfy-venv/bin/python tests/benchmarks/comfyui_train_speed.py [--repeats 3]
Differences that remain: TrainLoraNode adapts *every* weight (all convs/linears + bias diffs) through weight
wrappers and computes its loss in x0 space; ours adapts the attention projections (to_q/k/v/out, as DreamBooth-
LoRA does) with peft and trains on the ε target. Both are recorded with their adapter sizes.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import platform
import statistics
import sys
import time

COMFY = os.environ.get("COMFYUI_PATH")
if not COMFY:
    sys.exit("set COMFYUI_PATH to a ComfyUI checkout")
sys.path.insert(0, COMFY)
from comfy.cli_args import args  # noqa: E402

args.cpu = True
import utils.extra_config  # noqa: E402,F401
import utils.install_util  # noqa: E402,F401

import torch  # noqa: E402

log = logging.getLogger("comfyui_train_speed")


def trainlora_runner(node, learning_rate: float = 1e-3):
    """``run(model, latents, cond, steps) -> LoRA tensors`` of ComfyUI's own trainer on either of its APIs: v0.3.64's
    ``TrainLoraNode().train(...)`` (returns MODEL, LoRA, loss, steps) or the V3 node of ComfyUI 0.33
    (``execute`` with list inputs, new inputs such as bypass mode and bucketing at their defaults; returns the
    LoRA as ``LORA_MODEL``, the loss map and the step count, no MODEL). Same settings on both: batch 1, rank 4,
    AdamW, lr ``learning_rate``, MSE, seed 0, fp32 training and LoRA dtypes, plain LoRA, no gradient checkpointing."""
    settings = dict(batch_size=1, grad_accumulation_steps=1, learning_rate=learning_rate, rank=4, optimizer="AdamW",
                    loss_function="MSE", seed=0, training_dtype="fp32", lora_dtype="fp32", algorithm="LoRA",
                    gradient_checkpointing=False, existing_lora="[None]")
    if hasattr(node, "train"):  # v0.3.x
        def run(model, latents, cond, steps):
            s = settings
            out = node().train(model, latents, cond, s["batch_size"], steps, s["grad_accumulation_steps"],
                               s["learning_rate"], s["rank"], s["optimizer"], s["loss_function"], s["seed"],
                               s["training_dtype"], s["lora_dtype"], s["algorithm"], s["gradient_checkpointing"],
                               s["existing_lora"])
            return out[1]
        return run
    defaults = {i.id: i.default for i in node.define_schema().inputs if getattr(i, "default", None) is not None}

    def run(model, latents, cond, steps):
        kw = {**defaults, **settings, "model": model, "latents": latents, "positive": cond, "steps": steps}
        return node.execute(**{k: [v] for k, v in kw.items()}).args[0]
    return run


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--short", type=int, default=5)
    ap.add_argument("--long", type=int, default=25)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (1 by default: steadier numbers on a shared, busy CPU)")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    logging.basicConfig(level=logging.WARNING)

    import nodes as comfy_nodes  # ComfyUI's

    asyncio.run(comfy_nodes.init_extra_nodes(init_custom_nodes=False, init_api_nodes=False))
    from comfy_extras.nodes_train import TrainLoraNode

    from fewshot_personalize.nodes.backend.diffusers_loader import load_diffusers_folder, tiny_model_folder
    from fewshot_personalize.nodes.train import TrainConcept

    with torch.inference_mode():
        model, clip, vae = load_diffusers_folder(tiny_model_folder(0))
        imgs = torch.rand(4, 32, 32, 3, generator=torch.Generator().manual_seed(0))
        latents = {"samples": vae.encode(imgs)}
        cond = clip.encode_from_tokens_scheduled(clip.tokenize("a photo of sks toy"))

    def ours(steps):
        t = time.perf_counter()
        with torch.inference_mode():
            out = TrainConcept.execute([model], [clip], [vae], [imgs], ["a photo of sks toy"], [steps], [1e-3], [4],
                                       [False], [32], [1], [0], preview_steps=[0])
        return time.perf_counter() - t, sum(w.down.numel() + w.up.numel() for w in out.args[2].weights.values())

    train_lora = trainlora_runner(TrainLoraNode)

    def theirs(steps):
        t = time.perf_counter()
        with torch.inference_mode():
            lora = train_lora(model, latents, cond, steps)
        return time.perf_counter() - t, sum(v.numel() for v in lora.values())

    results = {"ours": [], "TrainLoraNode": []}
    sizes = {}
    for r in range(a.repeats):
        for name, fn in (("ours", ours), ("TrainLoraNode", theirs)) if r % 2 == 0 else (("TrainLoraNode", theirs), ("ours", ours)):
            t_short, _ = fn(a.short)
            t_long, n = fn(a.long)
            sizes[name] = n
            results[name].append((t_long - t_short) / (a.long - a.short))
            print(f"repeat {r}: {name:14s} {results[name][-1]:.4f} s/step", flush=True)
    med = {k: statistics.median(v) for k, v in results.items()}
    print()
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"threads {torch.get_num_threads()}, ComfyUI {__import__('comfyui_version').__version__}")
    print("| node | s/step (median) | all repeats | trainable parameters |")
    print("|---|---|---|---|")
    for k in ("ours", "TrainLoraNode"):
        print(f"| {k} | {med[k]:.4f} | {', '.join(f'{x:.4f}' for x in results[k])} | {sizes[k]:,} |")
    print(f"\nratio ours / TrainLoraNode: {med['ours'] / med['TrainLoraNode']:.2f}")


if __name__ == "__main__":
    main()
