"""ComfyUI MODEL / CLIP / VAE objects built in code from a diffusers SD1.x-style model folder.

ComfyUI detects checkpoints by their shapes and does not recognise small models (a UNet with 32 channels is
"no match"), so the demo model and the tiny test models are assembled here from their configs instead:

* UNet: ``UNet2DConditionModel`` config → an ``SD15`` model config subclass with the matching ``unet_config``;
  weights renamed diffusers → LDM with ComfyUI's own table (``comfy.utils.unet_to_diffusers``). The noise
  schedule comes from the folder's scheduler config, the latent scale from the VAE config.
* CLIP: ``comfy.sd1_clip.SDClipModel`` with the folder's text-encoder config, the folder's tokenizer
  (``vocab.json`` / ``merges.txt``) and the special tokens that tokenizer uses.
* VAE: ``AutoencoderKL`` config → ComfyUI's ``AutoencoderKL``; weights through ComfyUI's diffusers VAE
  conversion (whose table assumes 4 resolution levels; the decoder's level numbers are shifted for fewer).

Only SD1.x-style folders (one CLIP text encoder, no added conditioning) are read; anything else is refused
with a message. Nothing is downloaded and nothing is unpickled (safetensors only).
"""

from __future__ import annotations

import functools
import json
import logging
import os
import re
import tempfile
from pathlib import Path

import comfy.latent_formats
import comfy.model_base
import comfy.model_management
import comfy.model_patcher
import comfy.sd
import comfy.sd1_clip
import comfy.supported_models
import comfy.supported_models_base
import comfy.utils
import torch
from comfy import diffusers_convert

from ..kernels.errors import UserInputError

log = logging.getLogger(__name__)

_BETA_SCHEDULES = {"scaled_linear": "linear", "linear": "sqrt_linear", "squaredcos_cap_v2": "squaredcos_cap_v2"}


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise UserInputError(f"{path.parent.parent}: not a diffusers model folder ({path.relative_to(path.parent.parent)} is missing)")
    return json.loads(path.read_text())


def _read_weights(folder: Path) -> dict[str, torch.Tensor]:
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise UserInputError(f"{folder}: no .safetensors weights (pickled .bin files are not read)")
    sd = {}
    for f in files:
        sd.update(comfy.utils.load_torch_file(str(f), safe_load=True))
    return sd


