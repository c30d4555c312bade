"""The VAE round-trip report (core/round_trip.py) and the trainer's measurement of it on a real pipeline."""

import pytest
import torch
import torch.nn.functional as F

from fewshot_personalize.kernels.core.round_trip import describe, round_trip_report


def _checker(n=2, size=32, cell=2):
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    sel = ((yy // cell + xx // cell) % 2).float()
    red, white = torch.tensor([0.7, -0.7, -0.7]), torch.tensor([0.9, 0.9, 0.9])
    img = red[:, None, None] * (1 - sel) + white[:, None, None] * sel
    return img.expand(n, -1, -1, -1).clone()


def test_a_perfect_round_trip_keeps_everything():
    x = _checker()
    r = round_trip_report(x, x.clone())
    assert r["detail_kept"] == pytest.approx(1.0) and r["colour_error"] == pytest.approx(0.0) and r["psnr_db"] > 100


def test_blur_loses_the_pattern_but_not_the_colour():
    x = _checker()
    blurred = F.avg_pool2d(F.pad(x, (2, 2, 2, 2), mode="replicate"), 5, stride=1)
    r = round_trip_report(x, blurred)
    assert r["detail_kept"] < 0.5
    assert r["colour_error"] < 0.02


def test_colour_shift_is_measured_as_a_fraction_of_the_range():
    x = _checker()
    y = x.clone()
    y[:, 0] -= 0.3  # red channel down by 0.3 of the [-1, 1] range = 15 % of it
    r = round_trip_report(x, y)
    assert r["colour_error"] == pytest.approx(0.15 / 3, abs=1e-6)
    assert r["psnr_db"] == pytest.approx(10 * torch.log10(torch.tensor(4 / (0.09 / 3))).item(), abs=1e-3)


def test_masks_limit_the_report_to_the_subject():
    x = _checker()
    y = x.clone()
    y[:, :, :, 16:] = 0.0  # the right half is lost
    masks = torch.zeros(2, 1, 32, 32)
    masks[:, :, :, :14] = 1  # the 3×3 detail filter reaches one pixel across
    assert round_trip_report(x, y, masks)["detail_kept"] == pytest.approx(1.0)
    assert round_trip_report(x, y)["detail_kept"] < 0.6
    assert "subject" in describe(round_trip_report(x, y, masks))


def test_shape_mismatch_is_refused():
    with pytest.raises(ValueError, match="shape"):
        round_trip_report(_checker(size=32), _checker(size=16))


def test_trainer_measures_the_pipelines_own_vae(tiny_sd):
    from fewshot_personalize.kernels.backends.diffusers import DiffusersDenoiser, DiffusersTextEncoder, load_pipeline
    from fewshot_personalize.kernels.engine.config import TrainConfig
    from fewshot_personalize.kernels.engine.data import TrainData
    from fewshot_personalize.kernels.engine.loop import Trainer
    from fewshot_personalize.kernels.methods import DreamBoothLora, LoraSettings

    pipe = load_pipeline(tiny_sd)
    x = _checker(n=3, size=32)
    cfg = TrainConfig(instance_prompts="a sks toy", steps=1, resolution=32)
    with Trainer(DiffusersDenoiser(pipe), DiffusersTextEncoder(pipe), DreamBoothLora(LoraSettings(rank=1)),
                 TrainData(x), cfg) as trainer:
        got = trainer.vae_round_trip()
    with torch.no_grad():
        rec = pipe.vae.decode(pipe.vae.encode(x).latent_dist.mean).sample
    want = round_trip_report(x, rec)
    assert got["psnr_db"] == pytest.approx(want["psnr_db"], abs=1e-3)
    assert got["detail_kept"] == pytest.approx(want["detail_kept"], abs=1e-4)
    assert got["colour_error"] == pytest.approx(want["colour_error"], abs=1e-5)
