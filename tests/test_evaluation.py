"""Evaluation with real model architectures (tiny, random, built in code): CLIP-I, CLIP-T, DINO, PRES and DIV equal
what transformers' own feature computations give; identical images score the maximum; the masked scores see the
subject only; the pieces refuse bad input with a message."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from fewshot_personalize.kernels.core.errors import UserInputError
from fewshot_personalize.kernels.evaluation import ImageSet, load_clip, load_dino, metrics_table, score
from fewshot_personalize.kernels.evaluation.feature_models import CLIP_MEAN, IMAGENET_MEAN
from fewshot_personalize.kernels.evaluation.masking import subject_crop
from fewshot_personalize.kernels.testing.tiny_feature_models import build_tiny_clip, build_tiny_dino

SIZES = [(40, 50), (32, 32), (64, 48)]


def arrays(n, seed, sizes=SIZES):
    rng = np.random.default_rng(seed)
    return [(rng.random((*sizes[i % len(sizes)], 3)) * 255).astype(np.uint8) for i in range(n)]


def as_set(label, arrs, masks=None):
    return ImageSet(label, [torch.from_numpy(a.astype(np.float32) / 255) for a in arrs], masks)


def cos_mean(a, b):
    a, b = torch.nn.functional.normalize(a.double(), dim=-1), torch.nn.functional.normalize(b.double(), dim=-1)
    return float((a @ b.T).mean())


def hf_features(out):
    """transformers 5 returns a model output from get_*_features (projected pooler_output), 4.x a tensor."""
    return getattr(out, "pooler_output", out)


def test_clip_i_and_clip_t_equal_transformers_features(tiny_clip):
    from transformers import AutoImageProcessor, AutoTokenizer, CLIPModel

    gen, refs = arrays(3, 0), arrays(2, 1)
    got = score(as_set("images", gen), as_set("references", refs), load_clip(tiny_clip), prompt="a photo of sks dog")

    model = CLIPModel.from_pretrained(tiny_clip).eval()
    proc, tok = AutoImageProcessor.from_pretrained(tiny_clip), AutoTokenizer.from_pretrained(tiny_clip)
    pixels = lambda arrs: proc(images=[Image.fromarray(a) for a in arrs], return_tensors="pt")  # noqa: E731
    with torch.no_grad():
        fg = hf_features(model.get_image_features(**pixels(gen)))
        fr = hf_features(model.get_image_features(**pixels(refs)))
        ft = hf_features(model.get_text_features(**tok(["a photo of sks dog"], return_tensors="pt")))
    assert got["clip_i"] == pytest.approx(cos_mean(fg, fr), abs=1e-5)
    assert got["clip_t"] == pytest.approx(cos_mean(fg, ft), abs=1e-5)
    assert got["div"] == pytest.approx(1 - (cos_mean(fg, fg) * 9 - 3) / 6, abs=1e-5)  # CLIP features without DINO
    assert got["models"]["pres_and_div"] == "clip"
    assert "dino" not in got and "pres" not in got and "clip_i_masked" not in got
    assert got["masked"] == {"images": False, "references": False}


@pytest.mark.parametrize("kind", ["dinov2", "vit", "dinov2_with_registers"])
def test_dino_pres_and_div_equal_transformers_features(kind, tmp_path):
    import transformers

    folder = build_tiny_dino(tmp_path / kind, kind=kind, image_size=28 if kind != "vit" else 32,
                             patch_size=14 if kind != "vit" else 8)
    gen, refs, cls = arrays(3, 0), arrays(2, 1), arrays(4, 2)
    got = score(as_set("images", gen), as_set("references", refs), dino=load_dino(folder),
                class_images=as_set("class images", cls))

    auto = {"vit": "ViTModel", "dinov2": "Dinov2Model", "dinov2_with_registers": "Dinov2WithRegistersModel"}[kind]
    kw = {"add_pooling_layer": False} if kind == "vit" else {}
    model = getattr(transformers, auto).from_pretrained(folder, **kw).eval()
    proc = transformers.AutoImageProcessor.from_pretrained(folder)

    def feats(arrs):
        with torch.no_grad():
            out = model(**proc(images=[Image.fromarray(a) for a in arrs], return_tensors="pt"))
        # DINO v1: the CLS token of the last layer; DINOv2's pooler output is that token after its layer norm
        return out.last_hidden_state[:, 0] if kind == "vit" else out.pooler_output

    fg, fr, fc = feats(gen), feats(refs), feats(cls)
    assert got["dino"] == pytest.approx(cos_mean(fg, fr), abs=1e-5)
    assert got["pres"] == pytest.approx(cos_mean(fc, fr), abs=1e-5)
    assert got["div"] == pytest.approx(1 - (cos_mean(fg, fg) * 9 - 3) / 6, abs=1e-5)
    assert got["models"] == {"clip": None, "dino": kind, "pres_and_div": "dino"}
    assert got["counts"] == {"images": 3, "references": 2, "class_images": 4}


def test_identical_images_score_the_maximum(tiny_clip, tiny_dino):
    clip, dino = load_clip(tiny_clip), load_dino(tiny_dino)
    one, other = arrays(1, 0), arrays(1, 5)
    same = score(as_set("images", one * 3), as_set("references", one * 2), clip, dino, "a dog")
    assert same["clip_i"] == pytest.approx(1.0, abs=1e-6) and same["dino"] == pytest.approx(1.0, abs=1e-6)
    assert same["div"] == pytest.approx(0.0, abs=1e-6)
    diff = score(as_set("images", other * 3), as_set("references", one * 2), clip, dino, "a dog")
    assert diff["clip_i"] < same["clip_i"] - 1e-4 and diff["dino"] < same["dino"] - 1e-4
    assert diff["div"] == pytest.approx(0.0, abs=1e-6)
    assert same["clip_t"] != pytest.approx(diff["clip_t"], abs=1e-6)  # CLIP-T looks at the images


def _scene(size, background_seed, subject, at):
    """A random background of ``size`` with ``subject`` pasted at ``at``, and the subject's mask."""
    h, w = size
    img = np.random.default_rng(background_seed).random((h, w, 3)).astype(np.float32)
    mask = np.zeros((h, w), np.float32)
    sh, sw = subject.shape[:2]
    img[at[0]:at[0] + sh, at[1]:at[1] + sw] = subject
    mask[at[0]:at[0] + sh, at[1]:at[1] + sw] = 1
    return torch.from_numpy(img), torch.from_numpy(mask)


