"""ComfyUI MODEL / CLIP / VAE objects built in code from a diffusers SD1.x/SD2.x- or SDXL-style model folder.

ComfyUI detects checkpoints by their shapes and does not recognise small models (a UNet with 32 channels is
"no match"), so the demo model and the tiny test models are assembled here from their configs instead:

* UNet: ``UNet2DConditionModel`` config → an ``SD15`` (or, with ``addition_embed_type='text_time'``, an
  ``SDXL``) model config subclass with the matching ``unet_config``; weights renamed diffusers → LDM with
  ComfyUI's own table (``comfy.utils.unet_to_diffusers``, which also maps ``add_embedding`` → ``label_emb``).
  SDXL's size/crop time ids are embedded at the folder's ``addition_time_embed_dim`` (256 in SDXL itself).
  The noise schedule comes from the folder's scheduler config, the latent scale from the VAE config.
* CLIP: ``comfy.sd1_clip.SDClipModel`` per text encoder with the folder's text-encoder config, the folder's
  tokenizer (``vocab.json`` / ``merges.txt``) and the special tokens that tokenizer uses. SDXL folders give
  ``clip_l`` (``text_encoder/``) and ``clip_g`` (``text_encoder_2/``, projected pooled output), both read at
  the penultimate layer without the final layer norm, as diffusers' SDXL pipeline does.
* VAE: ``AutoencoderKL`` config → ComfyUI's ``AutoencoderKL``; weights through ComfyUI's diffusers VAE
  conversion (whose table assumes 4 resolution levels; the decoder's level numbers are shifted for fewer).

Other layouts (other added conditioning, refiner-style single ``text_encoder_2``, …) are refused with a
message. Nothing is downloaded and nothing is unpickled (safetensors only).
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
import comfy.sdxl_clip
import comfy.supported_models
import comfy.supported_models_base
import comfy.utils
import torch
from comfy import diffusers_convert
from comfy.ldm.modules.diffusionmodules.openaimodel import Timestep

from ...kernels.core.errors import UserInputError

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


def _head_layout(cfg: dict, levels: int, attn_levels: list[int]) -> tuple[int, int]:
    """ComfyUI ``(num_heads, num_head_channels)`` of a diffusers UNet config (one of them is -1).

    diffusers' ``attention_head_dim`` historically holds the number of heads per block; a single count maps to
    ``num_heads``, per-block counts with the same channels per head (SDXL: 640/10 = 1280/20 = 64) to
    ``num_head_channels``. Only levels that have attention are compared."""
    heads = cfg.get("num_attention_heads") or cfg.get("attention_head_dim", 8)
    heads = [heads] * levels if isinstance(heads, int) else list(heads)
    boc = list(cfg["block_out_channels"])
    counts = {heads[lvl] for lvl in attn_levels}
    if len(counts) <= 1:
        return (counts.pop() if counts else heads[0]), -1
    if all(boc[lvl] % heads[lvl] == 0 for lvl in attn_levels):
        channels = {boc[lvl] // heads[lvl] for lvl in attn_levels}
        if len(channels) == 1:
            return -1, channels.pop()
    raise UserInputError(f"per-block head counts {heads} (channels {boc}) have neither one head count nor one "
                         "head width; this loader cannot map them")


def unet_config_from_diffusers(cfg: dict) -> dict:
    """ComfyUI ``unet_config`` of a diffusers ``UNet2DConditionModel`` config (SD1.x/SD2.x-style, or SDXL-style
    with ``addition_embed_type='text_time'``)."""
    added = cfg.get("addition_embed_type")
    if cfg.get("class_embed_type") or added not in (None, "text_time"):
        raise UserInputError(f"UNets with added conditioning {added or cfg.get('class_embed_type')!r} are not "
                             "supported by this loader (only none, or SDXL's 'text_time')")
    for key in ("projection_class_embeddings_input_dim", "addition_time_embed_dim"):
        if added and not cfg.get(key):
            raise UserInputError(f"a 'text_time' UNet config without {key}")
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
    attn_levels = [lvl for lvl in range(levels) if "CrossAttn" in down[lvl] or "CrossAttn" in up[levels - 1 - lvl]
                   or (lvl == levels - 1 and mid == "UNetMidBlock2DCrossAttn")]
    num_heads, head_channels = _head_layout(cfg, levels, attn_levels)
    if cfg.get("norm_num_groups", 32) != 32:
        raise UserInputError("ComfyUI's UNet uses GroupNorm(32): norm_num_groups must be 32")
    out = {
        "use_checkpoint": False, "image_size": cfg.get("sample_size", 64), "use_spatial_transformer": True,
        "legacy": False, "adm_in_channels": None, "in_channels": cfg.get("in_channels", 4),
        "out_channels": cfg.get("out_channels", 4), "model_channels": boc[0],
        "num_res_blocks": nrb, "channel_mult": [c // boc[0] for c in boc], "transformer_depth": depth,
        "transformer_depth_output": depth_out,
        "transformer_depth_middle": tlpb[-1] if mid == "UNetMidBlock2DCrossAttn" else -1,
        "use_linear_in_transformer": bool(cfg.get("use_linear_projection", False)),
        "context_dim": cfg["cross_attention_dim"], "use_temporal_resblock": False, "use_temporal_attention": False,
        "num_heads": num_heads, "num_head_channels": head_channels,
    }
    if added:
        out.update(adm_in_channels=cfg["projection_class_embeddings_input_dim"], num_classes="sequential")
    return out


def _model_config(unet_config: dict, sched: dict, scaling_factor: float, time_embed_dim: int | None = None):
    """A ComfyUI model config for ``unet_config``: SD1.x-shaped, or SDXL-shaped when ``time_embed_dim`` is set
    (the width of each embedded size/crop time id)."""
    prediction = sched.get("prediction_type", "epsilon")
    if prediction not in ("epsilon", "v_prediction"):
        raise UserInputError(f"prediction type {prediction!r} is not supported (epsilon or v_prediction)")
    beta = sched.get("beta_schedule", "scaled_linear")
    if beta not in _BETA_SCHEDULES:
        raise UserInputError(f"beta schedule {beta!r} is not supported ({', '.join(_BETA_SCHEDULES)})")
    mtype = comfy.model_base.ModelType.V_PREDICTION if prediction == "v_prediction" else comfy.model_base.ModelType.EPS
    base = comfy.supported_models.SDXL if time_embed_dim else comfy.supported_models.SD15

    class DiffusersFolderModel(base):
        """A model of the base's shape at any width (never registered for checkpoint detection)."""

        unet_config = {}
        unet_extra_config = {}
        sampling_settings = {"beta_schedule": _BETA_SCHEDULES[beta], "linear_start": sched.get("beta_start", 0.00085),
                             "linear_end": sched.get("beta_end", 0.012),
                             "timesteps": sched.get("num_train_timesteps", 1000),
                             "zsnr": bool(sched.get("rescale_betas_zero_snr", False))}

        def model_type(self, state_dict, prefix=""):
            return mtype

        def inpaint_model(self):
            """An inpainting UNet takes latent + mask + masked latent (in = 2·out + 1); ComfyUI's own test
            (in_channels > 4) would turn an 8-channel latent model (the demo model) into one and feed it 17."""
            return self.unet_config["in_channels"] == 2 * self.unet_config["out_channels"] + 1

        if time_embed_dim:
            def get_model(self, state_dict, prefix="", device=None):
                return DiffusersFolderSDXL(self, model_type=mtype, device=device)

    class DiffusersFolderSDXL(comfy.model_base.SDXL):
        """``model_base.SDXL`` whose time ids are embedded at the folder's width instead of 256."""

        def __init__(self, model_config, model_type=mtype, device=None):
            super().__init__(model_config, model_type, device=device)
            self.embedder = Timestep(time_embed_dim)

    cfg = DiffusersFolderModel(unet_config)
    if time_embed_dim:
        cfg.latent_format = comfy.latent_formats.SDXL()
        cfg.latent_format.scale_factor = scaling_factor
    else:
        cfg.latent_format = comfy.latent_formats.SD15(scale_factor=scaling_factor)
    channels = unet_config["in_channels"]
    if channels != 4:  # the preview factors and TAESD decoders are for 4 channels; EmptyLatentImage widens to this
        cfg.latent_format.latent_channels = channels
        cfg.latent_format.latent_rgb_factors = None
        cfg.latent_format.latent_rgb_factors_bias = None
        cfg.latent_format.taesd_decoder_name = None
    cfg.set_inference_dtype(torch.float32, None)
    return cfg


