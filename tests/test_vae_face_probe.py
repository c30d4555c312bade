"""The VAE face probe (tests/benchmarks/demo_vae_face_probe.py) rests on its render pairs differing by the face alone,
and on face transfer reading 1 for a lossless round trip and 0 for one that erases the face."""

import importlib.util
from pathlib import Path

import torch

from fewshot_personalize.kernels.demo import world

_spec = importlib.util.spec_from_file_location("demo_vae_face_probe",
                                               Path(__file__).parent / "benchmarks" / "demo_vae_face_probe.py")
probe = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(probe)


def test_pairs_differ_by_the_face_only():
    original = world._toy
    faced, faceless, masks = probe.render_pairs(123, 4)
    assert world._toy is original  # the renderer is restored
    diff = (faced - faceless).abs().amax(1)  # (n, H, W)
    assert (diff.flatten(1).amax(1) > 0.5).all()  # every pair has a face to lose
    inside = diff * masks
    assert torch.allclose(inside, diff)  # nothing changes outside the object
    share = (diff > 0.05).flatten(1).float().sum(1) / masks.flatten(1).sum(1)
    assert (share < 0.25).all()  # the face is a small part of the creature, not the whole object


class _Identity(torch.nn.Module):
    """A stand-in VAE: the latent is the image itself (lossless), or the image with the face region blurred away."""

    def __init__(self, erase_with=None):
        super().__init__()
        self.erase_with = erase_with

    def encode(self, x):
        z = x if self.erase_with is None else self.erase_with
        return type("E", (), {"latent_dist": type("D", (), {"mean": z})()})()

    def decode(self, z):
        return type("O", (), {"sample": z})()


def test_face_transfer_reads_one_when_kept_and_zero_when_erased():
    faced, faceless, _ = probe.render_pairs(7, 3)
    kept = probe.face_transfer(_Identity(), faced, faceless)
    assert abs(kept["face_transfer"] - 1) < 1e-5
    erased = probe.face_transfer(_Identity(erase_with=faceless), faced, faceless)
    assert abs(erased["face_transfer"]) < 1e-5


def test_the_probe_fits_the_decoder_alone():
    """vae_training.fit_decoder (the probe's loop) fits the decoder to the images and leaves the encoder as it was,
    and nothing trainable."""
    from diffusers import AutoencoderKL

    from fewshot_personalize.kernels.demo.model import VAE_CONFIG

    torch.manual_seed(0)
    vae = AutoencoderKL(**VAE_CONFIG).eval()
    faced, faceless, masks = probe.render_pairs(11, 2)
    encoder = {k: v.clone() for k, v in vae.encoder.state_dict().items()}
    x = torch.cat([faced, faceless])

    def error() -> float:
        with torch.no_grad():
            return float((vae.decode(vae.encode(x).latent_dist.mean).sample - x).pow(2).mean())

    before = error()
    seen = []
    probe.train_probe(vae, faced, faceless, masks, 30, on_step=seen.append)
    assert seen == list(range(1, 31)) and not vae.training
    assert all(torch.equal(encoder[k], v) for k, v in vae.encoder.state_dict().items())
    assert not any(p.requires_grad for p in vae.parameters())
    assert error() < 0.5 * before  # fitted on these very images
