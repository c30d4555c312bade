"""Demo model 2's VAE tooling: the augmentations that widen its training data, and the measurements of what it
keeps (vae_quality.py), checked with stand-in autoencoders whose answer is known."""

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from fewshot_personalize.kernels.demo.vae_data import hue_shift, paste_patches


class FakeVAE:
    """encode → decode = ``fn`` (identity by default), with the attributes round_trip reads."""

    device, dtype = torch.device("cpu"), torch.float32

    def __init__(self, fn=lambda x: x):
        self.fn = fn

    def encode(self, x):
        return SimpleNamespace(latent_dist=SimpleNamespace(mean=x))

    def decode(self, z):
        return SimpleNamespace(sample=self.fn(z))


def _blur(x):
    return F.avg_pool2d(F.pad(x, (2, 2, 2, 2), mode="replicate"), 5, stride=1)


def _desaturate(x):
    return x.mean(1, keepdim=True).expand_as(x) * 0.5 + x * 0.5


def test_hue_shift_keeps_greys_and_moves_colours():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(8, 3, 16, 16, generator=g) * 2 - 1
    x[:, :, :4] = 0.3  # a grey band
    y = hue_shift(x, g, p=1.0)
    assert y.min() >= -1 and y.max() <= 1
    assert torch.allclose(y[:, :, :4], x[:, :, :4], atol=1e-5)  # the rotation axis is the grey axis
    assert (y[:, :, 4:] - x[:, :, 4:]).abs().mean() > 0.05
    assert torch.equal(hue_shift(x, g, p=0.0), x)


def test_pasted_patches_lie_inside_the_returned_area():
    g = torch.Generator().manual_seed(1)
    x = torch.zeros(6, 3, 32, 32)
    y, area = paste_patches(x, g, p=1.0)
    changed = (y != x).any(1, keepdim=True)
    assert changed.any() and not (changed & ~area).any()
    assert area.sum() > 0


def test_colour_round_trip_is_zero_for_a_perfect_vae_and_sees_a_colour_loss():
    from fewshot_personalize.kernels.demo.vae_quality import OFF_PALETTE, colour_round_trip, off_palette_scenes

    perfect = colour_round_trip(FakeVAE(), n=24)
    assert perfect["mean_error_per_channel"] < 0.01 and set(perfect["per_colour"]) == set(OFF_PALETTE)
    grey = colour_round_trip(FakeVAE(_desaturate), n=24)
    assert grey["mean_error_per_channel"] > 0.05 and grey["worst"][1] >= grey["mean_error_per_channel"]
    images, insides, names = off_palette_scenes(3, seed=2)
    assert len(images) == len(insides) == 3 and all(m.sum() > 0 for m in insides)


@pytest.fixture(scope="module")
def ev():
    from fewshot_personalize.kernels.demo.evaluator import Evaluator

    return Evaluator.load()


def test_concept_ceiling_is_one_for_a_perfect_vae_and_lower_for_a_blurring_one(ev):
    from fewshot_personalize.kernels.demo.vae_quality import concept_ceiling

    perfect = concept_ceiling(ev, FakeVAE(), "checker_toy", images_per_prompt=1)
    assert perfect["one_object"]["ratio"] == pytest.approx(1.0, abs=1e-3)
    assert perfect["two_object"]["ratio"] == pytest.approx(1.0, abs=1e-3)
    assert perfect["one_object"]["pattern"]["ratio"] == pytest.approx(1.0, abs=1e-3)
    blurred = concept_ceiling(ev, FakeVAE(_blur), "checker_toy", images_per_prompt=1)
    assert blurred["one_object"]["ratio"] < 0.95 and blurred["two_object"]["ratio"] < 0.95
    # a blur smears the checker's edges: the layout is lost faster than the colours
    assert blurred["one_object"]["pattern"]["ratio"] < blurred["one_object"]["ratio"]


def test_time_budget_checkpoints_and_stops():
    from fewshot_personalize.kernels.demo.time_budget import TimeBudget

    seen = []
    clock = TimeBudget(budget_s=3600, done_s=100, every_s=0, on_checkpoint=lambda s, n, l: seen.append((s, n)))
    assert clock.running() and 0 < clock.progress() < 0.1
    clock.tick(1, [0.5])
    clock.finish(2, [0.5, 0.4])
    assert [n for _, n in seen] == [1, 2] and all(s >= 100 for s, _ in seen)
    assert not TimeBudget(budget_s=10, done_s=10).running()


def test_a_session_past_its_minutes_still_makes_one_step():
    """A session whose time is up before a stage begins (a slow or busy machine) makes one step of it, then stops;
    with no budget left it makes none."""
    from fewshot_personalize.kernels.demo.time_budget import TimeBudget

    clock = TimeBudget(budget_s=3600, session_s=0.0)
    assert clock.running()
    clock.tick(1, [0.5])
    assert not clock.running()
    assert not TimeBudget(budget_s=10, done_s=10, session_s=0.0).running()


def test_round_trip_grid_shows_renders_above_their_round_trip():
    from fewshot_personalize.kernels.demo.vae_quality import round_trip_grid

    grid = round_trip_grid(FakeVAE(_blur), ["checker_toy", "marked_box"], n=3, cell=32)
    assert grid.size[0] >= 3 * 32 and grid.size[1] >= 4 * 32