def load_unet(folder: Path, cfg: dict, scaling_factor: float):
    """MODEL of the folder's UNet (``cfg``: its diffusers config)."""
    sched = _read_json(folder / "scheduler" / "scheduler_config.json")
    unet_config = unet_config_from_diffusers(cfg)
    time_dim = cfg["addition_time_embed_dim"] if cfg.get("addition_embed_type") == "text_time" else None
    model_config = _model_config(unet_config, sched, scaling_factor, time_dim)
    sd = _read_weights(folder / "unet")
    table = comfy.utils.unet_to_diffusers(model_config.unet_config)
    new_sd = {ldm: sd[diff] for diff, ldm in table.items() if diff in sd}
    mm = comfy.model_management
    model = model_config.get_model({}, "", device=mm.unet_offload_device())
    missing, unexpected = model.diffusion_model.load_state_dict(new_sd, strict=False)
    if missing:
        raise UserInputError(f"{folder}: the UNet weights do not match its config ({len(missing)} missing, e.g. {missing[0]})")
    return comfy.model_patcher.ModelPatcher(model, load_device=mm.get_torch_device(), offload_device=mm.unet_offload_device())


class _FolderEncoder:
    """One text encoder of a folder: its ComfyUI config, special tokens and tokenizer directory."""

    def __init__(self, folder: Path, te_dir: str, tok_dir: str):
        self.folder, self.te_dir = folder, folder / te_dir
        te_cfg = _read_json(self.te_dir / "config.json")
        self.tok_dir = folder / tok_dir
        has_bpe = (self.tok_dir / "vocab.json").is_file() and (self.tok_dir / "merges.txt").is_file()
        if not has_bpe and not (self.tok_dir / "tokenizer.json").is_file():
            raise UserInputError(f"{folder}: the tokenizer is missing ({tok_dir}/vocab.json + merges.txt, or tokenizer.json)")
        if te_cfg.get("model_type", "clip_text_model") != "clip_text_model":
            raise UserInputError(f"{folder}: {te_dir} is {te_cfg.get('model_type')}, not a CLIP text model")
        from transformers import CLIPTokenizer

        hf_tok = CLIPTokenizer.from_pretrained(str(self.tok_dir))
        pad = hf_tok.pad_token_id if hf_tok.pad_token_id is not None else hf_tok.eos_token_id
        self.special = {"start": hf_tok.bos_token_id, "end": hf_tok.eos_token_id, "pad": pad}
        self.hidden = hidden = te_cfg["hidden_size"]
        self.max_len = min(te_cfg.get("max_position_embeddings", 77), hf_tok.model_max_length)
        cfg = {k: te_cfg[k] for k in ("num_hidden_layers", "hidden_size", "num_attention_heads",
                                      "intermediate_size", "hidden_act", "max_position_embeddings")}
        cfg["eos_token_id"] = hf_tok.eos_token_id
        cfg["projection_dim"] = te_cfg.get("projection_dim", hidden)
        cfg["vocab_size"] = te_cfg.get("vocab_size", 49408)
        if cfg["hidden_act"] not in ("quick_gelu", "gelu", "gelu_pytorch_tanh"):
            raise UserInputError(f"{folder}: text-encoder activation {cfg['hidden_act']!r} is not supported")
        self.config = cfg

    def tokenizer(self, key: str, embedding_directory=None, tokenizer_data={}):
        """``SDTokenizer`` over this folder's vocabulary, padding with the tokenizer's own pad token."""
        return comfy.sd1_clip.SDTokenizer(tokenizer_path=str(self.tok_dir), max_length=self.max_len,
                                          pad_with_end=self.special["pad"] == self.special["end"],
                                          pad_token=self.special["pad"], embedding_size=self.hidden,
                                          embedding_key=key, embedding_directory=embedding_directory,
                                          tokenizer_data=tokenizer_data)

    def model(self, device="cpu", dtype=None, model_options={}, *, penultimate: bool, projected_pooled: bool):
        """``SDClipModel`` of this encoder; ``penultimate``: the second-to-last layer without final norm (SDXL)."""
        enc = comfy.sd1_clip.SDClipModel(device=device, dtype=dtype, model_options=model_options,
                                         textmodel_json_config=dict(self.config), special_tokens=self.special,
                                         max_length=self.max_len, return_projected_pooled=projected_pooled,
                                         layer_norm_hidden_state=not penultimate)
        if penultimate:  # set after construction: SDClipModel asserts |layer_idx| < layers (2 in tiny models)
            enc.set_clip_options({"layer": -2})
            enc.options_default = (enc.layer, enc.layer_idx, enc.return_projected_pooled)
        return enc

    def load_into(self, transformer) -> None:
        sd = _read_weights(self.te_dir)
        sd = {k: v for k, v in sd.items() if not k.endswith("position_ids")}
        # transformers ≥ 5 saves CLIPTextModel without the "text_model." prefix
        sd = {k if k.startswith(("text_model.", "text_projection.")) else "text_model." + k: v for k, v in sd.items()}
        rows = transformer.text_model.embeddings.token_embedding.weight.shape[0]
        key = "text_model.embeddings.token_embedding.weight"
        if sd[key].shape[0] > rows:
            raise UserInputError(f"{self.te_dir}: vocabulary of {sd[key].shape[0]} tokens is larger than ComfyUI's CLIP ({rows})")
        if sd[key].shape[0] < rows:  # ComfyUI's CLIP always has 49408 rows; ids above the vocabulary never occur
            sd[key] = torch.cat([sd[key], sd[key].new_zeros(rows - sd[key].shape[0], sd[key].shape[1])])
        proj = sd.setdefault("text_projection.weight", torch.eye(self.hidden))  # SD1 has none (unused); keep it finite
        if proj.shape != (self.hidden, self.hidden):
            raise UserInputError(f"{self.te_dir}: projection_dim {proj.shape[0]} differs from hidden_size {self.hidden} "
                                 "(ComfyUI's CLIP projects to its own width)")
        missing, _ = transformer.load_state_dict(sd, strict=False)
        if missing:
            raise UserInputError(f"{self.te_dir}: the text-encoder weights do not match its config (e.g. {missing[0]} missing)")


