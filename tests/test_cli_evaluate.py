"""``evaluate`` on the command line: real-model metrics with --clip/--dino (tiny random models built in code), the
demo evaluator without --clip, one clear line and exit code 2 for each bad input, and the DreamBooth photos."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from fewshot_personalize.kernels.cli import main
from fewshot_personalize.kernels.evaluation import ImageSet, load_clip, load_dino, score
from fewshot_personalize.kernels.testing.tiny_feature_models import build_tiny_clip

DREAMBOOTH = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "dreambooth")
SUBJECTS = ["backpack", "dog", "duck_toy", "teapot"]
needs_photos = pytest.mark.skipif(not os.path.isdir(DREAMBOOTH),
                                  reason="DreamBooth sample photos (../shared/data/dreambooth) not present")


def _run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def _folder(path, n, seed, size=(40, 48), masks=False):
    path.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        Image.fromarray((rng.random((*size, 3)) * 255).astype(np.uint8)).save(path / f"{i}.png")
        if masks:
            m = np.zeros(size, np.uint8)
            m[5:30, 10 + i:40] = 255
            Image.fromarray(m).save(path / f"{i}_mask.png")
    return path


@pytest.fixture()
def sets(tmp_path):
    return {"images": _folder(tmp_path / "gen", 3, 0, masks=True),
            "references": _folder(tmp_path / "refs", 2, 1, masks=True), "class": _folder(tmp_path / "cls", 3, 2)}


def test_evaluate_prints_the_scores_of_the_folders(capsys, sets, tiny_clip, tiny_dino, tmp_path):
    code, out, err = _run(capsys, "evaluate", "--images", sets["images"], "--references", sets["references"],
                          "--prompt", "a photo of sks toy", "--clip", tiny_clip, "--dino", tiny_dino,
                          "--class-images", sets["class"], "--device", "cpu")
    assert code == 0, err
    got = json.loads(out)
    assert {"clip_i", "clip_t", "dino", "clip_i_masked", "clip_t_masked", "dino_masked", "pres", "div"} <= set(got)
    assert got["masked"] == {"images": True, "references": True}
    assert got["counts"] == {"images": 3, "references": 2, "class_images": 3}
    # the same numbers as the library on the same folders
    read = lambda label, key: ImageSet.from_folder(label, sets[key])[0]  # noqa: E731
    want = score(read("images", "images"), read("references", "references"), load_clip(tiny_clip),
                 load_dino(tiny_dino), "a photo of sks toy", read("class images", "class"))
    for key in ("clip_i", "clip_t", "dino", "clip_i_masked", "clip_t_masked", "dino_masked", "pres", "div"):
        assert got[key] == pytest.approx(want[key], abs=1e-9), key

    out_file = tmp_path / "scores.json"
    code, out, _ = _run(capsys, "evaluate", "--images", sets["images"], "--references", sets["references"],
                        "--clip", tiny_clip, "--out", out_file)
    assert code == 0 and f"wrote {out_file}" in out
    written = json.loads(out_file.read_text())
    assert "clip_i" in written and "clip_t" not in written and "dino" not in written
    assert written["clip_i"] == pytest.approx(got["clip_i"], abs=1e-9)


def test_without_clip_the_demo_evaluator_scores(capsys, tmp_path):
    gen, refs = _folder(tmp_path / "g", 2, 0, (64, 64)), _folder(tmp_path / "r", 2, 1, (64, 64))
    code, out, err = _run(capsys, "evaluate", "--images", gen, "--references", refs, "--prompt",
                          "a red toy on the beach")
    assert code == 0, err
    got = json.loads(out)
    assert {"prompt_fidelity", "subject_fidelity", "diversity"} <= set(got) and "clip_i" not in got


@pytest.fixture()
def bad(tmp_path, tiny_clip):
    """Folders that are wrong in one way each."""
    d = tmp_path
    (d / "empty").mkdir()
    (d / "exists.json").write_text("keep me")
    (d / "bert").mkdir()
    (d / "bert" / "config.json").write_text(json.dumps({"model_type": "bert"}))
    save_file({"x": torch.zeros(1)}, str(d / "bert" / "model.safetensors"))
    (d / "pickled").mkdir()
    (d / "pickled" / "config.json").write_text(json.dumps({"model_type": "clip"}))
    (d / "pickled" / "pytorch_model.bin").write_bytes(b"not loaded")
    for name, drop in (("no_text_proj", "text_projection.weight"), ("no_visual_proj", "visual_projection.weight")):
        shutil.copytree(tiny_clip, d / name)
        sd = load_file(str(d / name / "model.safetensors"))
        sd.pop(drop)
        save_file(sd, str(d / name / "model.safetensors"), metadata={"format": "pt"})
    build_tiny_clip(d / "vision_only", vision_only=True)
    _folder(d / "wrong_mask", 2, 3)
    Image.new("L", (10, 10), 255).save(d / "wrong_mask" / "1_mask.png")
    _folder(d / "orphan", 2, 4)
    (d / "orphan" / "masks").mkdir()
    Image.new("L", (48, 40), 255).save(d / "orphan" / "masks" / "zzz.png")
    _folder(d / "black_mask", 2, 5)
    Image.new("L", (48, 40), 0).save(d / "black_mask" / "0_mask.png")
    return d


BAD = {  # case: (flags that replace the good ones, message)
    "clip folder is DINO": (["--clip", "{dino}"], "is a DINO model (model_type 'dinov2'), not CLIP"),
    "dino folder is CLIP": (["--dino", "{clip}"], "is a CLIP model (model_type 'clip'), not DINO"),
    "not a CLIP model": (["--clip", "{tmp}/bert"], "is not a CLIP model (config.json model_type 'bert')"),
    "no config": (["--clip", "{tmp}/empty"], "is not a transformers model folder (no config.json)"),
    "missing model folder": (["--clip", "{tmp}/nope"], "no such model folder"),
    "pickled weights only": (["--clip", "{tmp}/pickled"], "has only pickled weights (pytorch_model.bin)"),
    "text tower without projection": (["--clip", "{tmp}/no_text_proj"], "text tower has no projection"),
    "vision-only CLIP with a prompt": (["--clip", "{tmp}/vision_only"], "is a vision-only CLIP"),
    "no visual projection": (["--clip", "{tmp}/no_visual_proj"], "has no visual projection"),
    "mask of another size": (["--images", "{tmp}/wrong_mask"], "is 10x10 but"),
    "mask without its photo": (["--references", "{tmp}/orphan"], "has no photo named zzz"),
    "empty mask": (["--images", "{tmp}/black_mask"], "0.png: the mask is empty"),
    "empty folder": (["--images", "{tmp}/empty"], "has no images"),
    "missing folder": (["--references", "{tmp}/nope"], "does not exist"),
    "existing output": (["--out", "{tmp}/exists.json"], "already exists (pass --overwrite"),
    "dino without clip": (["--clip", None, "--dino", "{dino}"], "need --clip"),
    "demo evaluator without prompt": (["--clip", None, "--prompt", None], "--prompt is needed"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_gives_one_line_and_exit_2(case, bad, sets, tiny_clip, tiny_dino, capsys):
    override, message = BAD[case]
    opts = {"--images": str(sets["images"]), "--references": str(sets["references"]), "--prompt": "a sks toy",
            "--clip": tiny_clip, "--out": str(bad / "out.json")}
    for flag, value in zip(override[::2], override[1::2]):
        opts[flag] = None if value is None else value.format(tmp=bad, clip=tiny_clip, dino=tiny_dino)
    argv = ["evaluate"] + [x for kv in opts.items() if kv[1] is not None for x in kv]
    code, out, err = _run(capsys, *argv)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], err
    assert not (bad / "out.json").exists() and (bad / "exists.json").read_text() == "keep me"


@needs_photos
@pytest.mark.parametrize("subject", SUBJECTS)
def test_dreambooth_photos_through_the_command_line(subject, tiny_clip, tiny_dino, tmp_path, capsys):
    photos = sorted(p for p in os.listdir(os.path.join(DREAMBOOTH, subject)) if p.endswith(".jpg"))
    other = SUBJECTS[(SUBJECTS.index(subject) + 1) % len(SUBJECTS)]
    # masked copies of the set: links to the photos (never copies) beside a centre mask of each photo's size
    masked = tmp_path / "masked"
    masked.mkdir()
    for p in photos:
        src = os.path.join(DREAMBOOTH, subject, p)
        os.symlink(os.path.abspath(src), masked / p)
        w, h = Image.open(src).size
        m = np.zeros((h, w), np.uint8)
        m[h // 4:3 * h // 4, w // 3:2 * w // 3] = 255
        Image.fromarray(m).save(masked / (p[:-4] + "_mask.png"))
    code, out, err = _run(capsys, "evaluate", "--images", os.path.join(DREAMBOOTH, subject), "--references", masked,
                          "--prompt", f"a photo of sks {subject.replace('_', ' ')}", "--clip", tiny_clip,
                          "--dino", tiny_dino, "--class-images", os.path.join(DREAMBOOTH, other))
    assert code == 0, err
    got = json.loads(out)
    n_other = len([p for p in os.listdir(os.path.join(DREAMBOOTH, other)) if p.endswith(".jpg")])
    assert got["counts"] == {"images": len(photos), "references": len(photos), "class_images": n_other}
    assert got["masked"] == {"images": False, "references": True}
    for key in ("clip_i", "clip_t", "dino", "clip_i_masked", "dino_masked", "pres", "div"):
        assert -1 <= got[key] <= 1 and np.isfinite(got[key]), key
    assert got["clip_i_masked"] != pytest.approx(got["clip_i"], abs=1e-9)  # the masks changed what was compared


@needs_photos
def test_python_dash_m_evaluate(tiny_clip, tiny_dino):
    dog = os.path.join(DREAMBOOTH, "dog")
    r = subprocess.run([sys.executable, "-m", "fewshot_personalize", "evaluate", "--images", dog, "--references", dog,
                        "--prompt", "a photo of sks dog", "--clip", tiny_clip, "--dino", tiny_dino],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout)
    assert got["dino"] > 0 and got["counts"]["images"] == 5 and got["prompt"] == "a photo of sks dog"
