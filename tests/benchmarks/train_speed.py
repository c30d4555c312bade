"""Seconds per training step and peak memory of DreamBooth-LoRA on the tiny SD1-like model (CPU, fp32).

Run: ``python tests/benchmarks/train_speed.py [--steps 30]``; prints a Markdown table (recorded in
tests/benchmarks/train_speed.md and README). Peak memory is the process's peak RSS (Linux ru_maxrss), measured
in a fresh subprocess per configuration.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import tempfile
import time


def one(base: str, batch: int, steps: int, text: bool, prior: bool) -> dict:
    import torch

    from fewshot_personalize.kernels.backends.diffusers import DiffusersDenoiser, DiffusersTextEncoder, load_pipeline
    from fewshot_personalize.kernels.engine.config import TrainConfig
    from fewshot_personalize.kernels.engine.data import TrainData
    from fewshot_personalize.kernels.engine.loop import Trainer
    from fewshot_personalize.kernels.methods import DreamBoothLora, LoraSettings

    torch.set_num_threads(2)
    pipe = load_pipeline(base)
    g = torch.Generator().manual_seed(0)
    data = TrainData(torch.rand(5, 3, 32, 32, generator=g) * 2 - 1,
                     torch.rand(8, 3, 32, 32, generator=g) * 2 - 1 if prior else None)
    cfg = TrainConfig("a sks toy", "a toy" if prior else None, steps=steps + 3, batch_size=batch, resolution=32)
    method = DreamBoothLora(LoraSettings(train_text_encoder=text))
    trainer = Trainer(DiffusersDenoiser(pipe), DiffusersTextEncoder(pipe), method, data, cfg)
    times = []
    last = [time.perf_counter()]

    def tick(step, total, loss):
        now = time.perf_counter()
        times.append(now - last[0])
        last[0] = now

    trainer.train(on_step=tick)
    steady = times[3:]  # skip warm-up steps
    return {"s_per_step": sum(steady) / len(steady), "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--child", nargs=4)
    a = ap.parse_args()
    if a.child:
        base, batch, text, prior = a.child
        print(json.dumps(one(base, int(batch), a.steps, text == "1", prior == "1")))
        return
    from fewshot_personalize.kernels.testing.tiny_models import build_tiny_sd

    import torch

    with tempfile.TemporaryDirectory() as tmp:
        base = build_tiny_sd(tmp)
        rows = []
        for text in (0, 1):
            for prior in (0, 1):
                for batch in (1, 4):
                    out = subprocess.run([sys.executable, __file__, "--steps", str(a.steps), "--child", base, str(batch), str(text), str(prior)],
                                         capture_output=True, text=True, check=True).stdout
                    r = json.loads(out.strip().splitlines()[-1])
                    rows.append((batch, "UNet + text" if text else "UNet", "yes" if prior else "no", r["s_per_step"], r["peak_rss_mb"]))
    print(f"tiny SD1-like model (UNet 32/64 ch, CLIP 2×32), 32 px, rank 4, fp32, torch {torch.__version__}, "
          f"{platform.processor() or platform.machine()}, 2 threads, {a.steps} steps after 3 warm-up\n")
    print("| batch | LoRA on | prior preservation | s / step | peak RSS (MB) |")
    print("|---:|---|---|---:|---:|")
    for b, t, p, s, m in rows:
        print(f"| {b} | {t} | {p} | {s:.4f} | {m:.0f} |")


if __name__ == "__main__":
    main()
