"""Instance-image loading: sizes, modes, EXIF, transparency, bad files, and real DreamBooth photos."""

import os

import numpy as np
import pytest
import torch
from PIL import Image

from fewshot_personalize.kernels.core.errors import UserInputError
from fewshot_personalize.kernels.core.images import load_image_folder, open_rgb, resize_center_crop

DREAMBOOTH = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "dreambooth")


def test_any_size_becomes_square(image_folder):
    x = load_image_folder(image_folder, 32)
    assert x.shape == (4, 3, 32, 32) and x.min() >= -1 and x.max() <= 1


def test_exif_rotation_is_honoured(tmp_path):
    im = Image.new("RGB", (40, 20), (255, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise on display
    im.save(tmp_path / "r.jpg", exif=exif)
    assert open_rgb(tmp_path / "r.jpg").size == (20, 40)


def test_transparency_is_composited_on_white(tmp_path):
    im = Image.new("RGBA", (8, 8), (0, 0, 0, 0))
    im.save(tmp_path / "t.png")
    assert np.asarray(open_rgb(tmp_path / "t.png")).min() == 255


@pytest.mark.parametrize("mode", ["L", "P", "CMYK", "I;16", "LA"])
def test_other_modes_become_rgb(tmp_path, mode):
    im = Image.new(mode, (10, 12))
    path = tmp_path / ("m.tif" if mode in ("CMYK", "I;16") else "m.png")
    im.save(path)
    assert open_rgb(path).mode == "RGB"


def test_center_crop_keeps_the_middle():
    im = Image.new("RGB", (30, 10), (0, 0, 0))
    im.paste((255, 255, 255), (10, 0, 20, 10))
    out = np.asarray(resize_center_crop(im, 10))
    assert out.shape == (10, 10, 3) and out.mean() > 250


def test_bad_inputs_name_the_problem(tmp_path):
    with pytest.raises(UserInputError, match="does not exist"):
        load_image_folder(tmp_path / "nope", 32)
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserInputError, match="has no images"):
        load_image_folder(tmp_path / "empty", 32)
    (tmp_path / "zero").mkdir()
    (tmp_path / "zero" / "a.png").write_bytes(b"")
    with pytest.raises(UserInputError, match=r"a\.png is empty"):
        load_image_folder(tmp_path / "zero", 32)
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "a.jpg").write_bytes(b"not an image at all")
    with pytest.raises(UserInputError, match=r"a\.jpg cannot be read"):
        load_image_folder(tmp_path / "junk", 32)


@pytest.mark.skipif(not os.path.isdir(DREAMBOOTH), reason="DreamBooth sample photos (../shared/data/dreambooth) not present")
@pytest.mark.parametrize("subject", ["dog", "backpack", "duck_toy", "teapot"])
def test_real_dreambooth_photos(subject):
    x = load_image_folder(os.path.join(DREAMBOOTH, subject), 64)
    assert x.shape[1:] == (3, 64, 64) and 4 <= x.shape[0] <= 6
    assert x.std() > 0.1 and torch.isfinite(x).all()
