"""Two objects in one image through ComfyUI's stock KSampler: the graph's Apply regional sampling against the library
numbers of region_layout.py, on the same demo model and captions.

The demo model is loaded as ComfyUI objects (nodes.backend.diffusers_loader), each caption encoded with ComfyUI's
CLIP; regions: Region prompt ×2 (each object's phrase with the context, left / right half) → Apply regional sampling
(regions; layout 0.4 with region attention off; both); the stock ``common_ksampler`` (euler, normal, 20 steps,
cfg 4, the example workflow's settings; seed 1000 + i) and the VAE decode; scored with model_quality's
both-objects-right.

Not a test (no assertions). Run:
    COMFYUI_PATH=/path/to/ComfyUI /path/to/comfy-venv/bin/python tests/benchmarks/comfyui_region_layout.py
        [--captions 80] [--out-dir tests/benchmarks]
Writes comfyui_region_layout.{md,json}.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import sys
import time
from pathlib import Path

COMFY = os.environ.get("COMFYUI_PATH")
if not COMFY:
    sys.exit("set COMFYUI_PATH to a ComfyUI checkout")
sys.path.insert(0, os.path.abspath(COMFY))
from comfy.cli_args import args  # noqa: E402

args.cpu = True
args.fp32_text_enc = True
import utils.extra_config  # noqa: E402,F401
import utils.install_util  # noqa: E402,F401

import numpy as np  # noqa: E402
import torch  # noqa: E402

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from region_layout import object_prompts  # noqa: E402  (the library benchmark's region prompts)
SETTINGS = [("plain (no regions)", None), ("regions (Mix-of-Show 3.4)", {"layout": 0.0, "region_attention": True}),
            ("layout 0.4", {"layout": 0.4, "region_attention": False}),
            ("layout 0.4 + regions", {"layout": 0.4, "region_attention": True})]
STEPS, CFG = 20, 4.0


def comfyui_version() -> str:
    try:
        from comfyui_version import __version__

        return __version__
    except ImportError:
        return "unknown"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--captions", type=int, default=80)
    ap.add_argument("--out-dir", type=Path, default=HERE)
    a = ap.parse_args()
    torch.set_num_threads(1)
    import nodes as comfy_nodes  # ComfyUI's

    from PIL import Image

    from fewshot_personalize.kernels.demo.evaluator import Evaluator
    from fewshot_personalize.kernels.demo.model import RESOLUTION, demo_model_path
    from fewshot_personalize.kernels.demo.model_quality import both_objects_right, two_object_scenes
    from fewshot_personalize.nodes.backend.diffusers_loader import load_diffusers_folder
    from fewshot_personalize.nodes.regional import ApplyRegions, RegionPromptNode

    asyncio.run(comfy_nodes.init_extra_nodes(init_custom_nodes=False, init_api_nodes=False))
    start = time.perf_counter()
    with torch.inference_mode():
        model, clip, vae = load_diffusers_folder(demo_model_path())
    ev = Evaluator.load()

    def encode(text: str):
        with torch.inference_mode():
            cond, pooled = clip.encode_from_tokens(clip.tokenize(text), return_pooled=True)
        return [[cond, {"pooled_output": pooled}]]

    scenes = two_object_scenes(a.captions, 0)
    captions = [s.caption() for s in scenes]
    size, half = RESOLUTION, RESOLUTION // 2
    negative = encode("")
    rows = []
    for name, options in SETTINGS:
        t = time.perf_counter()
        images = []
        for i, (scene, caption) in enumerate(zip(scenes, captions)):
            m, positive = model, encode(caption)
            with torch.inference_mode():
                if options is not None:
                    phrases = object_prompts(scene)
                    left = RegionPromptNode.execute(encode(phrases[0]), 0, 0, half, size, size, size).args[0]
                    both = RegionPromptNode.execute(encode(phrases[1]), half, 0, size, size, size, size,
                                                    regions=left).args[0]
                    m, positive = ApplyRegions.execute(model, positive, both, **options).args
                side = size // vae.downscale_ratio
                latent = torch.zeros(1, vae.latent_channels, side, side)
                samples = comfy_nodes.common_ksampler(m, 1000 + i, STEPS, CFG, "euler", "normal", positive, negative,
                                                      {"samples": latent})[0]["samples"]
                pixels = vae.decode(samples)[0].clamp(0, 1).cpu().numpy()
            images.append(Image.fromarray((pixels * 255).round().astype(np.uint8)))
        score = both_objects_right(ev, images, captions)
        rows.append({"setting": name, **(options or {}), **score, "seconds": time.perf_counter() - t})
        print(f"{name}: both right {score['both']:.1%} ({time.perf_counter() - t:.0f} s)", flush=True)
    library = json.loads((HERE / "region_layout.json").read_text())
    by_name = {r["setting"]: r for r in library["rows"]}
    record = {"date": time.strftime("%Y-%m-%d"), "comfyui": comfyui_version(), "torch": torch.__version__,
              "machine": f"{platform.machine()}, 1 thread", "captions": len(captions),
              "sampler": f"euler, normal, {STEPS} steps, cfg {CFG}", "rows": rows,
              "seconds": time.perf_counter() - start}
    lines = [f"Two objects in one image through ComfyUI {record['comfyui']}'s stock KSampler "
             f"({record['sampler']}; tests/benchmarks/comfyui_region_layout.py): {len(captions)} two-object captions of "
             f"model_quality on the demo model, one sample each; {record['machine']}, torch {record['torch']}, "
             f"{record['date']}, {record['seconds'] / 60:.0f} min. Beside it, the library's numbers "
             "(region_layout.md: diffusers, the demo's DPM-Solver 20 steps, guidance 4).", "",
             "| setting | ComfyUI: both objects right | objects right | library: both objects right |",
             "|---|---:|---:|---:|"]
    for r in rows:
        lib = by_name.get(r["setting"])
        library_both = "—" if lib is None else f"{100 * lib['both']:.1f} %"
        lines.append(f"| {r['setting']} | {100 * r['both']:.1f} % | {100 * r['objects']:.1f} % | {library_both} |")
    a.out_dir.mkdir(parents=True, exist_ok=True)
    (a.out_dir / "comfyui_region_layout.md").write_text("\n".join(lines) + "\n")
    (a.out_dir / "comfyui_region_layout.json").write_text(json.dumps(record, indent=1))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
