"""The demo base model: a small SD1-style text-to-image model of the demo world, shipped with the project.

Architecture (diffusers classes, so every back end reads it like a real SD1.x folder): an AutoencoderKL with 4×
downsampling (64×64×3 pixels ↔ 16×16×8 latents for demo model 2, which pretrain.py builds from these configs;
the shipped folder's own config.json files describe the weights it holds), a UNet2DConditionModel with
cross-attention at 16×16 and 8×8,
and a CLIP text encoder whose byte-level BPE tokenizer (kernels/word_tokenizer.py) knows the world's words plus
rare identifier words (``sks``, ``xyz``, ``zwx``, ``qrt``) that never occur in pretraining captions.
Pretrained on CPU by kernels/demo/pretrain.py (its log lies beside the weights).
"""

from __future__ import annotations

import os
from pathlib import Path

from ..core.errors import UserInputError

WEIGHTS_DIR = Path(__file__).parent / "weights"
MODEL_DIR = WEIGHTS_DIR / "model"
RESOLUTION = 64

#: caption combinations never shown in pretraining; the model's quality is measured on them
HOLDOUT = (
    {"cls": "kite", "context": "snow"},
    {"cls": "ball", "colour": "purple"},
    {"cls": "box", "context": "night"},
    {"cls": "toy", "colour": "orange"},
    {"colour": "yellow", "context": "grass"},
)

UNET_CONFIG = dict(
    sample_size=16,
    in_channels=4,
    out_channels=4,
    block_out_channels=(32, 64, 128),
    layers_per_block=1,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    mid_block_type="UNetMidBlock2DCrossAttn",
    cross_attention_dim=128,
    attention_head_dim=4,
    norm_num_groups=32,
)
VAE_CONFIG = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 3,
    up_block_types=("UpDecoderBlock2D",) * 3,
    block_out_channels=(32, 32, 64),
    layers_per_block=1,
    latent_channels=8,  # demo model 2 (model 1: 4)
    norm_num_groups=8,  # model 1: 32, i.e. one channel per group, which normalises away each map's mean
    sample_size=RESOLUTION,
)
TEXT_CONFIG = dict(hidden_size=128, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
                   max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=128)


def demo_model_path() -> Path:
    """The shipped demo model folder; a clear error if it is missing (e.g. a checkout without the weights)."""
    override = os.environ.get("FEWSHOT_DEMO_MODEL")
    path = Path(override) if override else MODEL_DIR
    if not (path / "model_index.json").is_file():
        raise UserInputError(f"the demo model is missing ({path}); build it with "
                             "`python -m fewshot_personalize.kernels.demo.pretrain`")
    return path


#: noise schedules of the demo model: SD1's scaled-linear betas, trained as ε-prediction (demo model 1, and model 2
#: up to 27,611 steps), or rescaled to zero terminal SNR with v-prediction (Lin et al., "Common diffusion noise
#: schedules and sample steps are flawed", WACV 2024, §3.1–3.3: at ᾱ_T = 0.0047 a model learns to read each latent
#: channel's mean from x_T and draws washed-out scenes from pure noise; tests/benchmarks/terminal_snr.md)
SCHEDULES = {"epsilon": {"prediction_type": "epsilon"},
             "v-zero-snr": {"prediction_type": "v_prediction", "rescale_betas_zero_snr": True,
                            "timestep_spacing": "trailing"}}
DEFAULT_SCHEDULE = "v-zero-snr"


def build_scheduler(schedule: str = DEFAULT_SCHEDULE):
    """The DDPM training schedule ``schedule`` (a key of :data:`SCHEDULES`)."""
    from diffusers import DDPMScheduler

    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {sorted(SCHEDULES)}, got {schedule!r}")
    return DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                         clip_sample=False, **SCHEDULES[schedule])


def build_untrained(tokenizer_dir: str | os.PathLike, seed: int = 0, latent_channels: int | None = None,
                    schedule: str = DEFAULT_SCHEDULE):
    """Fresh (random) UNet, VAE, text encoder, tokenizer and DDPM schedule of the demo architecture
    (``latent_channels``: another latent width than :data:`VAE_CONFIG`'s, for measuring alternatives)."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from ..testing.word_tokenizer import write_clip_tokenizer
    from .world import all_words

    ids = write_clip_tokenizer(all_words(), tokenizer_dir)
    torch.manual_seed(seed)
    channels = latent_channels or VAE_CONFIG["latent_channels"]
    unet = UNet2DConditionModel(**(UNET_CONFIG | {"in_channels": channels, "out_channels": channels}))
    vae = AutoencoderKL(**(VAE_CONFIG | {"latent_channels": channels}))
    text = CLIPTextModel(CLIPTextConfig(vocab_size=ids["vocab_size"], bos_token_id=ids["bos_token_id"],
                                        eos_token_id=ids["eos_token_id"], pad_token_id=ids["pad_token_id"], **TEXT_CONFIG))
    tokenizer = CLIPTokenizer.from_pretrained(str(tokenizer_dir))
    return unet, vae, text, tokenizer, build_scheduler(schedule)