def test_masked_scores_see_the_subject_only(tiny_clip, tiny_dino):
    subject = np.random.default_rng(99).random((12, 18, 3)).astype(np.float32)
    scenes = [_scene((40, 50), 1, subject, (3, 4)), _scene((32, 32), 2, subject, (15, 10)),
              _scene((48, 64), 3, subject, (30, 40))]
    refs = [_scene((36, 36), 4, subject, (10, 9)), _scene((50, 40), 5, subject, (0, 0))]
    images = ImageSet("images", [i for i, _ in scenes], [m for _, m in scenes])
    references = ImageSet("references", [i for i, _ in refs], [m for _, m in refs])
    got = score(images, references, load_clip(tiny_clip), load_dino(tiny_dino), "a photo of sks toy")
    assert got["clip_i"] < 0.999 and got["dino"] < 0.999  # the backgrounds differ
    assert got["clip_i_masked"] == pytest.approx(1.0, abs=1e-6)
    assert got["dino_masked"] == pytest.approx(1.0, abs=1e-6)
    assert got["masked"] == {"images": True, "references": True}
    assert "clip_t_masked" in got and got["clip_t_masked"] != pytest.approx(got["clip_t"], abs=1e-6)

    whole = ImageSet("images", [i for i, _ in scenes])  # a set without masks is used whole
    partial = score(whole, references, load_clip(tiny_clip), prompt="a photo of sks toy")
    assert partial["masked"] == {"images": False, "references": True}
    assert "clip_i_masked" in partial and "clip_t_masked" not in partial
    assert partial["clip_i_masked"] != pytest.approx(got["clip_i_masked"], abs=1e-6)