def unet_config_from_diffusers(cfg: dict) -> dict:
    """ComfyUI ``unet_config`` of a diffusers ``UNet2DConditionModel`` config (SD1.x-style)."""
    if cfg.get("addition_embed_type") or cfg.get("class_embed_type"):
        raise UserInputError("only SD1.x/SD2.x-style UNets are supported by this loader (no added conditioning)")
    boc = list(cfg["block_out_channels"])
    levels = len(boc)
    if any(c % boc[0] for c in boc):
        raise UserInputError(f"block_out_channels {boc} are not multiples of the first one")
    lpb = cfg.get("layers_per_block", 2)
    nrb = [lpb] * levels if isinstance(lpb, int) else list(lpb)
    tlpb = cfg.get("transformer_layers_per_block", 1)
    tlpb = [tlpb] * levels if isinstance(tlpb, int) else list(tlpb)
    down = cfg["down_block_types"]
    up = cfg["up_block_types"]
    depth, depth_out = [], []
    for lvl in range(levels):
        d = tlpb[lvl] if "CrossAttn" in down[lvl] else 0
        depth += [d] * nrb[lvl]
        du = tlpb[lvl] if "CrossAttn" in up[levels - 1 - lvl] else 0
        depth_out += [du] * (nrb[lvl] + 1)
    mid = cfg.get("mid_block_type", "UNetMidBlock2DCrossAttn")
    heads = cfg.get("num_attention_heads") or cfg.get("attention_head_dim", 8)  # diffusers' historic naming
    if not isinstance(heads, int):
        if len(set(heads)) != 1:
            raise UserInputError(f"per-block head counts {heads} are not supported by this loader")
        heads = heads[0]
    if cfg.get("norm_num_groups", 32) != 32:
        raise UserInputError("ComfyUI's UNet uses GroupNorm(32): norm_num_groups must be 32")
    return {
        "use_checkpoint": False, "image_size": cfg.get("sample_size", 64), "use_spatial_transformer": True,
        "legacy": False, "adm_in_channels": None, "in_channels": cfg.get("in_channels", 4),
        "out_channels": cfg.get("out_channels", 4), "model_channels": boc[0],
        "num_res_blocks": nrb, "channel_mult": [c // boc[0] for c in boc], "transformer_depth": depth,
        "transformer_depth_output": depth_out,
        "transformer_depth_middle": tlpb[-1] if mid == "UNetMidBlock2DCrossAttn" else -1,
        "use_linear_in_transformer": bool(cfg.get("use_linear_projection", False)),
        "context_dim": cfg["cross_attention_dim"], "use_temporal_resblock": False, "use_temporal_attention": False,
        "num_heads": heads, "num_head_channels": -1,
    }


def _model_config(unet_config: dict, sched: dict, scaling_factor: float):
    prediction = sched.get("prediction_type", "epsilon")
    if prediction not in ("epsilon", "v_prediction"):
        raise UserInputError(f"prediction type {prediction!r} is not supported (epsilon or v_prediction)")
    beta = sched.get("beta_schedule", "scaled_linear")
    if beta not in _BETA_SCHEDULES:
        raise UserInputError(f"beta schedule {beta!r} is not supported ({', '.join(_BETA_SCHEDULES)})")

    class DiffusersFolderSD(comfy.supported_models.SD15):
        """An SD1.x-shaped model at any width (never registered for checkpoint detection)."""

        unet_config = {}
        unet_extra_config = {}
        sampling_settings = {"beta_schedule": _BETA_SCHEDULES[beta], "linear_start": sched.get("beta_start", 0.00085),
                             "linear_end": sched.get("beta_end", 0.012),
                             "timesteps": sched.get("num_train_timesteps", 1000),
                             "zsnr": bool(sched.get("rescale_betas_zero_snr", False))}

        def model_type(self, state_dict, prefix=""):
            return comfy.model_base.ModelType.V_PREDICTION if prediction == "v_prediction" else comfy.model_base.ModelType.EPS

    cfg = DiffusersFolderSD(unet_config)
    cfg.latent_format = comfy.latent_formats.SD15(scale_factor=scaling_factor)
    cfg.set_inference_dtype(torch.float32, None)
    return cfg


def load_unet(folder: Path, scaling_factor: float):
    cfg = _read_json(folder / "unet" / "config.json")
    sched = _read_json(folder / "scheduler" / "scheduler_config.json")
    unet_config = unet_config_from_diffusers(cfg)
    model_config = _model_config(unet_config, sched, scaling_factor)
    sd = _read_weights(folder / "unet")
    table = comfy.utils.unet_to_diffusers(model_config.unet_config)
    new_sd = {ldm: sd[diff] for diff, ldm in table.items() if diff in sd}
    mm = comfy.model_management
    model = model_config.get_model({}, "", device=mm.unet_offload_device())
    missing, unexpected = model.diffusion_model.load_state_dict(new_sd, strict=False)
    if missing:
        raise UserInputError(f"{folder}: the UNet weights do not match its config ({len(missing)} missing, e.g. {missing[0]})")
    return comfy.model_patcher.ModelPatcher(model, load_device=mm.get_torch_device(), offload_device=mm.unet_offload_device())


def load_clip(folder: Path, embedding_directory=None):
    te_cfg = _read_json(folder / "text_encoder" / "config.json")
    tok_dir = folder / "tokenizer"
    has_bpe = (tok_dir / "vocab.json").is_file() and (tok_dir / "merges.txt").is_file()
    if not has_bpe and not (tok_dir / "tokenizer.json").is_file():
        raise UserInputError(f"{folder}: the tokenizer is missing (tokenizer/vocab.json + merges.txt, or tokenizer.json)")
    if te_cfg.get("model_type", "clip_text_model") != "clip_text_model":
        raise UserInputError(f"{folder}: the text encoder is {te_cfg.get('model_type')}, not a CLIP text model")
    from transformers import CLIPTokenizer

    hf_tok = CLIPTokenizer.from_pretrained(str(tok_dir))
    special = {"start": hf_tok.bos_token_id, "end": hf_tok.eos_token_id, "pad": hf_tok.pad_token_id}
    hidden = te_cfg["hidden_size"]
    max_len = min(te_cfg.get("max_position_embeddings", 77), hf_tok.model_max_length)
    comfy_cfg = {k: te_cfg[k] for k in ("num_hidden_layers", "hidden_size", "num_attention_heads",
                                         "intermediate_size", "hidden_act", "max_position_embeddings")}
    comfy_cfg["eos_token_id"] = hf_tok.eos_token_id
    comfy_cfg["projection_dim"] = te_cfg.get("projection_dim", hidden)
    comfy_cfg["vocab_size"] = te_cfg.get("vocab_size", 49408)
    if comfy_cfg["hidden_act"] not in ("quick_gelu", "gelu", "gelu_pytorch_tanh"):
        raise UserInputError(f"text-encoder activation {comfy_cfg['hidden_act']!r} is not supported")

    tokenizer = functools.partial(comfy.sd1_clip.SDTokenizer, tokenizer_path=str(tok_dir), max_length=max_len,
                                  embedding_size=hidden, embedding_key="clip_l")

    class FolderTokenizer(comfy.sd1_clip.SD1Tokenizer):
        def __init__(self, embedding_directory=None, tokenizer_data={}):
            super().__init__(embedding_directory=embedding_directory, tokenizer_data=tokenizer_data, tokenizer=tokenizer)

    class FolderClip(comfy.sd1_clip.SD1ClipModel):
        def __init__(self, device="cpu", dtype=None, model_options={}, **kw):
            clip_model = functools.partial(comfy.sd1_clip.SDClipModel, textmodel_json_config=dict(comfy_cfg),
                                           special_tokens=special, max_length=max_len, return_projected_pooled=False)
            super().__init__(device=device, dtype=dtype, model_options=model_options, clip_model=clip_model, **kw)

    sd = _read_weights(folder / "text_encoder")
    sd = {k: v for k, v in sd.items() if not k.endswith("position_ids")}
    # transformers ≥ 5 saves CLIPTextModel without the "text_model." prefix
    sd = {k if k.startswith(("text_model.", "text_projection.")) else "text_model." + k: v for k, v in sd.items()}
    clip = comfy.sd.CLIP(target=comfy.supported_models_base.ClipTarget(FolderTokenizer, FolderClip),
                         embedding_directory=embedding_directory, model_options={"dtype": torch.float32})
    transformer = clip.cond_stage_model.clip_l.transformer
    rows = transformer.text_model.embeddings.token_embedding.weight.shape[0]
    key = "text_model.embeddings.token_embedding.weight"
    if sd[key].shape[0] > rows:
        raise UserInputError(f"{folder}: vocabulary of {sd[key].shape[0]} tokens is larger than ComfyUI's CLIP ({rows})")
    if sd[key].shape[0] < rows:  # ComfyUI's CLIP always has 49408 rows; ids above the vocabulary never occur
        sd[key] = torch.cat([sd[key], sd[key].new_zeros(rows - sd[key].shape[0], sd[key].shape[1])])
    if "text_projection.weight" not in sd:  # unused (SD1 has no projected pooled output); keep it finite
        sd["text_projection.weight"] = torch.eye(hidden)
    missing, _ = transformer.load_state_dict(sd, strict=False)
    if missing:
        raise UserInputError(f"{folder}: the text-encoder weights do not match its config (e.g. {missing[0]} missing)")
    return clip


def convert_vae(sd: dict[str, torch.Tensor], levels: int) -> dict[str, torch.Tensor]:
    """diffusers AutoencoderKL state dict → ComfyUI/LDM names for ``levels`` resolution levels."""
    out = diffusers_convert.convert_vae_state_dict(sd)
    shift = 4 - levels  # ComfyUI's table numbers decoder levels as 3 - i (four levels)
    if shift:
        out = {re.sub(r"^decoder\.up\.(\d+)\.", lambda m: f"decoder.up.{int(m.group(1)) - shift}.", k): v
               for k, v in out.items()}
    return out


def load_vae(folder: Path):
    cfg = _read_json(folder / "vae" / "config.json")
    boc = list(cfg["block_out_channels"])
    if cfg.get("norm_num_groups", 32) != 32 or any(c % boc[0] for c in boc):
        raise UserInputError(f"{folder}: VAE with norm_num_groups={cfg.get('norm_num_groups')} / channels {boc} is not supported")
    if not cfg.get("mid_block_add_attention", True):
        raise UserInputError(f"{folder}: VAE without mid-block attention is not supported")
    latent = cfg.get("latent_channels", 4)
    dd = {"double_z": True, "z_channels": latent, "resolution": cfg.get("sample_size", 256),
          "in_channels": cfg.get("in_channels", 3), "out_ch": cfg.get("out_channels", 3), "ch": boc[0],
          "ch_mult": [c // boc[0] for c in boc], "num_res_blocks": cfg.get("layers_per_block", 2),
          "attn_resolutions": [], "dropout": 0.0}
    sd = convert_vae(_read_weights(folder / "vae"), len(boc))
    vae = comfy.sd.VAE(sd=sd, config={"params": {"embed_dim": latent, "ddconfig": dd}}, dtype=torch.float32)
    ratio = 2 ** (len(boc) - 1)
    vae.downscale_ratio = vae.upscale_ratio = ratio
    vae.latent_channels = latent
    expected = set(vae.first_stage_model.state_dict())
    if expected - set(sd):
        raise UserInputError(f"{folder}: the VAE weights do not match its config (e.g. {sorted(expected - set(sd))[0]} missing)")
    return vae


def load_diffusers_folder(folder: str | os.PathLike, embedding_directory=None):
    """(MODEL, CLIP, VAE) of a diffusers SD1.x-style folder."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserInputError(f"model folder {folder} does not exist")
    vae_cfg = _read_json(folder / "vae" / "config.json")
    scaling = float(vae_cfg.get("scaling_factor", 0.18215))
    if vae_cfg.get("shift_factor"):
        raise UserInputError(f"{folder}: VAEs with a shift factor are not supported")
    model = load_unet(folder, scaling)
    clip = load_clip(folder, embedding_directory)
    vae = load_vae(folder)
    return model, clip, vae


def demo_model_folder() -> Path:
    """The shipped demo model, or a ValueError that says it is not there yet."""
    try:
        from ..kernels.demo.model import demo_model_path
    except ImportError as e:
        raise UserInputError("the demo model is not part of this installation yet "
                             f"(fewshot_personalize.kernels.demo.model is missing: {e}); "
                             "choose 'tiny (test)' or load a real checkpoint") from None
    path = Path(demo_model_path())
    if not (path / "model_index.json").is_file():
        raise UserInputError(f"the demo model weights are missing at {path}; reinstall the pack")
    return path


_TINY: dict[int, str] = {}


def tiny_model_folder(seed: int = 0) -> Path:
    """A tiny random SD1-style diffusers folder (kernels.tiny_models), built once per process and seed."""
    if seed not in _TINY or not Path(_TINY[seed], "model_index.json").is_file():
        from ..kernels.tiny_models import build_tiny_sd

        root = Path(tempfile.gettempdir()) / "fewshot_personalize_tiny"
        root.mkdir(exist_ok=True)
        with torch.inference_mode(False):
            _TINY[seed] = build_tiny_sd(tempfile.mkdtemp(prefix=f"sd1_seed{seed}_", dir=root), seed=seed)
    return Path(_TINY[seed])
