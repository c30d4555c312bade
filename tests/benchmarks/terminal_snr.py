"""Does the demo model read the image that the noise schedule leaves at t = T? (issue 13) Recorded, not asserted;
the table is terminal_snr.md beside this file, the numbers terminal_snr.json, the samples terminal_snr.png.

The scaled-linear schedule of SD1 (and of the demo model) ends at ᾱ_T = 0.0047, so x_T = √ᾱ_T x0 + √(1 − ᾱ_T) ε
still carries 6.8 % of the image; its lowest frequencies (each latent channel's mean) survive best, and on a
16 × 16 latent they are not drowned by the noise's own channel means (std 1/16). A model trained so learns to take
the background's brightness and colour from x_T, and sampling from pure noise, which carries none, gives grey,
washed-out scenes (Lin et al., "Common diffusion noise schedules and sample steps are flawed", WACV 2024, §2).
The test: the same seen captions and the same noise, sampled twice with the demo's sampler (DPM-Solver, 20 steps,
guidance 4):
- ``pure noise``: x_T = ε, what every sampler does;
- ``x_T from the image``: x_T = √ᾱ_T x0 + √(1 − ᾱ_T) ε, x0 the latent of the world's own render of the caption,
  i.e. what training showed the model at t = T;
- ``x_T from the image's channel means``: the same with x0 replaced by its per-channel mean (only the lowest
  frequency leaks), which tells whether offset noise (a per-channel constant) can be the remedy.
The demo evaluator's recognition of class, colour and context on each (model_quality.recognition). A model that
learned everything from the caption draws all three alike; a gap in context is the flaw. The remedy measured here
is pretraining's ``--schedule v-zero-snr`` (model.SCHEDULES).

    .venv/bin/python tests/benchmarks/terminal_snr.py --model DIR [--model DIR2 ...] [--captions 80] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from PIL import Image

HERE = Path(__file__).resolve().parent
MODES = ("pure noise", "x_T from the image", "x_T from the image's channel means")


def measure(model: str, n: int) -> tuple[dict, list[list[Image.Image]]]:
    from fewshot_personalize.kernels.backends.diffusers import load_pipeline
    from fewshot_personalize.kernels.backends.diffusers.generate import use_sampler
    from fewshot_personalize.kernels.core.images import pil_to_tensor
    from fewshot_personalize.kernels.demo import model_quality as mq
    from fewshot_personalize.kernels.demo.evaluator import Evaluator
    from fewshot_personalize.kernels.demo.experiment import GUIDANCE, SAMPLE_STEPS

    pipe = load_pipeline(model)
    use_sampler(pipe, "dpm")
    ev = Evaluator.load()
    captions = mq.seen_captions(n, 0)
    renders = mq.ideal_renders(captions, 0)
    ab_t = pipe.scheduler.alphas_cumprod[-1]
    size = pipe.unet.config.sample_size
    rows, out = [], {"alpha_bar_T": float(ab_t), "captions": n}
    with torch.no_grad():  # every render encoded once, for both modes that use it
        latents = pipe.vae.encode(pil_to_tensor(renders)).latent_dist.mean * pipe.vae.config.scaling_factor
    for mode in MODES:
        images = []
        for i, (caption, x0) in enumerate(zip(captions, latents)):
            eps = torch.randn((1, pipe.unet.config.in_channels, size, size), generator=torch.Generator().manual_seed(i))
            if mode == "pure noise":
                x_t = eps
            else:
                x0 = x0.unsqueeze(0)
                if mode == MODES[2]:
                    x0 = x0.mean((2, 3), keepdim=True).expand_as(x0)
                x_t = ab_t.sqrt() * x0 + (1 - ab_t).sqrt() * eps
            images.append(pipe(caption, num_inference_steps=SAMPLE_STEPS, guidance_scale=GUIDANCE, latents=x_t,
                               output_type="pil").images[0])
        out[mode] = mq.recognition(ev, images, captions)
        rows.append(images[:16])
    out["ideal renders"] = mq.recognition(ev, renders, captions)
    return out, rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", action="append", required=True, help="demo-architecture model folder (repeatable)")
    ap.add_argument("--label", action="append", help="a name per --model for the table (default: the folder)")
    ap.add_argument("--captions", type=int, default=80)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out-dir", default=str(HERE))
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    labels = a.label or a.model
    if len(labels) != len(a.model):
        raise SystemExit("give one --label per --model")
    results, grid_rows = {}, []
    for model, label in zip(a.model, labels):
        t0 = time.perf_counter()
        results[label], rows = measure(model, a.captions)
        results[label]["seconds"] = time.perf_counter() - t0
        results[label]["model"] = model
        grid_rows += rows
        print(label, json.dumps(results[label]), flush=True)
    out = Path(a.out_dir)
    (out / "terminal_snr.json").write_text(json.dumps({"date": time.strftime("%Y-%m-%d"), "torch": torch.__version__,
                                                      "threads": a.threads, "results": results}, indent=1) + "\n")
    lines = ["# Terminal SNR: does the model read the image left in x_T?", "",
             f"`tests/benchmarks/terminal_snr.py`, {a.captions} seen captions, one sample each, the demo sampler; "
             "recognition by the demo evaluator (class / colour / context / all three). Rows of "
             "terminal_snr.png: per model, one per x_T (first 16 captions). On the zero-terminal-SNR schedule "
             "√ᾱ_T = 0 at training, so the three x_T are the same noise there (the sampler's ᾱ_T is 2⁻²⁴).", "",
             "| model | x_T | class | colour | context | all |", "|---|---|---:|---:|---:|---:|"]
    for label, r in results.items():
        for mode in (*MODES, "ideal renders"):
            m = r[mode]
            lines.append(f"| {label} | {mode} | {m['cls']:.0%} | {m['colour']:.0%} | {m['context']:.0%} | {m['all']:.0%} |")
    (out / "terminal_snr.md").write_text("\n".join(lines).replace("%", " %") + "\n")
    grid = Image.new("RGB", (64 * 16, 64 * len(grid_rows)), "white")
    for r, row in enumerate(grid_rows):
        for c, im in enumerate(row):
            grid.paste(im.resize((64, 64)), (64 * c, 64 * r))
    grid.save(out / "terminal_snr.png")


if __name__ == "__main__":
    main()
