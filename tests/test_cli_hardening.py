"""More bad input on the command line (issue 16 §4): each a one-line message and exit 2, nothing written; and odd
but valid images (grayscale, RGBA, 16-bit, palette, huge, a single one) train without complaint."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fewshot_personalize.kernels.formats.safetensors_io import atomic_save

from .test_cli import _run_main

TRAIN_BAD = {
    "negative learning rate": (["--lr", "-1"], "learning rate must be a positive number"),
    "NaN learning rate": (["--lr", "nan"], "learning rate must be a positive number, got nan"),
    "infinite learning rate": (["--lr", "inf"], "learning rate must be a positive number, got inf"),
    "NaN text-encoder rate": (["--train-text-encoder", "--text-lr", "nan"], "text-encoder learning rate must be"),
    "NaN prior weight": (["--class-prompt", "a toy", "--prior-weight", "nan"], "prior weight must be a number"),
    "resolution not a multiple of 8": (["--resolution", "60"], "resolution must be a multiple of 8"),
    "batch size zero": (["--batch-size", "0"], "batch size must be at least 1"),
    "flip probability above one": (["--flip", "1.5"], "flip probability must be in [0, 1]"),
    "NaN embedding rate": (["--method", "ed-lora", "--token", "<q1>", "--prompt", "a <q1>", "--embedding-lr", "nan"],
                           "embedding learning rate must be a positive number"),
}


@pytest.mark.parametrize("case", sorted(TRAIN_BAD))
def test_bad_training_numbers_give_one_line_and_exit_2(case, tiny_sd, image_folder, tmp_path, capsys):
    flags, message = TRAIN_BAD[case]
    opts = ["--prompt", "a sks toy"] if "--prompt" not in flags else []
    code, _, err = _run_main(capsys, "train", "--base", tiny_sd, "--images", str(image_folder), "--steps", "1",
                             "--out", str(tmp_path / "o.safetensors"), *opts, *flags)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], err
    assert not list(tmp_path.glob("*.safetensors"))


def test_a_model_folder_of_pickled_weights_is_refused(tiny_sd, image_folder, tmp_path, capsys):
    """``.bin`` weights are pickles (loading one can run code): refused by name, never loaded."""
    from diffusers import DiffusionPipeline

    DiffusionPipeline.from_pretrained(tiny_sd).save_pretrained(tmp_path / "bin", safe_serialization=False)
    capsys.readouterr()  # the progress bars of making it
    code, _, err = _run_main(capsys, "train", "--base", str(tmp_path / "bin"), "--images", str(image_folder),
                             "--prompt", "a sks toy", "--steps", "1", "--out", str(tmp_path / "o.safetensors"))
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "unet/diffusion_pytorch_model.bin" in lines[0] and "pickled" in lines[0], err
    assert not (tmp_path / "o.safetensors").exists()


def test_odd_but_valid_images_train(tiny_sd, tmp_path, capsys):
    from PIL import Image

    d = tmp_path / "odd"
    d.mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (40, 40), dtype=np.uint8), "L").save(d / "gray.png")
    Image.fromarray(rng.integers(0, 256, (40, 48, 4), dtype=np.uint8), "RGBA").save(d / "alpha.png")
    Image.fromarray(rng.integers(0, 65536, (36, 36), dtype=np.uint16)).save(d / "deep16.png")  # mode I;16
    Image.fromarray(rng.integers(0, 256, (32, 40, 3), dtype=np.uint8)).convert("P").save(d / "palette.png")
    Image.fromarray(rng.integers(0, 256, (2400, 3200, 3), dtype=np.uint8)).save(d / "huge.jpg")
    out = tmp_path / "o.safetensors"
    code, stdout, err = _run_main(capsys, "train", "--base", tiny_sd, "--images", str(d), "--prompt", "a sks toy",
                                  "--steps", "1", "--resolution", "32", "--out", str(out))
    assert code == 0, err
    assert out.is_file() and "trained 1 steps" in stdout

    one = tmp_path / "one"
    one.mkdir()
    (d / "gray.png").rename(one / "gray.png")
    code, _, err = _run_main(capsys, "train", "--base", tiny_sd, "--images", str(one), "--prompt", "a sks toy",
                             "--steps", "1", "--resolution", "32", "--out", str(tmp_path / "one.safetensors"))
    assert code == 0, err


def _generate(capsys, tiny_sd, tmp_path, *flags):
    return _run_main(capsys, "generate", "--base", tiny_sd, "--prompt", "a toy", "--steps", "1", "--resolution", "32",
                     "--out", str(tmp_path / "imgs"), *flags)


def test_truncated_file_and_wrong_width_embedding_are_refused(tiny_sd, tmp_path, capsys):
    good = tmp_path / "good.safetensors"
    atomic_save({"emb_params": torch.zeros(1, 32)}, good, {"fsp.method": "textual-inversion"})
    data = good.read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    code, _, err = _generate(capsys, tiny_sd, tmp_path, "--adapter", str(tmp_path / "cut.safetensors"))
    assert code == 2 and "not a readable safetensors file" in err and "Traceback" not in err
    atomic_save({"emb_params": torch.zeros(1, 16)}, tmp_path / "narrow.safetensors", {"fsp.method": "textual-inversion"})
    code, _, err = _generate(capsys, tiny_sd, tmp_path, "--adapter", str(tmp_path / "narrow.safetensors"))
    assert code == 2 and "16" in err and "32" in err, err
    assert not (tmp_path / "imgs").exists()


@pytest.mark.parametrize("region,message", [
    ("0,0,0,32:a toy", "zero area"),
    ("40,0,64,32:a toy", "outside"),
    ("0,0,16:a toy", "x0,y0,x1,y1:prompt"),
    ("0,0,16,16:", "empty"),
])
def test_bad_regions_are_refused(region, message, tiny_sd, tmp_path, capsys):
    code, _, err = _generate(capsys, tiny_sd, tmp_path, "--region", region)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and message in lines[0], err
    assert not (tmp_path / "imgs").exists()


def test_fuse_refuses_one_adapter_a_repeated_token_and_a_file_without_lora(tiny_sd, image_folder, tmp_path, capsys):
    concept = tmp_path / "c.safetensors"
    code, _, err = _run_main(capsys, "train", "--base", tiny_sd, "--images", str(image_folder), "--method", "ed-lora",
                             "--token", "<q1>", "--prompt", "a <q1>", "--steps", "1", "--rank", "2", "--out",
                             str(concept))
    assert code == 0, err
    atomic_save({"emb_params": torch.zeros(1, 32)}, tmp_path / "ti.safetensors", {"fsp.method": "textual-inversion"})
    out = tmp_path / "fused.safetensors"
    for adapters, message in [([concept], "two or more"), ([concept, concept], "both use the token '<q1>'"),
                              ([concept, tmp_path / "ti.safetensors"], "no LoRA weights")]:
        flags = [x for a in adapters for x in ("--adapter", str(a))]
        code, _, err = _run_main(capsys, "fuse", "--base", tiny_sd, *flags, "--out", str(out))
        assert code == 2 and message in err and "Traceback" not in err, (adapters, err)
        assert not out.exists()
