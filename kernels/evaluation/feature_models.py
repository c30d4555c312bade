"""Image and text features of local transformers models, as DreamBooth's metrics use them (arXiv 2208.12242 §4.1):
CLIP's projected image and text embeddings (CLIP-I, CLIP-T) and DINO's CLS token of the last layer (DINO v1 as a
``ViTModel`` folder, DINOv2 as ``Dinov2Model``).

Folders are read offline and with safetensors only (``use_safetensors=True``); a folder with only pickled ``.bin``
weights is refused, and so is one whose weights lack what its config needs (transformers would fill the gap with
random numbers). Preprocessing: the folder's own image processor (``preprocessor_config.json`` through
``AutoImageProcessor``) when it has one; otherwise the config's ``image_size`` (shorter side resized, bicubic, centre
cropped) normalised with CLIP's mean/std for CLIP and ImageNet's for DINO.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from PIL import Image

from ..core.errors import UserInputError
from ..core.images import resize_center_crop

CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
#: config.json model_type → transformers class
CLIP_CLASSES = {"clip": "CLIPModel", "clip_vision_model": "CLIPVisionModelWithProjection"}
DINO_CLASSES = {"vit": "ViTModel", "dinov2": "Dinov2Model", "dinov2_with_registers": "Dinov2WithRegistersModel"}
CLIP_NEEDS = "CLIP-I needs a CLIPModel folder (both towers) or a CLIPVisionModelWithProjection folder"
DINO_NEEDS = "DINO needs a ViTModel (DINO v1, e.g. dino-vits16) or Dinov2Model folder"
BATCH = 16


class ImageFeatureModel(Protocol):
    """What the scores need of a model: ``kind`` ("clip" or "dino"), a ``name`` for the report, the ``background``
    colour (RGB in 0..1) that the model's normalisation maps to zero, and features [N, D] of images [H,W,3] in
    0..1. CLIP models also give text features, or say in ``text_problem`` why they cannot."""

    kind: str
    name: str
    background: tuple[float, float, float]
    text_problem: str | None

    def image_features(self, images: Sequence[torch.Tensor]) -> torch.Tensor: ...

    def text_features(self, prompts: Sequence[str]) -> torch.Tensor: ...


def read_config(folder: str | Path, role: str) -> dict:
    """config.json of a transformers model folder with safetensors weights, or a one-line error naming the problem."""
    p = Path(folder)
    if not p.is_dir():
        raise UserInputError(f"{role} {p}: no such model folder")
    if not (p / "config.json").is_file():
        hint = " (a diffusers pipeline: point at a transformers CLIP or DINO model folder)" \
            if (p / "model_index.json").is_file() else ""
        raise UserInputError(f"{role} {p} is not a transformers model folder (no config.json){hint}")
    try:
        config = json.loads((p / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise UserInputError(f"{role} {p}/config.json cannot be read ({e})") from None
    if not any(p.glob("*.safetensors")):
        pickles = sorted(f.name for f in p.iterdir() if f.suffix in (".bin", ".pt", ".pth", ".ckpt"))
        if pickles:
            raise UserInputError(f"{role} {p} has only pickled weights ({', '.join(pickles)}), which this project "
                                 "never loads: convert them to model.safetensors")
        raise UserInputError(f"{role} {p} has no .safetensors weights")
    return config


def _first_line(e: Exception) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def _load(cls_name: str, folder: Path, role: str, **kw):
    """(model in fp32, eval mode; missing weight names) of ``transformers.<cls_name>`` from ``folder``."""
    import transformers

    cls = getattr(transformers, cls_name, None)
    if cls is None:
        raise UserInputError(f"{role} {folder} needs transformers.{cls_name}, which transformers "
                             f"{transformers.__version__} lacks: upgrade transformers")
    try:
        model, info = cls.from_pretrained(folder, use_safetensors=True, local_files_only=True,
                                          output_loading_info=True, **kw)
    except (OSError, ValueError, RuntimeError, KeyError, TypeError) as e:
        raise UserInputError(f"{role} {folder} cannot be loaded as {cls_name}: {_first_line(e)}") from None
    missing = sorted(k for k in info["missing_keys"] if not k.endswith("position_ids"))
    return model.float().eval(), missing


class _Preprocess:
    """Images [H,W,3] in 0..1 → ``pixel_values`` [N,3,S,S], by the folder's image processor or the fallback."""

    def __init__(self, folder: Path, image_size: int, mean, std, role: str):
        self.processor = None
        if (folder / "preprocessor_config.json").is_file():
            from transformers import AutoImageProcessor

            try:
                self.processor = AutoImageProcessor.from_pretrained(folder, local_files_only=True)
            except (OSError, ValueError, KeyError, TypeError) as e:
                raise UserInputError(f"{role} {folder}/preprocessor_config.json cannot be used "
                                     f"({_first_line(e)})") from None
            mean = getattr(self.processor, "image_mean", None) or mean
        self.size = image_size
        self.mean = tuple(float(v) for v in mean)
        self.std = tuple(float(v) for v in std)

    def __call__(self, images: Sequence[torch.Tensor]) -> torch.Tensor:
        pils = [Image.fromarray((x.clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()) for x in images]
        if self.processor is not None:
            return torch.as_tensor(self.processor(images=pils, return_tensors="pt")["pixel_values"])
        arr = np.stack([np.asarray(resize_center_crop(im, self.size), dtype=np.float32) / 255.0 for im in pils])
        x = torch.from_numpy(arr).permute(0, 3, 1, 2)
        return (x - torch.tensor(self.mean).view(1, 3, 1, 1)) / torch.tensor(self.std).view(1, 3, 1, 1)


class _FolderModel:
    kind = ""

    def __init__(self, folder: Path, model, prep: _Preprocess, device: str, text_problem: str | None = None):
        self.name = folder.name
        self.model = model.to(device)
        self.prep, self.device, self.text_problem = prep, device, text_problem
        self.background = prep.mean

    def _embed(self, pixel_values: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def image_features(self, images: Sequence[torch.Tensor]) -> torch.Tensor:
        out = []
        with torch.no_grad():
            for i in range(0, len(images), BATCH):
                pixels = self.prep(images[i:i + BATCH]).to(self.device, torch.float32)
                out.append(self._embed(pixels).float().cpu())
        return torch.cat(out)

    def text_features(self, prompts: Sequence[str]) -> torch.Tensor:
        raise UserInputError(self.text_problem or f"{self.name} has no text tower")


class ClipFolderModel(_FolderModel):
    """CLIP-I features: ``visual_projection(vision_model(x).pooler_output)``; CLIP-T features:
    ``text_projection(text_model(ids).pooler_output)`` (what ``get_image_features`` / ``get_text_features`` give)."""

    kind = "clip"

    def __init__(self, folder, model, prep, device, text_problem=None, tokenizer=None):
        super().__init__(folder, model, prep, device, text_problem)
        self.tokenizer = tokenizer

    def _embed(self, pixel_values):
        return self.model.visual_projection(self.model.vision_model(pixel_values=pixel_values).pooler_output)

    def text_features(self, prompts):
        if self.text_problem:
            raise UserInputError(self.text_problem)
        length = self.model.config.text_config.max_position_embeddings
        tok = self.tokenizer(list(prompts), padding=True, truncation=True, max_length=length, return_tensors="pt")
        with torch.no_grad():
            out = self.model.text_model(input_ids=tok["input_ids"].to(self.device),
                                        attention_mask=tok["attention_mask"].to(self.device))
            return self.model.text_projection(out.pooler_output).float().cpu()


class DinoFolderModel(_FolderModel):
    """DINO features: the CLS token of the last layer's (layer-normed) hidden states."""

    kind = "dino"

    def _embed(self, pixel_values):
        return self.model(pixel_values=pixel_values).last_hidden_state[:, 0]


def load_clip(folder: str | Path, device: str = "cpu", role: str = "CLIP model") -> ClipFolderModel:
    """A CLIPModel or CLIPVisionModelWithProjection folder. The text side (CLIP-T) is optional: ``text_problem``
    says why it is missing (vision-only model, no text projection, no tokenizer)."""
    folder = Path(folder)
    model_type = read_config(folder, role).get("model_type")
    where = f"{role} {folder}"
    if model_type in DINO_CLASSES:
        raise UserInputError(f"{where} is a DINO model (model_type {model_type!r}), not CLIP: use it as the DINO model")
    if model_type == "clip_text_model":
        raise UserInputError(f"{where} is a CLIP text encoder without a vision tower: {CLIP_NEEDS}")
    if model_type not in CLIP_CLASSES:
        raise UserInputError(f"{where} is not a CLIP model (config.json model_type {model_type!r}): {CLIP_NEEDS}")
    model, missing = _load(CLIP_CLASSES[model_type], folder, role)
    if "visual_projection.weight" in missing:
        raise UserInputError(f"{where} has no visual projection (visual_projection.weight is missing): CLIP-I "
                             "compares CLIP's projected image embeddings")
    vision = [k for k in missing if k.startswith("vision_model.")]
    if vision:
        raise UserInputError(f"{where} lacks {len(vision)} vision-tower weights (e.g. {vision[0]}): the folder is "
                             "incomplete")
    text_problem, tokenizer = None, None
    if model_type == "clip_vision_model":
        text_problem = (f"{where} is a vision-only CLIP (CLIPVisionModelWithProjection): CLIP-T needs a CLIPModel "
                        "folder with both towers")
    elif "text_projection.weight" in missing:
        text_problem = (f"{where}: its CLIP text tower has no projection (text_projection.weight is missing), so "
                        "CLIP-T cannot be computed")
    elif any(k.startswith("text_model.") for k in missing):
        text_problem = f"{where}: its CLIP text tower's weights are incomplete, so CLIP-T cannot be computed"
    else:
        from transformers import AutoTokenizer

        try:
            tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        except (OSError, ValueError, KeyError, TypeError) as e:
            text_problem = (f"{where} has no usable tokenizer ({_first_line(e)}): CLIP-T needs its tokenizer files "
                            "(vocab.json + merges.txt, or tokenizer.json)")
    vision_config = model.config.vision_config if model_type == "clip" else model.config
    prep = _Preprocess(folder, vision_config.image_size, CLIP_MEAN, CLIP_STD, role)
    return ClipFolderModel(folder, model, prep, device, text_problem, tokenizer)


def load_dino(folder: str | Path, device: str = "cpu", role: str = "DINO model") -> DinoFolderModel:
    """A DINO v1 (``ViTModel``, pooler left out) or DINOv2 (``Dinov2Model``, also with registers) folder."""
    folder = Path(folder)
    model_type = read_config(folder, role).get("model_type")
    where = f"{role} {folder}"
    if model_type in CLIP_CLASSES or model_type == "clip_text_model":
        raise UserInputError(f"{where} is a CLIP model (model_type {model_type!r}), not DINO: use it as the CLIP model")
    if model_type not in DINO_CLASSES:
        raise UserInputError(f"{where} is not a DINO model (config.json model_type {model_type!r}): {DINO_NEEDS}")
    extra = {"add_pooling_layer": False} if model_type == "vit" else {}
    model, missing = _load(DINO_CLASSES[model_type], folder, role, **extra)
    if missing:
        raise UserInputError(f"{where} lacks {len(missing)} weights its config.json needs (e.g. {missing[0]}): the "
                             "folder is incomplete or holds another architecture")
    prep = _Preprocess(folder, model.config.image_size, IMAGENET_MEAN, IMAGENET_STD, role)
    return DinoFolderModel(folder, model, prep, device)
