"""Which decoder for the demo VAE: fine-tune the decoder alone (encoder and latents frozen) from a VAE folder, wider
or on other scenes, and measure what the VAE keeps every few minutes (subject and pattern fidelity ratios,
kernels/demo/vae_quality.py). Recorded, not asserted; the runs made so far are in demo_vae_choice.md.

    python tests/benchmarks/demo_decoder_choice.py VAE_FOLDER OUT --minutes 15 [--widen 2] [--pattern-share 0.5]
        [--prefer-shape 0.7] [--images 8000] [--threads 1]     # writes OUT (the VAE) and OUT.json (the curve)
    python tests/benchmarks/demo_decoder_choice.py VAE_FOLDER OUT --probe creature_toy --steps 1000
        # a probe, not a candidate: train on renders of one concept only (is its detail in the latents at all?)
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch


def _row(tag: str, steps: int, report: dict) -> dict:
    return {"tag": tag, "steps": steps, "min_ratio": report["min_ratio"],
            "min_pattern_ratio": report["min_pattern_ratio"], "colour": report["colour"]["mean_error_per_channel"],
            "concepts": {c: {k: {"subject": v[k]["ratio"], "pattern": v[k]["pattern"]["ratio"]} for k in v}
                         for c, v in report["concepts"].items()}}


def _probe(vae, concept: str, steps: int) -> None:
    """Train the decoder on 400 renders of ``concept``'s prompts (seeds the measurement never uses)."""
    from fewshot_personalize.kernels.demo.concepts import prompt_specs, render_prompt
    from fewshot_personalize.kernels.demo.vae_training import fit_decoder, to_pixels

    specs = prompt_specs(concept)
    renders = [render_prompt(concept, specs[i % len(specs)], seed=50000 + i)[:2] for i in range(400)]
    x = to_pixels(np.stack([np.asarray(im) for im, _ in renders]))
    w = 1 + 4 * torch.from_numpy(np.stack([m for _, m in renders])).unsqueeze(1).float()
    fit_decoder(vae, x, w, steps)


def main(argv=None) -> None:
    from diffusers import AutoencoderKL

    from fewshot_personalize.kernels.demo.evaluator import Evaluator
    from fewshot_personalize.kernels.demo.pretrain import render_dataset
    from fewshot_personalize.kernels.demo.vae_quality import vae_report
    from fewshot_personalize.kernels.demo.vae_training import decoder_parameters, train_decoder
    from fewshot_personalize.kernels.demo.vae_widening import widen_vae
    from fewshot_personalize.kernels.demo.world_patterns import ALL_PATTERNS

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("vae")
    ap.add_argument("out")
    ap.add_argument("--minutes", type=float, default=15)
    ap.add_argument("--widen", type=int, default=1, help="widen every block this many times first (Net2WiderNet)")
    ap.add_argument("--pattern-share", type=float, default=0.0, help="share of objects with any world pattern")
    ap.add_argument("--prefer-shape", type=float, default=0.0, help="faces on toys, marks on boxes first")
    ap.add_argument("--images", type=int, default=8000)
    ap.add_argument("--probe", help="train on this concept's renders only (a probe)")
    ap.add_argument("--steps", type=int, default=1000, help="--probe's steps")
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    ev = Evaluator.load()
    vae = AutoencoderKL.from_pretrained(a.vae, use_safetensors=True).eval()
    if a.widen > 1:
        vae = widen_vae(vae, a.widen)
    curve = [_row("start", 0, vae_report(ev, vae))]
    record = {"date": time.strftime("%Y-%m-%d"), "torch": torch.__version__, **vars(a), "curve": curve}

    def write() -> None:
        with open(a.out + ".json", "w") as f:
            json.dump(record, f, indent=1)

    write()
    if a.probe:
        _probe(vae, a.probe, a.steps)
        curve.append(_row("probe", a.steps, vae_report(ev, vae)))
    else:
        images, _, masks = render_dataset(a.images, seed=5, pattern_share=a.pattern_share, patterns=ALL_PATTERNS,
                                          prefer_shape=a.prefer_shape)

        def measure(done_s: float, steps: int, losses) -> None:
            vae.eval()
            curve.append(_row(f"{done_s / 60:.0f} min", steps, vae_report(ev, vae)))
            write()
            vae.post_quant_conv.train()
            vae.decoder.train()

        opt = torch.optim.AdamW(decoder_parameters(vae), lr=5e-4, weight_decay=0.0)
        train_decoder(vae, opt, images, masks, budget_s=a.minutes * 60, done_s=0, seed=1, checkpoint_every_s=450,
                      on_checkpoint=measure)
    write()
    vae.save_pretrained(a.out)
    print(json.dumps(curve[-1], indent=1))


if __name__ == "__main__":
    main()