def test_subject_crop_is_the_square_around_the_subject_on_the_background():
    image = torch.rand(6, 10, 3)
    mask = torch.zeros(6, 10)
    mask[1:4, 2:8] = 1  # 3 rows x 6 columns
    out = subject_crop(image, mask, (0.1, 0.2, 0.3))
    assert out.shape == (6, 6, 3)
    # the square is centred on the box: rows -1..4 (one row above the image, filled), columns 2..7
    torch.testing.assert_close(out[2:5], image[1:4, 2:8])
    bg = torch.tensor([0.1, 0.2, 0.3])
    assert torch.allclose(out[0], bg.expand(6, 3)) and torch.allclose(out[1], bg.expand(6, 3))
    assert torch.allclose(out[5], bg.expand(6, 3))  # image row 4 is outside the mask
    soft = mask * 0.5 + 0.25  # soft edges blend: 0.75 inside, 0.25 outside
    blended = subject_crop(image, soft, (0.0, 0.0, 0.0))
    torch.testing.assert_close(blended[2:5], image[1:4, 2:8] * 0.75)


def test_without_an_image_processor_the_config_size_and_standard_mean_are_used(tmp_path):
    from transformers import CLIPModel

    with_proc = load_clip(build_tiny_clip(tmp_path / "a", seed=3))
    bare = load_clip(build_tiny_clip(tmp_path / "b", seed=3, processor=False))
    assert bare.background == pytest.approx(CLIP_MEAN) and bare.prep.processor is None
    imgs = [torch.from_numpy(a.astype(np.float32) / 255) for a in arrays(2, 7, [(32, 32)])]
    # at the model's own size the processor only normalises, and the fallback must agree with it
    torch.testing.assert_close(bare.image_features(imgs), with_proc.image_features(imgs), atol=1e-5, rtol=1e-5)
    assert isinstance(bare.model, CLIPModel)
    dino = load_dino(build_tiny_dino(tmp_path / "d", processor=False))
    assert dino.background == pytest.approx(IMAGENET_MEAN) and dino.prep.size == 28
    big = [torch.rand(60, 90, 3)]
    assert dino.prep(big).shape == (1, 3, 28, 28)


def test_image_sets_refuse_mismatched_masks_and_empty_ones():
    imgs = torch.rand(2, 16, 20, 3)
    with pytest.raises(UserInputError, match="1 masks for 2 images"):
        ImageSet.from_batch("images", imgs, torch.ones(1, 16, 20))
    with pytest.raises(UserInputError, match="mask of images #1 is 20x20 but the image is 20x16"):
        ImageSet("images", list(imgs), [torch.ones(16, 20), torch.ones(20, 20)])
    with pytest.raises(UserInputError, match="no references were given"):
        ImageSet("references", [])
    empty = ImageSet.from_batch("images", imgs, torch.zeros(2, 16, 20))
    with pytest.raises(UserInputError, match="images #0: the mask is empty"):
        empty.subjects((0.5, 0.5, 0.5))


def test_prompt_needs_a_text_tower_and_a_model_is_needed(tmp_path, tiny_dino):
    vision = load_clip(build_tiny_clip(tmp_path / "v", vision_only=True))
    s = as_set("images", arrays(2, 0))
    with pytest.raises(UserInputError, match="vision-only CLIP"):
        score(s, s, vision, prompt="a dog")
    with pytest.raises(UserInputError, match="CLIP-T needs a CLIP model"):
        score(s, s, dino=load_dino(tiny_dino), prompt="a dog")
    with pytest.raises(UserInputError, match="no feature model"):
        score(s, s)
    got = score(as_set("images", arrays(1, 0)), s, vision)  # one image: no DIV, said so
    assert "clip_i" in got and "div" not in got and "clip_t" not in got
    assert any("at least 2" in n for n in got["notes"])


def test_metrics_table_has_a_row_per_metric(tiny_clip, tiny_dino):
    s = as_set("images", arrays(2, 0))
    few = metrics_table(score(s, s, load_clip(tiny_clip)))
    many = metrics_table(score(s, s, load_clip(tiny_clip), load_dino(tiny_dino), "a dog", s))
    rows = lambda im: (im.height - 8) // 24 - 2  # noqa: E731
    assert rows(few) == 2 and rows(many) == 5  # clip_i, div | clip_i, dino, clip_t, pres, div
    arr = np.asarray(many)
    assert (arr < 128).any() and (arr == 255).any()  # text on a white ground