def load_clip(folder: Path, embedding_directory=None):
    """CLIP of an SD1.x/SD2.x folder: one encoder (``clip_l``), last layer, as ``StableDiffusionPipeline``."""
    te = _FolderEncoder(folder, "text_encoder", "tokenizer")

    class FolderTokenizer(comfy.sd1_clip.SD1Tokenizer):
        def __init__(self, embedding_directory=None, tokenizer_data={}):
            super().__init__(embedding_directory=embedding_directory, tokenizer_data=tokenizer_data,
                             tokenizer=functools.partial(te.tokenizer, "clip_l"))

    class FolderClip(comfy.sd1_clip.SD1ClipModel):
        def __init__(self, device="cpu", dtype=None, model_options={}, **kw):
            clip_model = functools.partial(te.model, penultimate=False, projected_pooled=False)
            super().__init__(device=device, dtype=dtype, model_options=model_options, clip_model=clip_model, **kw)

    clip = comfy.sd.CLIP(target=comfy.supported_models_base.ClipTarget(FolderTokenizer, FolderClip),
                         embedding_directory=embedding_directory, model_options={"dtype": torch.float32})
    te.load_into(clip.cond_stage_model.clip_l.transformer)
    return clip


def load_sdxl_clip(folder: Path, embedding_directory=None):
    """CLIP of an SDXL folder: ``clip_l`` + ``clip_g`` (keys "l"/"g", as ``comfy.sdxl_clip``), both at the
    penultimate layer; the pooled output is ``text_encoder_2``'s projection (diffusers' ``text_embeds``)."""
    te_l = _FolderEncoder(folder, "text_encoder", "tokenizer")
    te_g = _FolderEncoder(folder, "text_encoder_2", "tokenizer_2")
    if min(te_l.config["num_hidden_layers"], te_g.config["num_hidden_layers"]) < 2:
        raise UserInputError(f"{folder}: SDXL reads the penultimate text-encoder layer; these have fewer than 2 layers")

    class FolderSDXLTokenizer(comfy.sdxl_clip.SDXLTokenizer):
        def __init__(self, embedding_directory=None, tokenizer_data={}):  # not super(): it loads SDXL's vocabulary
            self.clip_l = te_l.tokenizer("clip_l", embedding_directory, tokenizer_data)
            self.clip_g = te_g.tokenizer("clip_g", embedding_directory, tokenizer_data)

    class FolderSDXLClip(comfy.sdxl_clip.SDXLClipModel):
        def __init__(self, device="cpu", dtype=None, model_options={}):
            torch.nn.Module.__init__(self)  # not SDXLClipModel.__init__: it builds the full-size encoders
            self.clip_l = te_l.model(device, dtype, {**model_options, "model_name": "clip_l"},
                                     penultimate=True, projected_pooled=False)
            self.clip_g = te_g.model(device, dtype, {**model_options, "model_name": "clip_g"},
                                     penultimate=True, projected_pooled=True)
            self.dtypes = {dtype}

    clip = comfy.sd.CLIP(target=comfy.supported_models_base.ClipTarget(FolderSDXLTokenizer, FolderSDXLClip),
                         embedding_directory=embedding_directory, model_options={"dtype": torch.float32})
    te_l.load_into(clip.cond_stage_model.clip_l.transformer)
    te_g.load_into(clip.cond_stage_model.clip_g.transformer)
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
    groups = cfg.get("norm_num_groups", 32)
    if any(c % boc[0] or c % groups for c in boc):
        raise UserInputError(f"{folder}: VAE with norm_num_groups={groups} / channels {boc} is not supported")
    if not cfg.get("mid_block_add_attention", True):
        raise UserInputError(f"{folder}: VAE without mid-block attention is not supported")
    latent = cfg.get("latent_channels", 4)
    dd = {"double_z": True, "z_channels": latent, "resolution": cfg.get("sample_size", 256),
          "in_channels": cfg.get("in_channels", 3), "out_ch": cfg.get("out_channels", 3), "ch": boc[0],
          "ch_mult": [c // boc[0] for c in boc], "num_res_blocks": cfg.get("layers_per_block", 2),
          "attn_resolutions": [], "dropout": 0.0}
    sd = convert_vae(_read_weights(folder / "vae"), len(boc))
    vae = comfy.sd.VAE(sd=sd, config={"params": {"embed_dim": latent, "ddconfig": dd}}, dtype=torch.float32)
    if groups != 32:  # ComfyUI's LDM autoencoder builds every GroupNorm with 32 groups; the weights are per channel
        for m in vae.first_stage_model.modules():
            if isinstance(m, torch.nn.GroupNorm):
                m.num_groups = groups
    ratio = 2 ** (len(boc) - 1)
    vae.downscale_ratio = vae.upscale_ratio = ratio
    vae.latent_channels = latent
    expected = set(vae.first_stage_model.state_dict())
    if expected - set(sd):
        raise UserInputError(f"{folder}: the VAE weights do not match its config (e.g. {sorted(expected - set(sd))[0]} missing)")
    return vae


def load_diffusers_folder(folder: str | os.PathLike, embedding_directory=None):
    """(MODEL, CLIP, VAE) of a diffusers SD1.x/SD2.x- or SDXL-style folder."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserInputError(f"model folder {folder} does not exist")
    vae_cfg = _read_json(folder / "vae" / "config.json")
    scaling = float(vae_cfg.get("scaling_factor", 0.18215))
    if vae_cfg.get("shift_factor"):
        raise UserInputError(f"{folder}: VAEs with a shift factor are not supported")
    unet_cfg = _read_json(folder / "unet" / "config.json")
    sdxl = unet_cfg.get("addition_embed_type") == "text_time"
    has_te1, has_te2 = (folder / "text_encoder").is_dir(), (folder / "text_encoder_2").is_dir()
    if sdxl and not (has_te1 and has_te2):
        raise UserInputError(f"{folder}: an SDXL-style UNet needs text_encoder/ and text_encoder_2/ "
                             "(refiner-style folders with one encoder are not supported)")
    if has_te2 and not sdxl:
        raise UserInputError(f"{folder}: text_encoder_2/ without an SDXL-style ('text_time') UNet is not supported")
    if sdxl:
        widths = [_read_json(folder / d / "config.json")["hidden_size"] for d in ("text_encoder", "text_encoder_2")]
        pooled = _read_json(folder / "text_encoder_2" / "config.json").get("projection_dim", widths[1])
        adm = pooled + 6 * int(unet_cfg.get("addition_time_embed_dim") or 0)
        if sum(widths) != unet_cfg["cross_attention_dim"] or adm != unet_cfg.get("projection_class_embeddings_input_dim"):
            raise UserInputError(f"{folder}: the text encoders ({widths[0]} + {widths[1]} wide, pooled {pooled}) do not "
                                 f"match the UNet (context {unet_cfg['cross_attention_dim']}, added conditioning "
                                 f"{unet_cfg.get('projection_class_embeddings_input_dim')})")
    model = load_unet(folder, unet_cfg, scaling)
    clip = (load_sdxl_clip if sdxl else load_clip)(folder, embedding_directory)
    vae = load_vae(folder)
    # 0.33's EmptyLatentImage resizes its latent to the model's ratio, so a W×H request decodes to W×H
    model.model.latent_format.spacial_downscale_ratio = vae.downscale_ratio
    for part, patcher in (("model", model), ("clip", clip.patcher), ("vae", vae.patcher)):
        if hasattr(patcher, "cached_patcher_init"):  # ComfyUI ≥ 0.33: how deep clones get fresh weights
            patcher.cached_patcher_init = (reload_part, (str(folder), embedding_directory, part))
    return model, clip, vae


def reload_part(folder: str, embedding_directory, part: str, disable_dynamic: bool = False):
    """A fresh patcher of one part (``model``, ``clip`` or ``vae``) of a diffusers folder: ComfyUI 0.33's
    ``cached_patcher_init`` factory, which deep clones (``clone(force_deepcopy=True)``, as its TrainLoraNode makes
    one; multi-GPU copies) call instead of copying weights that may carry patches."""
    path = Path(folder)
    if part == "vae":
        return load_vae(path).patcher
    if part == "clip":  # without loading the UNet, the largest part
        sdxl = _read_json(path / "unet" / "config.json").get("addition_embed_type") == "text_time"
        return (load_sdxl_clip if sdxl else load_clip)(path, embedding_directory).patcher
    return load_diffusers_folder(path, embedding_directory)[0]  # the folder's checks and the VAE's latent ratio


def demo_model_folder() -> Path:
    """The shipped demo model, or a ValueError that says it is not there yet."""
    try:
        from ...kernels.demo.model import demo_model_path
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
    """A tiny random SD1-style diffusers folder (kernels.testing.tiny_models), built once per process and seed."""
    if seed not in _TINY or not Path(_TINY[seed], "model_index.json").is_file():
        from ...kernels.testing.tiny_models import build_tiny_sd

        root = Path(tempfile.gettempdir()) / "fewshot_personalize_tiny"
        root.mkdir(exist_ok=True)
        with torch.inference_mode(False):
            _TINY[seed] = build_tiny_sd(tempfile.mkdtemp(prefix=f"sd1_seed{seed}_", dir=root), seed=seed)
    return Path(_TINY[seed])
