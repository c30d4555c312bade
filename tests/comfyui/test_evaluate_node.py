"""The evaluation node: model folders from models/fewshot_eval and a stock CLIP_VISION (CLIP and DINOv2, built in code
and loaded into ComfyUI's own ClipVisionModel) give the scores transformers' own features give; bad input raises a
clear error."""

from __future__ import annotations

import json
import os

import pytest
import torch

pytestmark = pytest.mark.comfyui
if not os.environ.get("COMFYUI_PATH"):
    pytest.skip("COMFYUI_PATH is not set: the ComfyUI suite needs a ComfyUI source checkout (v0.3.64 or newer)",
                allow_module_level=True)

TINY = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)


def batch(n, size, seed):
    """IMAGE [n,H,W,3] on the 1/255 grid (what ComfyUI's and transformers' preprocessing both keep exactly)."""
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(n, size, size, 3, generator=g) * 255).round() / 255


def cos_mean(a, b):
    a, b = torch.nn.functional.normalize(a.double(), dim=-1), torch.nn.functional.normalize(b.double(), dim=-1)
    return float((a @ b.T).mean())


@pytest.fixture
def eval_dir(tmp_path, monkeypatch):
    """models/fewshot_eval for this test, holding a tiny CLIPModel ("clip") and a tiny DINOv2 ("org/dinov2")."""
    import folder_paths

    from fewshot_personalize.kernels.testing.tiny_feature_models import build_tiny_clip, build_tiny_dino

    d = tmp_path / "fewshot_eval"
    build_tiny_clip(d / "clip")
    build_tiny_dino(d / "org" / "dinov2")
    monkeypatch.setitem(folder_paths.folder_names_and_paths, "fewshot_eval", ([str(d)], set()))
    return d


def run(**kw):
    from fewshot_personalize.nodes.evaluate import EvaluateConcept

    args = {"prompt": "", "clip_model": "none", "dino_model": "none", **kw}
    with torch.inference_mode():  # as ComfyUI runs every node
        out = EvaluateConcept.execute(**args)
    return json.loads(out.args[0]), out.args[1]


def test_node_lists_model_folders_and_scores_like_the_library(eval_dir):
    from fewshot_personalize.kernels.evaluation import ImageSet, load_clip, load_dino, score
    from fewshot_personalize.nodes.evaluate import EvaluateConcept

    schema = EvaluateConcept.define_schema()
    combo = next(i for i in schema.inputs if i.id == "clip_model")
    assert combo.options == ["none", "clip", "org/dinov2"]
    imgs, refs, cls = batch(3, 40, 0), batch(2, 36, 1), batch(2, 40, 2)
    masks = torch.zeros(3, 40, 40)
    masks[:, 5:30, 8:33] = 1
    got, table = run(images=imgs, references=refs, prompt="a photo of sks toy", clip_model="clip",
                     dino_model="org/dinov2", image_masks=masks, class_images=cls)
    want = score(ImageSet.from_batch("images", imgs, masks), ImageSet.from_batch("references", refs),
                 load_clip(eval_dir / "clip"), load_dino(eval_dir / "org" / "dinov2"), "a photo of sks toy",
                 ImageSet.from_batch("class images", cls))
    for key in ("clip_i", "clip_t", "dino", "clip_i_masked", "clip_t_masked", "dino_masked", "pres", "div"):
        assert got[key] == pytest.approx(want[key], abs=1e-9), key
    assert got["masked"] == {"images": True, "references": False}
    assert table.ndim == 4 and table.shape[0] == 1 and table.shape[-1] == 3 and table.min() < 0.5


def _comfy_clip_vision(tmp_path, config, folder):
    """ComfyUI's ClipVisionModel with ``config`` and the weights of a transformers folder, as stored on disk."""
    import comfy.clip_vision
    from safetensors.torch import load_file

    path = tmp_path / "clip_vision_config.json"
    path.write_text(json.dumps(config))
    cv = comfy.clip_vision.ClipVisionModel(str(path))
    missing, _ = cv.load_sd(load_file(os.path.join(folder, "model.safetensors")))
    assert not missing, missing
    return cv


