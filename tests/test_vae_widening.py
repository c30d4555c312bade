"""Net2WiderNet for the demo VAE: the widened model computes what the narrow one computes."""

import pytest
import torch

from fewshot_personalize.kernels.demo.model import VAE_CONFIG
from fewshot_personalize.kernels.demo.vae_widening import _copy_index, widen_vae


@pytest.fixture(scope="module")
def vae():
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    model = AutoencoderKL(**VAE_CONFIG).eval()
    with torch.no_grad():  # random GroupNorm affine parameters too, so that a wrong grouping shows
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.3)
    return model


@pytest.mark.parametrize("factor", [2, 3])
def test_the_wider_vae_encodes_and_decodes_what_the_narrow_one_does(vae, factor):
    wide = widen_vae(vae, factor)
    assert list(wide.config.block_out_channels) == [c * factor for c in VAE_CONFIG["block_out_channels"]]
    assert wide.config.latent_channels == vae.config.latent_channels
    x = torch.rand(3, 3, 64, 64, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.no_grad():
        a, b = vae.encode(x).latent_dist, wide.encode(x).latent_dist
        torch.testing.assert_close(b.mean, a.mean, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(b.logvar, a.logvar, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(wide.decode(a.mean).sample, vae.decode(a.mean).sample, atol=1e-4, rtol=1e-4)
    assert sum(p.numel() for p in wide.parameters()) > (factor**2 - 1) * sum(p.numel() for p in vae.parameters())


def test_copies_stay_in_their_group_and_share_weights_unevenly(vae):
    # group g of the wide map holds factor copies of narrow group g's channels (8 groups: 32 → 64 channels)
    index = _copy_index(64, 32, 8)
    assert index.tolist()[:8] == [0, 1, 2, 3, 0, 1, 2, 3] and index.tolist()[8:12] == [4, 5, 6, 7]
    wide = widen_vae(vae, 2, seed=3)
    w = wide.decoder.conv_out.weight  # reads 64 copied channels; copies 0 and 4 of narrow channel 0
    assert not torch.allclose(w[:, 0], w[:, 4])
    torch.testing.assert_close(w[:, 0] + w[:, 4], vae.decoder.conv_out.weight[:, 0])
    with pytest.raises(ValueError, match="positive integer"):
        widen_vae(vae, 0)
