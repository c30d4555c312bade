"""Tiny SD1-like, SD2-like (v-prediction) and SDXL-like diffusers pipelines built in code.

No weights can be downloaded where this project is tested, so engine tests (and anyone who wants to try
the command line without a real checkpoint) build these from config and save them as ordinary diffusers
folders (``model_index.json`` + safetensors). They have the real architectures (UNet2DConditionModel with
cross-attention, CLIP text encoder(s), AutoencoderKL) at toy widths.
"""

from __future__ import annotations

import os
import tempfile

import torch

from .word_tokenizer import write_clip_tokenizer

TINY_WORDS = (
    "a an the photo of in on at with and sks xyz toy dog cat ball box kite backpack teapot red blue green "
    "yellow small big beach snow grass night city background"
).split()


def _scheduler(prediction_type: str):
    from diffusers import DDPMScheduler

    return DDPMScheduler(
        num_train_timesteps=1000,
        beta_schedule="scaled_linear",
        beta_start=0.00085,
        beta_end=0.012,
        prediction_type=prediction_type,
        clip_sample=False,
    )


def _vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(32, 32),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=32,
        sample_size=32,
    )


def _text_encoder(tok_ids: dict, hidden: int, with_projection: bool = False, hidden_act: str = "quick_gelu"):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        vocab_size=tok_ids["vocab_size"],
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        hidden_act=hidden_act,
        projection_dim=hidden,
        bos_token_id=tok_ids["bos_token_id"],
        eos_token_id=tok_ids["eos_token_id"],
        pad_token_id=tok_ids["pad_token_id"],
    )
    cls = CLIPTextModelWithProjection if with_projection else CLIPTextModel
    return cls(config)


def _tokenizer(words, directory: str):
    from transformers import CLIPTokenizer

    ids = write_clip_tokenizer(words, directory)
    return CLIPTokenizer.from_pretrained(directory), ids


def build_tiny_sd(
    out_dir: str | os.PathLike,
    *,
    prediction_type: str = "epsilon",
    seed: int = 0,
    words=TINY_WORDS,
) -> str:
    """Write a tiny SD1.x-style (``prediction_type='epsilon'``) or SD2.x-style (``'v_prediction'``) pipeline; the
    SD2 one's text encoder uses GELU like OpenCLIP-H, which is what tells it apart at toy width (real SD2 is also
    1024 wide); ComfyUI's loader of these folders reads it as an SD1 UNet predicting v."""
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    torch.manual_seed(seed)
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer, ids = _tokenizer(words, tmp)
        text_encoder = _text_encoder(ids, 32, hidden_act="gelu" if prediction_type == "v_prediction" else "quick_gelu")
        unet = UNet2DConditionModel(
            sample_size=16,
            in_channels=4,
            out_channels=4,
            block_out_channels=(32, 64),
            layers_per_block=1,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=32,
            attention_head_dim=8,
            norm_num_groups=32,
        )
        pipe = StableDiffusionPipeline(
            vae=_vae(),
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            unet=unet,
            scheduler=_scheduler(prediction_type),
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
        pipe.save_pretrained(str(out_dir), safe_serialization=True)
    return str(out_dir)


def build_tiny_sdxl(out_dir: str | os.PathLike, *, seed: int = 0, words=TINY_WORDS) -> str:
    """Write a tiny SDXL-style pipeline: two text encoders (the second with projection, giving the pooled
    embedding), ``addition_embed_type='text_time'`` UNet conditioning on pooled text + 6 time ids."""
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel

    torch.manual_seed(seed)
    time_embed_dim = 8
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer, ids = _tokenizer(words, os.path.join(tmp, "t1"))
        tokenizer_2, _ = _tokenizer(words, os.path.join(tmp, "t2"))
        te1 = _text_encoder(ids, 32)
        te2 = _text_encoder(ids, 32, with_projection=True)
        unet = UNet2DConditionModel(
            sample_size=16,
            in_channels=4,
            out_channels=4,
            block_out_channels=(32, 64),
            layers_per_block=1,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            cross_attention_dim=64,
            attention_head_dim=(4, 8),
            transformer_layers_per_block=(1, 2),
            addition_embed_type="text_time",
            addition_time_embed_dim=time_embed_dim,
            projection_class_embeddings_input_dim=32 + 6 * time_embed_dim,
            use_linear_projection=True,
            norm_num_groups=32,
        )
        pipe = StableDiffusionXLPipeline(
            vae=_vae(),
            text_encoder=te1,
            text_encoder_2=te2,
            tokenizer=tokenizer,
            tokenizer_2=tokenizer_2,
            unet=unet,
            scheduler=_scheduler("epsilon"),
        )
        pipe.save_pretrained(str(out_dir), safe_serialization=True)
    return str(out_dir)