def test_stock_clip_vision_gives_clip_i(tmp_path):
    from transformers import CLIPVisionModelWithProjection

    from fewshot_personalize.kernels.testing.tiny_feature_models import build_tiny_clip

    folder = build_tiny_clip(tmp_path / "clip_vision", vision_only=True)
    hf = CLIPVisionModelWithProjection.from_pretrained(folder).eval()
    config = {**TINY, "model_type": "clip_vision_model", "hidden_act": "quick_gelu", "image_size": 32, "patch_size": 8,
              "num_channels": 3, "projection_dim": 16, "layer_norm_eps": 1e-5}
    cv = _comfy_clip_vision(tmp_path, config, folder)
    imgs, refs = batch(3, 32, 0), batch(2, 32, 1)
    got, _ = run(images=imgs, references=refs, clip_vision=cv)

    mean, std = torch.tensor(cv.image_mean).view(1, 3, 1, 1), torch.tensor(cv.image_std).view(1, 3, 1, 1)
    with torch.no_grad():
        f = lambda x: hf(pixel_values=(x.movedim(-1, 1) - mean) / std).image_embeds  # noqa: E731
        want = cos_mean(f(imgs), f(refs))
    assert got["clip_i"] == pytest.approx(want, abs=1e-5)
    assert got["models"]["clip"] == "CLIP_VISION (CLIP)" and "dino" not in got

    with pytest.raises(ValueError, match="no text tower"):
        run(images=imgs, references=refs, clip_vision=cv, prompt="a dog")
    with pytest.raises(ValueError, match="3 masks for 2 references"):
        run(images=imgs, references=refs, clip_vision=cv, reference_masks=torch.ones(3, 32, 32))
    with pytest.raises(ValueError, match="masks must have their image's size"):
        run(images=imgs, references=refs, clip_vision=cv, image_masks=torch.ones(3, 16, 16))


def test_stock_clip_vision_dinov2_gives_dino(tmp_path, eval_dir):
    from transformers import Dinov2Model

    from fewshot_personalize.kernels.testing.tiny_feature_models import build_tiny_dino

    # ComfyUI 0.3.64 builds DINOv2's position table for 518 px in patches of 14, whatever the config says
    folder = build_tiny_dino(tmp_path / "dinov2_vision", image_size=518)
    hf = Dinov2Model.from_pretrained(folder).eval()
    config = {"model_type": "dinov2", "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
              "layer_norm_eps": 1e-6, "use_swiglu_ffn": False, "image_size": 518, "patch_size": 14,
              "image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225]}
    cv = _comfy_clip_vision(tmp_path, config, folder)
    imgs, refs = batch(2, 518, 0), batch(2, 518, 1)
    got, _ = run(images=imgs, references=refs, clip_vision=cv, class_images=refs)

    mean, std = torch.tensor(cv.image_mean).view(1, 3, 1, 1), torch.tensor(cv.image_std).view(1, 3, 1, 1)
    with torch.no_grad():
        f = lambda x: hf(pixel_values=(x.movedim(-1, 1) - mean) / std).pooler_output  # noqa: E731
        fi, fr = f(imgs), f(refs)
    assert got["dino"] == pytest.approx(cos_mean(fi, fr), abs=1e-5)
    assert got["pres"] == pytest.approx(cos_mean(fr, fr), abs=1e-5)
    assert got["models"] == {"clip": None, "dino": "CLIP_VISION (DINOv2)", "pres_and_div": "dino"}

    with pytest.raises(ValueError, match="clip_vision is a DINO model and dino_model is set too"):
        run(images=imgs, references=refs, clip_vision=cv, dino_model="org/dinov2")


def test_node_refuses_bad_model_choices(eval_dir):
    imgs = batch(2, 32, 0)
    with pytest.raises(ValueError, match="no feature model"):
        run(images=imgs, references=imgs)
    with pytest.raises(ValueError, match="is a DINO model .* not CLIP"):
        run(images=imgs, references=imgs, clip_model="org/dinov2")
    with pytest.raises(ValueError, match="not in models/fewshot_eval"):
        run(images=imgs, references=imgs, clip_model="gone")
    with pytest.raises(ValueError, match="points outside"):
        run(images=imgs, references=imgs, clip_model="../../etc")


def test_other_image_encoders_are_refused():
    from fewshot_personalize.nodes.backend.clip_vision import clip_vision_kind

    class Siglip:  # what ComfyUI records on a SigLIP CLIP_VISION
        model_type = "siglip_vision_model"
        model = None

    with pytest.raises(ValueError, match="siglip_vision_model image encoder"):
        clip_vision_kind(Siglip())
