"""The demo UNet stage's loss (unet_training.py): its target per prediction type, and pretraining's object-weighted
loss (``pretrain --object-weight``): the per-latent-pixel counts of object pixels, the weights made from them, the
weighted loss against its closed form, and the per-session setting."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from fewshot_personalize.kernels.demo.pretrain import object_pixels, pretrain, render_dataset
from fewshot_personalize.kernels.demo.unet_training import make_optimizer, object_loss_weights, train_unet
from fewshot_personalize.kernels.formats.safetensors_io import load_safetensors

TINY = dict(n_images=48, threads=2, measure=False)


def test_object_pixels_count_each_latent_pixels_footprint():
    masks = np.zeros((2, 8, 8), bool)
    masks[0, :4, :4] = True  # one full cell
    masks[0, 4, 4] = True  # one pixel of the last cell
    masks[1, :, 0] = True  # a column: 4 pixels in each left cell
    counts = object_pixels(masks, 4)
    assert counts.dtype == torch.uint8 and counts.shape == (2, 2, 2)
    assert counts[0].tolist() == [[16, 0], [0, 1]] and counts[1].tolist() == [[4, 0], [4, 0]]
    assert int(counts.sum()) == int(masks.sum())
    with pytest.raises(ValueError, match="uint8"):
        object_pixels(np.zeros((1, 32, 32), bool), 16)


def test_object_loss_weights_are_one_on_background_and_w_on_objects():
    counts = torch.tensor([[[0, 16], [8, 4]]], dtype=torch.uint8)
    w = object_loss_weights(counts, 16, 3.0)
    assert w.shape == (1, 1, 2, 2)
    assert w[0, 0].tolist() == [[1.0, 3.0], [2.0, 1.5]]
    assert torch.equal(object_loss_weights(counts, 16, 1.0), torch.ones(1, 1, 2, 2))


class _Text(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(8, 4)

    def forward(self, ids):
        return (self.emb(ids),)


class _ZeroUnet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.p = torch.nn.Parameter(torch.zeros(1))

    def forward(self, x, t, cond):
        return SimpleNamespace(sample=torch.zeros_like(x) * self.p)


def _loss_curve(latents, loss_weights, seconds=0.6, prediction_type="v_prediction"):
    nets = {"unet": _ZeroUnet(), "text": _Text(), "ema_unet": _ZeroUnet(), "ema_text": _Text()}
    opt = make_optimizer(nets["unet"], nets["text"], 0.0, 0.0)
    alphas = torch.linspace(0.99, 0.01, 100)
    n = len(latents)
    out = train_unet(nets, opt, alphas, latents, torch.zeros(n, 3, dtype=torch.long), torch.zeros(3, dtype=torch.long),
                     budget_s=float("inf"), done_s=0, done_steps=0, seed=0, base_lrs=(0.0, 0.0), session_s=seconds,
                     prediction_type=prediction_type, loss_weights=loss_weights)
    return out["loss_curve_per_50"]


@pytest.mark.parametrize("prediction, second_moment", [("epsilon", 1.0), ("v_prediction", 0.5)])
def test_unet_stage_trains_towards_its_prediction_type(prediction, second_moment):
    """Against a UNet that predicts 0 on all-zero latents the loss is the target's second moment: E[ε²] = 1 for ε,
    E[ᾱ_t ε²] = mean ᾱ = 0.5 for v = √ᾱ ε − √(1 − ᾱ) x0 on this schedule."""
    curve = _loss_curve(torch.zeros(64, 8, 16, 16), None, seconds=0.5, prediction_type=prediction)
    assert curve[0] == pytest.approx(second_moment, rel=0.08)


def test_weighted_loss_matches_its_closed_form_and_unit_weights_the_plain_loss():
    """Zero UNet, v-prediction: the target v = √ᾱ ε − √(1−ᾱ) x0 has second moment ᾱ + (1−ᾱ) x0², mean ᾱ = 0.5
    here. Latents 2 on a quarter of the latent pixels ("objects"), 0 elsewhere: the plain loss is
    0.5 + 0.5 · 4 · 0.25 = 1.0; with weight 4 on the objects the weighted mean is 0.5 + 0.5 · 4 · (4 · 0.25) /
    (4 · 0.25 + 0.75) = 1.643. Unit weights give the plain loss (same batches, same noise)."""
    latents = torch.zeros(64, 8, 16, 16)
    latents[:, :, :8, :8] = 2.0
    counts = torch.zeros(64, 16, 16, dtype=torch.uint8)
    counts[:, :8, :8] = 16
    plain = _loss_curve(latents, None)
    ones = _loss_curve(latents, object_loss_weights(counts, 16, 1.0))
    n = min(len(plain), len(ones)) - 1  # whole bins of 50 steps (the last one ends with the time budget)
    assert n >= 1 and np.allclose(plain[:n], ones[:n], rtol=1e-5)
    assert plain[0] == pytest.approx(1.0, rel=0.1)
    weighted = _loss_curve(latents, object_loss_weights(counts, 16, 4.0))
    assert weighted[0] == pytest.approx(0.5 + 2.0 * 1.0 / 1.75, rel=0.1)


def test_object_weight_is_a_per_session_setting_and_masks_are_kept_or_rendered_again(tmp_path):
    """The first session keeps its scenes' object counts beside their latents; a later session with
    --object-weight 3 records it and trains on them. A work folder from before (no objects file) renders its scenes
    again and gets the same counts. A weight under 1 is refused."""
    first = pretrain(tmp_path / "m", work_dir=tmp_path / "w", vae_minutes=0.01, unet_minutes=0.01, **TINY)
    objects = tmp_path / "w" / "objects.safetensors"
    kept = load_safetensors(objects)[0]["object_pixels"]
    _, _, masks = render_dataset(TINY["n_images"], 0)
    assert torch.equal(kept, object_pixels(masks, 4)) and kept.shape == (48, 16, 16)
    objects.unlink()  # as a folder written before the counts were kept
    more = first["unet"]["done_s"] / 60 + 0.02
    rec = pretrain(tmp_path / "m", work_dir=tmp_path / "w", vae_minutes=0.01, unet_minutes=more, object_weight=3.0,
                   **TINY)
    assert rec["sessions"][-1]["object_weight"] == 3.0 and "object_weight" not in rec["sessions"][0]
    assert rec["unet"]["steps"] > first["unet"]["steps"] and rec["sessions"][-1]["render_s"] > 0
    assert torch.equal(load_safetensors(objects)[0]["object_pixels"], kept)
    rec2 = pretrain(tmp_path / "m", work_dir=tmp_path / "w", vae_minutes=0.01, unet_minutes=more + 0.02,
                    patterns=0.5, object_weight=2.0, **TINY)
    assert rec2["sessions"][-1]["object_weight"] == 2.0
    assert (tmp_path / "w" / "objects_patterns0.5.safetensors").is_file()
    for bad in (0.5, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="object weight"):
            pretrain(tmp_path / "m", work_dir=tmp_path / "w", object_weight=bad, **TINY)
