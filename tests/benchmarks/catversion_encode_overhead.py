"""CatVersion's encode overhead: a prompt encoded by CLIP with K/V tokens concatenated in its last 3 layers, against
plain CLIP encode of the same prompt (goal: ≤ 3 % more time). Recorded, not asserted.

Two text encoders, both built in code (no downloads): the demo model's CLIP (4 layers × 128) and one shaped like
SD1.5's CLIP-L (12 layers × 768, 12 heads, random weights: speed does not depend on the values). Timings are
interleaved (plain, adapter, plain, …) and summarised by the median, so drift of a shared CPU hits both alike.

    python tests/benchmarks/catversion_encode_overhead.py   # writes catversion_encode_overhead.md beside it
"""

from __future__ import annotations

import platform
import statistics
import time
from pathlib import Path

import torch

PROMPT = "a photo of a toy on the beach at night"


class _Pipe:
    """The parts of a pipeline the diffusers TextEncoder seam reads."""

    def __init__(self, tokenizer, text_encoder):
        self.tokenizer, self.text_encoder, self.text_encoder_2 = tokenizer, text_encoder, None
        self.unet = type("U", (), {"config": type("C", (), {"cross_attention_dim": text_encoder.config.hidden_size})})()
        self.scheduler = type("S", (), {"config": {"prediction_type": "epsilon"}})()


def clip_l_like(tokenizer):
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    return CLIPTextModel(CLIPTextConfig(vocab_size=tokenizer.vocab_size + 2, hidden_size=768, intermediate_size=3072,
                                        num_hidden_layers=12, num_attention_heads=12, max_position_embeddings=77,
                                        hidden_act="quick_gelu", bos_token_id=tokenizer.bos_token_id,
                                        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id))


def measure(pipe, repeats: int) -> dict:
    from fewshot_personalize.kernels.adapters.kv_concat import init_kv_tokens
    from fewshot_personalize.kernels.backends.diffusers import DiffusersTextEncoder
    from fewshot_personalize.kernels.methods.catversion import default_layers

    text = DiffusersTextEncoder(pipe, family="sd1")
    enc = text.encoders[0]
    tokens = {0: {i: init_kv_tokens(1, enc.width) for i in default_layers(enc)}}
    plain, adapted = [], []
    with torch.no_grad():
        for _ in range(5):
            text.encode([PROMPT])
        for _ in range(repeats):
            t = time.perf_counter()
            text.encode([PROMPT])
            plain.append(time.perf_counter() - t)
            handle = text.install_kv_tokens(tokens)
            t = time.perf_counter()
            text.encode([PROMPT])
            adapted.append(time.perf_counter() - t)
            handle.remove()
    p, a = statistics.median(plain), statistics.median(adapted)
    return {"layers": f"{enc.num_layers} × {enc.width}", "kv_layers": list(default_layers(enc)), "plain_ms": 1e3 * p,
            "catversion_ms": 1e3 * a, "overhead_pct": 100 * (a - p) / p}


def main() -> None:
    from fewshot_personalize.kernels.backends.diffusers import load_pipeline
    from fewshot_personalize.kernels.demo.model import demo_model_path

    torch.set_num_threads(2)
    demo = load_pipeline(str(demo_model_path()))
    rows = [("demo model CLIP", measure(demo, 300)),
            ("SD1.5 CLIP-L shape (random weights)", measure(_Pipe(demo.tokenizer, clip_l_like(demo.tokenizer)), 100))]
    lines = [f"CatVersion encode overhead, one prompt ({PROMPT!r}), 1 K/V token in the default layers, fp32, torch "
             f"{torch.__version__}, {platform.machine()}, 2 threads; median of interleaved runs "
             f"({time.strftime('%Y-%m-%d')}).", "",
             "| text encoder | layers | K/V layers | plain encode (ms) | with CatVersion (ms) | overhead |",
             "|---|---|---|---:|---:|---:|"]
    for name, r in rows:
        lines.append(f"| {name} | {r['layers']} | {r['kv_layers']} | {r['plain_ms']:.2f} | {r['catversion_ms']:.2f} | "
                     f"{r['overhead_pct']:+.1f} % |")
    text = "\n".join(lines) + "\n"
    (Path(__file__).parent / "catversion_encode_overhead.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
