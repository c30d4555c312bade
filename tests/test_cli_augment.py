"""``augment`` and ``train --augment`` on the command line: the views written are the views trained on, the same
seed writes the same bytes, and bad input ends with one line and exit code 2 with nothing written."""

import hashlib

import numpy as np
import pytest
from PIL import Image

from fewshot_personalize.kernels.cli import main


def _run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture()
def masked_folder(tmp_path):
    """Three photos with NAME_mask.png subject masks (a disc), one without a mask."""
    d = tmp_path / "photos"
    d.mkdir()
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:48, :48]
    for i in range(4):
        Image.fromarray((rng.random((48, 48, 3)) * 255).astype("uint8")).save(d / f"p{i}.png")
        if i < 3:
            disc = ((yy - 24) ** 2 + (xx - 20 - 3 * i) ** 2 < 14 ** 2).astype("uint8") * 255
            Image.fromarray(disc, "L").save(d / f"p{i}_mask.png")
    return d


def _digest(folder):
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_augment_writes_views_masks_and_captions_byte_identical(masked_folder, tmp_path, capsys):
    args = ["augment", "--images", str(masked_folder), "--n", "6", "--resolution", "32", "--augment", "strong",
            "--prompt", "a photo of sks toy"]
    code, out, _ = _run(capsys, *args, "--out", str(tmp_path / "a"), "--seed", "3")
    assert code == 0 and "wrote 6 views of 4 photos" in out and "augmentation: flip 0.5" in out
    assert _run(capsys, *args, "--out", str(tmp_path / "b"), "--seed", "3")[0] == 0
    assert _run(capsys, *args, "--out", str(tmp_path / "c"), "--seed", "4")[0] == 0
    a, b, c = (_digest(tmp_path / x) for x in "abc")
    assert a == b and a != c
    assert sum(k.startswith("view_") and k.endswith("_mask.png") for k in a) == 6
    assert sum(k.startswith("valid/") for k in a) == 6
    lines = (tmp_path / "a" / "captions.txt").read_text().splitlines()
    assert len(lines) == 6 and all(line.split("\t")[0] == f"view_{i:04d}.png" for i, line in enumerate(lines))
    assert all(line.split("\t")[1].startswith("a photo of sks toy") or line.split("\t")[1] == "" for line in lines)
    # the written folder is itself a training folder: its masks are found by the project's convention
    from fewshot_personalize.kernels.core.images import load_masked_folder

    pixels, masks, _ = load_masked_folder(tmp_path / "a", 32)
    assert pixels.shape[0] == 6 and masks is not None


def test_augment_refuses_to_overwrite(masked_folder, tmp_path, capsys):
    args = ["augment", "--images", str(masked_folder), "--n", "2", "--resolution", "16", "--out", str(tmp_path / "o")]
    assert _run(capsys, *args)[0] == 0
    before = _digest(tmp_path / "o")
    code, _, err = _run(capsys, *args, "--seed", "9")
    assert code == 2 and "already exists (pass --overwrite" in err and _digest(tmp_path / "o") == before
    assert _run(capsys, *args, "--seed", "9", "--overwrite")[0] == 0 and _digest(tmp_path / "o") != before


@pytest.mark.parametrize("extra,message", [
    (["--aug-scale", "0.5,3"], "can leave the frame"),
    (["--aug-scale", "1.2,0.8"], "scale range"),
    (["--aug-background", "1.5"], "background probability"),
    (["--backgrounds", "EMPTY"], "has no images"),
    (["--n", "0"], "--n must be at least 1"),
])
def test_augment_bad_input(masked_folder, tmp_path, capsys, extra, message):
    (tmp_path / "empty").mkdir()
    extra = [str(tmp_path / "empty") if e == "EMPTY" else e for e in extra]
    code, _, err = _run(capsys, "augment", "--images", str(masked_folder), "--out", str(tmp_path / "o"),
                        "--resolution", "16", *extra)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())


def test_unknown_preset_is_refused_by_the_parser(masked_folder, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["augment", "--images", str(masked_folder), "--out", str(tmp_path / "o"), "--augment", "wild"])
    assert e.value.code == 2 and "invalid choice: 'wild'" in capsys.readouterr().err


def test_train_with_augmentation(tiny_sd, masked_folder, tmp_path, capsys):
    code, out, err = _run(capsys, "train", "--base", tiny_sd, "--images", str(masked_folder), "--prompt", "a sks toy",
                          "--steps", "2", "--rank", "1", "--augment", "standard", "--aug-rotate", "5",
                          "--out", str(tmp_path / "a.safetensors"))
    assert code == 0, err
    assert "augmentation: flip 0.5, rescale 0.75, scale_min 0.4, scale_max 1.3, rotate 5" in out
    assert (tmp_path / "a.safetensors").is_file()


def test_train_backgrounds_without_augmentation_is_refused(tiny_sd, masked_folder, tmp_path, capsys):
    code, _, err = _run(capsys, "train", "--base", tiny_sd, "--images", str(masked_folder), "--prompt", "a sks toy",
                        "--backgrounds", str(masked_folder), "--out", str(tmp_path / "a.safetensors"))
    assert code == 2 and "--backgrounds is for augmentation" in err
