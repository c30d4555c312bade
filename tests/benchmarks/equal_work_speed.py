"""Seconds per training step and peak memory at equal work: our trainer against ComfyUI's TrainLoraNode and
diffusers' DreamBooth-LoRA recipe, and all of them against the floor (the frozen UNet's own forward + backward).

Two UNet implementations are in play, so every comparison stays on one of them:

* ComfyUI's UNet (our diffusers-folder loader builds ComfyUI MODEL / CLIP / VAE objects): ``comfy-floor``,
  ``ours-node-all`` (FSP_TrainConcept with ``lora_layers='all'``: every linear layer and convolution),
  ``trainlora`` (ComfyUI's TrainLoraNode, which adapts every weight matrix with a LoRA and every bias / norm weight
  with a difference vector), ``ours-node-attention`` (the node's default placement, for reference);
* diffusers' UNet2DConditionModel: ``diffusers-floor``, ``ours-cli`` (the command line's engine, attention
  projections), ``recipe`` (the training step of diffusers' ``examples/dreambooth/train_dreambooth_lora.py``,
  rewritten here: peft LoRA on to_q/k/v/out.0 via ``unet.add_adapter``, VAE encode and text encode every step,
  noise, MSE on ε, backward, grad-norm clip, AdamW), ``recipe-cached`` (the same step with the latents and the
  prompt's embedding computed once, i.e. only the training work; the script's ``--pre_compute_text_embeddings``
  does the text half).

Equal settings everywhere: batch 1, LoRA rank 4, fp32 weights and compute (set explicitly on every contender), AdamW lr 1e-4, no prior
preservation, UNet only, no gradient checkpointing. The floor is one step's forward + backward of the frozen UNet
with gradients to its input only (no parameter gradients, no optimizer), on the same batch.

Per-step time = (time of a ``--long``-step run − time of a ``--short``-step run) / the step difference, so set-up
(cloning, adapter creation, VAE encoding of the training images) cancels; contenders alternate within each
repeat (order rotated), the median of ``--repeats`` is reported. Peak memory, measured first (before this process
loads anything): each contender alone in a fresh child process (``--short`` steps): the RSS after loading the
model (every weight read once), and the peak RSS while training (Linux: the peak is reset after loading through
``/proc/self/clear_refs``, then read from ``VmHWM``).

Model sizes: ``--model tiny`` (the test suite's tiny SD1, 32 px) or ``--model sd15`` (SD1.5's real UNet, text
encoder and VAE layer sizes built from their configs with random weights; the tokenizer's vocabulary is the
test word list, so the embedding table is small; nothing downloaded) at ``--resolution`` (256 by default).

Not a test (no assertions). Run (1 torch thread by default, for steady numbers on a shared CPU):
    COMFYUI_PATH=/path/to/ComfyUI python tests/benchmarks/equal_work_speed.py --model sd15 --resolution 256
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

COMFY = os.environ.get("COMFYUI_PATH")
if not COMFY:
    sys.exit("set COMFYUI_PATH to a ComfyUI checkout")
sys.path.insert(0, COMFY)
sys.path.insert(0, str(Path(__file__).parent))
from comfy.cli_args import args  # noqa: E402

args.cpu = True
import utils.extra_config  # noqa: E402,F401
import utils.install_util  # noqa: E402,F401

import torch  # noqa: E402

from comfyui_train_speed import trainlora_runner  # noqa: E402

PROMPT = "a photo of sks toy"
RANK, LR = 4, 1e-4
COMFY_SIDE = ("comfy-floor", "ours-node-all", "trainlora", "ours-node-attention")
DIFFUSERS_SIDE = ("diffusers-floor", "ours-cli", "recipe", "recipe-cached")


def build_sd15(out_dir: Path, seed: int = 0) -> Path:
    """A diffusers folder with SD1.5's layer sizes (UNet 320/640/1280/1280 × 2 layers, 8 heads, cross-attention
    768; CLIP ViT-L/14 text tower: 12 layers × 768; the SD VAE 128/256/512/512) and random weights."""
    from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from fewshot_personalize.kernels.testing.tiny_models import TINY_WORDS, _scheduler
    from fewshot_personalize.kernels.testing.word_tokenizer import write_clip_tokenizer

    if (out_dir / "model_index.json").is_file():
        return out_dir
    torch.manual_seed(seed)
    with tempfile.TemporaryDirectory() as tmp:
        ids = write_clip_tokenizer(TINY_WORDS, tmp)
        tokenizer = CLIPTokenizer.from_pretrained(tmp)
        text = CLIPTextModel(CLIPTextConfig(
            vocab_size=ids["vocab_size"], hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
            num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768,
            bos_token_id=ids["bos_token_id"], eos_token_id=ids["eos_token_id"], pad_token_id=ids["pad_token_id"]))
        unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768, attention_head_dim=8,
                                    block_out_channels=(320, 640, 1280, 1280), layers_per_block=2)
        vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
                            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                            sample_size=512)
        pipe = StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=tokenizer, unet=unet,
                                       scheduler=_scheduler("epsilon"), safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False)
        pipe.save_pretrained(str(out_dir), safe_serialization=True)
    return out_dir


def model_folder(kind: str, work: Path) -> Path:
    from fewshot_personalize.kernels.testing.tiny_models import build_tiny_sd

    folder = work / kind
    if kind == "sd15":
        return build_sd15(folder)
    if not (folder / "model_index.json").is_file():
        build_tiny_sd(folder)
    return folder


def comfy_contenders(folder: Path, res: int, names, loaded: list | None = None) -> dict:
    """{name: run(steps) -> (seconds, trainable parameters)} on ComfyUI's UNet; the loaded modules are appended
    to ``loaded``."""
    import nodes as comfy_nodes  # ComfyUI's

    asyncio.run(comfy_nodes.init_extra_nodes(init_custom_nodes=False, init_api_nodes=False))
    from comfy_extras.nodes_train import TrainLoraNode

    from fewshot_personalize.nodes.backend.diffusers_loader import load_diffusers_folder
    from fewshot_personalize.nodes.backend.session import detach_inference_params
    from fewshot_personalize.nodes.train import TrainConcept

    with torch.inference_mode():
        model, clip, vae = load_diffusers_folder(str(folder))
        imgs = torch.rand(4, res, res, 3, generator=torch.Generator().manual_seed(0))
        latents = {"samples": vae.encode(imgs)}
        cond = clip.encode_from_tokens_scheduled(clip.tokenize(PROMPT))
    context = cond[0][0].clone()
    unet = model.model.diffusion_model
    if loaded is not None:
        loaded += [model.model, clip.cond_stage_model, vae.first_stage_model]

    def node(layers):
        def run(steps):
            t = time.perf_counter()
            with torch.inference_mode():
                out = TrainConcept.execute([model], [clip], [vae], [imgs], [PROMPT], [steps], [LR], [RANK], [False],
                                           [res], [1], [0], preview_steps=[0], lora_layers=[layers],
                                           precision=["fp32"])
            return time.perf_counter() - t, sum(w.down.numel() + w.up.numel() for w in out.args[2].weights.values())
        return run

    train_lora = trainlora_runner(TrainLoraNode, learning_rate=LR)

    def trainlora(steps):
        t = time.perf_counter()
        with torch.inference_mode():
            lora = train_lora(model, latents, cond, steps)
        return time.perf_counter() - t, sum(v.numel() for v in lora.values())

    def floor(steps):
        with torch.inference_mode(False), torch.enable_grad():
            detach_inference_params(unet)
            flags = {p: p.requires_grad for p in unet.parameters()}
            unet.requires_grad_(False)  # gradients to the activations only
            try:
                return _floor_steps(steps)
            finally:
                for p, flag in flags.items():
                    p.requires_grad_(flag)

    def _floor_steps(steps):
        g = torch.Generator().manual_seed(0)
        x0 = latents["samples"][:1].clone() * model.model.latent_format.scale_factor
        ctx = context.clone()
        t = time.perf_counter()
        for _ in range(steps):
            noise = torch.randn(x0.shape, generator=g)
            x = (x0 + noise).requires_grad_(True)
            ts = torch.randint(0, 1000, (1,), generator=g).float()
            torch.nn.functional.mse_loss(unet(x, ts, context=ctx), noise).backward()
        return time.perf_counter() - t, 0

    available = {"comfy-floor": floor, "ours-node-all": node("all"), "trainlora": trainlora,
                 "ours-node-attention": node("attention")}
    return {n: available[n] for n in names}


def diffusers_contenders(folder: Path, res: int, names, loaded: list | None = None) -> dict:
    """{name: run(steps) -> (seconds, trainable parameters)} on diffusers' UNet2DConditionModel; the loaded
    modules are appended to ``loaded``."""
    import torch.nn.functional as F
    from peft import LoraConfig

    from fewshot_personalize.kernels.backends.diffusers import DiffusersDenoiser, DiffusersTextEncoder, load_pipeline
    from fewshot_personalize.kernels.engine.config import TrainConfig
    from fewshot_personalize.kernels.engine.data import TrainData
    from fewshot_personalize.kernels.engine.loop import Trainer
    from fewshot_personalize.kernels.methods import DreamBoothLora, LoraSettings

    pipe = load_pipeline(str(folder))
    unet, vae, text, sched = pipe.unet, pipe.vae, pipe.text_encoder, pipe.scheduler
    for m in (unet, vae, text):
        m.requires_grad_(False)
    if loaded is not None:
        loaded += [unet, vae, text]
    pixels = torch.rand(4, 3, res, res, generator=torch.Generator().manual_seed(0)) * 2 - 1
    ids = pipe.tokenizer(PROMPT, padding="max_length", max_length=pipe.tokenizer.model_max_length, truncation=True,
                         return_tensors="pt").input_ids

    def ours(steps):
        t = time.perf_counter()
        cfg = TrainConfig(PROMPT, steps=steps, batch_size=1, resolution=res, lr=LR, dtype="fp32")
        with Trainer(DiffusersDenoiser(pipe), DiffusersTextEncoder(pipe), DreamBoothLora(LoraSettings(rank=RANK)),
                     TrainData(pixels), cfg) as trainer:
            trainer.train()
            n = sum(w.down.numel() + w.up.numel() for w in trainer.method.weights().values())
        return time.perf_counter() - t, n

    def recipe(cached: bool):
        """train_dreambooth_lora.py's step (its defaults: Adam betas 0.9/0.999, weight decay 1e-2, eps 1e-8,
        max_grad_norm 1, gaussian LoRA init, lora_alpha = rank)."""
        def run(steps):
            t0 = time.perf_counter()
            unet.add_adapter(LoraConfig(r=RANK, lora_alpha=RANK, init_lora_weights="gaussian",
                                        target_modules=["to_k", "to_q", "to_v", "to_out.0"]), adapter_name="recipe")
            params = [p for p in unet.parameters() if p.requires_grad]
            opt = torch.optim.AdamW(params, lr=LR, betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8)
            g = torch.Generator().manual_seed(0)
            if cached:
                with torch.no_grad():
                    all_latents = vae.encode(pixels).latent_dist.sample(g) * vae.config.scaling_factor
                    hidden = text(ids)[0]
            unet.train()
            for step in range(steps):
                i = step % len(pixels)
                if cached:
                    model_input, states = all_latents[i:i + 1], hidden
                else:
                    model_input = vae.encode(pixels[i:i + 1]).latent_dist.sample(g) * vae.config.scaling_factor
                    states = text(ids)[0]
                noise = torch.randn(model_input.shape, generator=g)
                timesteps = torch.randint(0, sched.config.num_train_timesteps, (1,), generator=g).long()
                noisy = sched.add_noise(model_input, noise, timesteps)
                pred = unet(noisy, timesteps, states).sample
                loss = F.mse_loss(pred.float(), noise.float(), reduction="mean")
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                opt.step()
                opt.zero_grad()
            n = sum(p.numel() for p in params)
            unet.eval()
            unet.unload_lora()  # removes peft's wrappers too (delete_adapters would leave empty ones behind)
            return time.perf_counter() - t0, n
        return run

    def floor(steps):
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            x0 = vae.encode(pixels[:1]).latent_dist.mean * vae.config.scaling_factor
            states = text(ids)[0]
        t = time.perf_counter()
        for _ in range(steps):
            noise = torch.randn(x0.shape, generator=g)
            x = (x0 + noise).requires_grad_(True)
            ts = torch.randint(0, 1000, (1,), generator=g)
            F.mse_loss(unet(x, ts, states).sample, noise).backward()
        return time.perf_counter() - t, 0

    available = {"diffusers-floor": floor, "ours-cli": ours, "recipe": recipe(False), "recipe-cached": recipe(True)}
    return {n: available[n] for n in names}


def child(a) -> None:
    """One contender, ``--short`` steps, in this fresh process: RSS after loading (every weight read once, since
    safetensors files are memory-mapped and would otherwise only count once touched) and peak RSS while training."""
    folder, loaded = Path(a.folder), []
    side = comfy_contenders if a.child in COMFY_SIDE else diffusers_contenders
    runs = side(folder, a.resolution, [a.child], loaded)
    with torch.no_grad():
        for module in loaded:
            for t in [*module.parameters(), *module.buffers()]:
                t.sum()
    rss_loaded = _status_mb("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # Linux: reset the peak RSS (VmHWM) to the current RSS
    runs[a.child](a.short)
    print(json.dumps({"peak_rss_mb": _status_mb("VmHWM"), "rss_after_load_mb": rss_loaded}))


def _status_mb(field: str) -> float:
    """A memory field of /proc/self/status (VmRSS: now, VmHWM: peak since start or the last reset), in MB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", choices=["tiny", "sd15"], default="tiny")
    ap.add_argument("--resolution", type=int, help="pixels (default: 32 for tiny, 256 for sd15)")
    ap.add_argument("--repeats", type=int, default=3, help="timing repeats (0: memory only)")
    ap.add_argument("--short", type=int, default=2)
    ap.add_argument("--long", type=int, default=6)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--only", help="comma-separated contenders (default: all)")
    ap.add_argument("--no-memory", action="store_true", help="skip the peak-memory child processes")
    ap.add_argument("--work", default=str(Path(tempfile.gettempdir()) / "fsp_equal_work"),
                    help="where the random model folders are written (kept for reruns)")
    ap.add_argument("--json", help="also write the results here")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--folder", help=argparse.SUPPRESS)
    a = ap.parse_args()
    a.resolution = a.resolution or (32 if a.model == "tiny" else 256)
    torch.set_num_threads(a.threads)
    logging.basicConfig(level=logging.WARNING)
    if a.child:
        child(a)
        return
    folder = model_folder(a.model, Path(a.work))
    names = [n.strip() for n in a.only.split(",")] if a.only else list(COMFY_SIDE + DIFFUSERS_SIDE)
    memory = {}  # first, while this process holds no model
    if not a.no_memory:
        for n in names:
            out = subprocess.run([sys.executable, __file__, "--child", n, "--folder", str(folder), "--resolution",
                                  str(a.resolution), "--short", str(a.short), "--threads", str(a.threads)],
                                 capture_output=True, text=True, env=os.environ)
            lines = [x for x in out.stdout.splitlines() if x.startswith("{")]
            memory[n] = json.loads(lines[-1]) if lines else {"error": f"exit {out.returncode}: {out.stderr[-400:]}"}
            print(f"memory: {n:20s} {memory[n]}", flush=True)
    runs = {} if a.repeats == 0 else {**comfy_contenders(folder, a.resolution, [n for n in names if n in COMFY_SIDE]),
            **diffusers_contenders(folder, a.resolution, [n for n in names if n in DIFFUSERS_SIDE])}
    per_step: dict[str, list[float]] = {n: [] for n in names}
    params: dict[str, int] = {}
    for r in range(a.repeats):
        order = names[r % len(names):] + names[:r % len(names)]
        for n in order:
            t_short, _ = runs[n](a.short)
            t_long, params[n] = runs[n](a.long)
            per_step[n].append((t_long - t_short) / (a.long - a.short))
            print(f"repeat {r}: {n:20s} {per_step[n][-1]:.4f} s/step", flush=True)
    med = {n: statistics.median(v) for n, v in per_step.items() if v}
    info = {"model": a.model, "resolution": a.resolution, "threads": torch.get_num_threads(), "torch": torch.__version__,
            "comfyui": __import__("comfyui_version").__version__, "machine": platform.machine(),
            "cores": os.cpu_count(), "short": a.short, "long": a.long, "repeats": a.repeats}
    print(f"\n{json.dumps(info)}")
    print("| contender | s/step (median) | × floor | all repeats | trainable parameters | RSS after load (MB) | peak RSS training (MB) |")
    print("|---|---:|---:|---|---:|---:|---:|")
    for n in names:
        floor = med.get("comfy-floor" if n in COMFY_SIDE else "diffusers-floor")
        mem = memory.get(n, {})
        if n not in med:
            continue
        print(f"| {n} | {med[n]:.4f} | {med[n] / floor if floor else float('nan'):.2f} | "
              f"{', '.join(f'{x:.4f}' for x in per_step[n])} | {params.get(n, 0):,} | "
              f"{mem.get('rss_after_load_mb', float('nan')):.0f} | {mem.get('peak_rss_mb', float('nan')):.0f} |")
    for a_, b_ in (("ours-node-all", "trainlora"), ("ours-cli", "recipe"), ("ours-cli", "recipe-cached")):
        if a_ in med and b_ in med:
            print(f"ratio {a_} / {b_}: {med[a_] / med[b_]:.2f}")
    if a.json:
        Path(a.json).write_text(json.dumps({"info": info, "per_step": per_step, "median": med, "params": params,
                                            "memory": memory}, indent=1))


if __name__ == "__main__":
    main()
