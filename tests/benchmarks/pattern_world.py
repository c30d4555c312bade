"""Would the demo model learn unseen patterned concepts if its world had patterns? (issue 13 §1, exploratory.)

The base world draws flat-coloured objects only, so the demo UNet has never drawn a pattern, and a concept made of
one (the held-out striped ball of heldout_concept.py) has to be taught from nothing by a rank-4 LoRA in 400 steps.
Real text-to-image models know stripes, dots and checks before anyone personalizes them. This script fine-tunes the
demo model's UNet and text encoder (from a model folder, v-prediction on zero terminal SNR, as it was pretrained) on
freshly rendered world scenes in which each object, with probability ``--share``, carries a random two-colour
pattern (kernels/demo/world_patterns.py: checker, two-tone, stripes, dots; captions do not name them; the exact
class + pattern + colour pair of every bundled concept and of the held-out striped ball excluded, so no concept is
ever shown, only the vocabulary it is made of). The VAE is the folder's, unchanged (its encoder gives
the same latent space). Writes a demo-architecture model folder to ``--out`` (outside the repository), which
``model_quality --model`` and ``FEWSHOT_DEMO_MODEL=… python tests/benchmarks/heldout_concept.py`` then measure;
results are recorded in pattern_world.md.

    python tests/benchmarks/pattern_world.py --out DIR [--model kernels/demo/weights/model] [--share 0.4]
        [--minutes 45] [--lr 3e-4] [--scenes 32000] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import time
from pathlib import Path

import torch

from fewshot_personalize.kernels.demo.model import MODEL_DIR, build_scheduler
from fewshot_personalize.kernels.demo.pretrain import encode_all, render_dataset
from fewshot_personalize.kernels.demo.unet_training import caption_ids, make_optimizer, train_unet, with_ema

log = logging.getLogger(__name__)


def main(argv=None) -> None:
    from diffusers import AutoencoderKL, StableDiffusionPipeline

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, required=True, help="model folder to write (must not exist)")
    ap.add_argument("--model", type=Path, default=MODEL_DIR)
    ap.add_argument("--share", type=float, default=0.4)
    ap.add_argument("--minutes", type=float, default=45)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--scenes", type=int, default=32000)
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args(argv)
    if a.out.exists():
        raise SystemExit(f"--out {a.out} exists; choose a new folder")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(a.threads)
    t0 = time.perf_counter()
    images, captions, _ = render_dataset(a.scenes, 4242, pattern_share=a.share)
    log.info("rendered %d scenes in %.0f s", a.scenes, time.perf_counter() - t0)
    pipe = StableDiffusionPipeline.from_pretrained(str(a.model), use_safetensors=True, safety_checker=None,
                                                   requires_safety_checker=False)
    vae: AutoencoderKL = pipe.vae.eval()
    latents = (encode_all(vae, images) * vae.config.scaling_factor).contiguous()
    del images
    nets = with_ema(pipe.unet, pipe.text_encoder)
    text_lr = a.lr * 0.4  # the pretraining's UNet : text ratio (5e-4 : 2e-4)
    ids, empty_ids = caption_ids(pipe.tokenizer, captions)
    schedule = build_scheduler("v-zero-snr")
    stats = train_unet(nets, make_optimizer(pipe.unet, pipe.text_encoder, a.lr, text_lr), schedule.alphas_cumprod,
                       latents, ids, empty_ids, budget_s=a.minutes * 60, done_s=0, done_steps=1000, seed=77,
                       base_lrs=(a.lr, text_lr), cooldown=0.3,
                       prediction_type="v_prediction")  # done_steps: past the warm-up of a fresh run
    pipe.unet, pipe.text_encoder = nets["ema_unet"], nets["ema_text"]
    pipe.save_pretrained(str(a.out), safe_serialization=True)
    shutil.copy(a.model / "pretrain_log.json", a.out / "pretrain_log.json")
    (a.out / "pattern_world.json").write_text(json.dumps(
        {"from": str(a.model), "share": a.share, "minutes": a.minutes, "lr": a.lr, "scenes": a.scenes,
         "threads": a.threads, "torch": torch.__version__, **stats}, indent=1))
    log.info("%d steps → %s", stats["steps"], a.out)


if __name__ == "__main__":
    main()
