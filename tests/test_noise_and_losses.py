"""Noising, training targets (ε, v, x0), SNR weights and the prior-preservation loss."""

import pytest
import torch

from fewshot_personalize.kernels.core.losses import min_snr_weights, offset_noise, per_sample_mse, prior_preservation_loss
from fewshot_personalize.kernels.core.noise_schedule import NoiseSchedule


@pytest.fixture()
def sched():
    from diffusers import DDPMScheduler

    return DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)


def test_add_noise_matches_diffusers(sched):
    ns = NoiseSchedule(sched.alphas_cumprod)
    x0, noise, t = torch.randn(4, 4, 8, 8), torch.randn(4, 4, 8, 8), torch.tensor([0, 10, 500, 999])
    torch.testing.assert_close(ns.add_noise(x0, noise, t), sched.add_noise(x0, noise, t), atol=1e-5, rtol=1e-5)


def test_targets_by_prediction_type(sched):
    x0, noise, t = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8), torch.tensor([5, 300, 900])
    assert torch.equal(NoiseSchedule(sched.alphas_cumprod, "epsilon").target(x0, noise, t), noise)
    v = NoiseSchedule(sched.alphas_cumprod, "v_prediction").target(x0, noise, t)
    torch.testing.assert_close(v, sched.get_velocity(x0, noise, t), atol=1e-5, rtol=1e-5)
    assert torch.equal(NoiseSchedule(sched.alphas_cumprod, "sample").target(x0, noise, t), x0)


def test_v_target_recovers_x0_and_eps(sched):
    ns = NoiseSchedule(sched.alphas_cumprod, "v_prediction")
    x0, noise, t = torch.randn(2, 4, 4, 4), torch.randn(2, 4, 4, 4), torch.tensor([100, 700])
    xt, v = ns.add_noise(x0, noise, t), ns.target(x0, noise, t)
    a = sched.alphas_cumprod[t].view(-1, 1, 1, 1)
    torch.testing.assert_close(a.sqrt() * xt - (1 - a).sqrt() * v, x0, atol=1e-5, rtol=1e-5)


def test_from_sigmas_inverts_alphas(sched):
    sigmas = ((1 - sched.alphas_cumprod) / sched.alphas_cumprod) ** 0.5
    ns = NoiseSchedule.from_sigmas(sigmas)
    torch.testing.assert_close(ns.alphas_cumprod.float(), sched.alphas_cumprod, atol=1e-6, rtol=1e-5)


def test_unknown_prediction_type_is_refused():
    with pytest.raises(ValueError, match="prediction_type"):
        NoiseSchedule(torch.linspace(0.99, 0.01, 10), "flow")


def test_min_snr_weights():
    snr = torch.tensor([0.1, 1.0, 5.0, 50.0])
    torch.testing.assert_close(min_snr_weights(snr, 5.0, "epsilon"), torch.tensor([1.0, 1.0, 1.0, 0.1]))
    torch.testing.assert_close(min_snr_weights(snr, 5.0, "v_prediction"), torch.minimum(snr, torch.tensor(5.0)) / (snr + 1))


def test_prior_preservation_loss_is_weighted_sum_of_means():
    per = torch.tensor([1.0, 3.0, 10.0, 20.0])
    is_prior = torch.tensor([False, False, True, True])
    total, inst, prior = prior_preservation_loss(per, is_prior, 0.5)
    assert inst.item() == 2.0 and prior.item() == 15.0 and total.item() == 2.0 + 0.5 * 15.0
    total, _, prior = prior_preservation_loss(per[:2], is_prior[:2], 1.0)
    assert prior.item() == 0.0 and total.item() == 2.0


def test_masked_mse_ignores_masked_out_pixels():
    pred, target = torch.zeros(1, 1, 2, 2), torch.tensor([[[[1.0, 100.0], [1.0, 100.0]]]])
    mask = torch.tensor([[[[1.0, 0.0], [1.0, 0.0]]]])
    assert per_sample_mse(pred, target, mask).item() == 1.0
    assert per_sample_mse(pred, target).item() == pytest.approx((2 + 2 * 10000) / 4)


def test_offset_noise_adds_a_per_channel_constant():
    g1, g2 = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
    plain, offset = offset_noise((2, 4, 8, 8), g1, 0.0), offset_noise((2, 4, 8, 8), g2, 0.5)
    diff = offset - plain
    assert torch.allclose(diff, diff[..., :1, :1].expand_as(diff)) and diff.abs().sum() > 0
