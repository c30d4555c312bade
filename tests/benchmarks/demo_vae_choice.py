"""Which VAE for demo model 2: train a variant for a time budget with the pretraining's own VAE stage
(kernels/demo/vae_training.py) and measure what it keeps (kernels/demo/vae_quality.py). Recorded, not asserted;
the table of the runs made so far is demo_vae_choice.md beside this file.

    python tests/benchmarks/demo_vae_choice.py NAME --minutes 15 --channels 8 --groups 8 [--init VAE_FOLDER]
        [--images 8000] [--threads 1] [--out DIR]   # writes DIR/vae_NAME (weights) and DIR/vae_NAME.json

Runs compared with each other must share the machine's load (start them together) or be compared at equal steps:
the budget is in seconds, so a busier CPU gives fewer steps.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import torch


def main(argv=None) -> None:
    from diffusers import AutoencoderKL

    from fewshot_personalize.kernels.demo.evaluator import Evaluator
    from fewshot_personalize.kernels.demo.model import VAE_CONFIG
    from fewshot_personalize.kernels.demo.pretrain import render_dataset
    from fewshot_personalize.kernels.demo.vae_quality import vae_report
    from fewshot_personalize.kernels.demo.vae_training import train_vae

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("name")
    ap.add_argument("--minutes", type=float, default=15)
    ap.add_argument("--channels", type=int, default=VAE_CONFIG["latent_channels"])
    ap.add_argument("--groups", type=int, default=VAE_CONFIG["norm_num_groups"])
    ap.add_argument("--widths", default=",".join(map(str, VAE_CONFIG["block_out_channels"])))
    ap.add_argument("--init", help="start from this VAE folder instead of random weights")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--images", type=int, default=8000)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="vae_choice")
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(a.threads)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    images, _, masks = render_dataset(a.images, 0)
    if a.init:
        vae = AutoencoderKL.from_pretrained(a.init)
    else:
        torch.manual_seed(0)
        vae = AutoencoderKL(**(VAE_CONFIG | {"latent_channels": a.channels, "norm_num_groups": a.groups,
                                             "block_out_channels": tuple(int(w) for w in a.widths.split(","))}))
    opt = torch.optim.AdamW(vae.parameters(), lr=a.lr, weight_decay=0.0)
    stats = train_vae(vae, opt, images, masks, budget_s=a.minutes * 60, done_s=0, seed=0, lr=a.lr)
    for p in vae.parameters():
        p.requires_grad_(False)
    vae.save_pretrained(str(out / f"vae_{a.name}"))
    report = vae_report(Evaluator.load(), vae)
    report["train"] = {"steps": stats["steps"], "seconds": stats["seconds"], "date": time.strftime("%Y-%m-%d"),
                       **{k: getattr(a, k) for k in ("channels", "groups", "widths", "init", "lr", "images", "threads")}}
    (out / f"vae_{a.name}.json").write_text(json.dumps(report, indent=1))
    print(json.dumps({"min_ratio": report["min_ratio"], "min_pattern_ratio": report["min_pattern_ratio"], "colour": report["colour"]["mean_error_per_channel"],
                      "steps": stats["steps"]}))


if __name__ == "__main__":
    main()
