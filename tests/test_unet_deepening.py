"""Deepening the demo UNet: more transformer layers per cross-attention block, the same function until trained."""

import pytest
import torch

from fewshot_personalize.kernels.demo.model import UNET_CONFIG
from fewshot_personalize.kernels.demo.unet_deepening import deepen_unet, transformer_layers


@pytest.fixture(scope="module")
def unet():
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    model = UNet2DConditionModel(**(UNET_CONFIG | {"in_channels": 8, "out_channels": 8})).eval()
    with torch.no_grad():  # diffusers starts some output projections at zero: make every branch count
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model


def _inputs(batch=2):
    g = torch.Generator().manual_seed(1)
    return (torch.randn(batch, 8, 16, 16, generator=g), torch.tensor([10, 700]),
            torch.randn(batch, 7, UNET_CONFIG["cross_attention_dim"], generator=g))


def test_the_deeper_unet_predicts_what_the_shallow_one_predicts(unet):
    deep = deepen_unet(unet, 2)
    assert transformer_layers(deep) == 2 and transformer_layers(unet) == 1
    n = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert n(deep) > n(unet)
    x, t, ctx = _inputs()
    with torch.no_grad():
        torch.testing.assert_close(deep(x, t, ctx).sample, unet(x, t, ctx).sample, atol=1e-5, rtol=1e-5)


def test_the_new_layers_learn_and_then_change_the_output(unet):
    deep = deepen_unet(unet, 2).train()
    new = {k: p for k, p in deep.named_parameters() if ".transformer_blocks.1." in k}
    x, t, ctx = _inputs()
    deep(x, t, ctx).sample.square().mean().backward()
    outputs = [k for k in new if ".to_out.0.weight" in k or ".ff.net.2.weight" in k]
    assert outputs and all(new[k].grad is not None and new[k].grad.abs().sum() > 0 for k in outputs)
    with torch.no_grad():
        for k in outputs:
            new[k].add_(torch.randn_like(new[k]) * 0.05)
        assert not torch.allclose(deep(x, t, ctx).sample, unet(x, t, ctx).sample, atol=1e-4)


def test_deepening_checks_its_input(unet):
    with pytest.raises(ValueError, match="at least the UNet's own 1"):
        deepen_unet(unet, 0)
    same = deepen_unet(unet, 1)
    assert sorted(same.state_dict()) == sorted(unet.state_dict())


def test_pretraining_deepens_the_unet_once_and_keeps_it_deep(tmp_path):
    """--deepen 2 in an extension: the written UNet has two transformer layers per block, its first layers are the
    ones trained before (moved on by this session's steps, not drawn afresh), a later session and --from a folder
    continue the deep UNet, and making it shallower or deepening without UNet minutes left is refused."""
    from diffusers import UNet2DConditionModel
    from safetensors.torch import load_file

    from fewshot_personalize.kernels.demo.pretrain import pretrain

    tiny = dict(n_images=48, threads=2, measure=False, vae_minutes=0.01)
    first = pretrain(tmp_path / "m1", work_dir=tmp_path / "w", unet_minutes=0.01, **tiny)
    budget = first["unet"]["done_s"] / 60 + 0.01
    rec = pretrain(tmp_path / "m2", work_dir=tmp_path / "w", unet_minutes=budget, deepen=2, **tiny)
    assert rec["unet"]["transformer_layers"] == 2 and rec["sessions"][-1]["deepen"] == 2
    assert UNet2DConditionModel.load_config(str(tmp_path / "m2" / "unet"))["transformer_layers_per_block"] == 2
    before = load_file(str(tmp_path / "m1" / "unet" / "diffusion_pytorch_model.safetensors"))
    after = load_file(str(tmp_path / "m2" / "unet" / "diffusion_pytorch_model.safetensors"))
    assert set(before) < set(after) and any(".transformer_blocks.1." in k for k in set(after) - set(before))
    k = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight"  # trained on, not redrawn
    assert 0 < (after[k] - before[k]).norm() < 0.5 * before[k].norm()

    again = pretrain(tmp_path / "m2", work_dir=tmp_path / "w", unet_minutes=rec["unet"]["done_s"] / 60 + 0.01, **tiny)
    assert again["unet"]["steps"] > rec["unet"]["steps"] and again["unet"]["transformer_layers"] == 2
    moved = pretrain(tmp_path / "m3", work_dir=tmp_path / "w2", unet_minutes=again["unet"]["done_s"] / 60 + 0.01,
                     from_dir=tmp_path / "m2", **tiny)
    assert moved["unet"]["transformer_layers"] == 2 and moved["unet"]["steps"] > again["unet"]["steps"]

    with pytest.raises(ValueError, match="already has 2 transformer layers"):
        pretrain(tmp_path / "m4", work_dir=tmp_path / "w", unet_minutes=60, deepen=1, **tiny)
    with pytest.raises(ValueError, match="budget is spent.*larger --unet-minutes"):
        pretrain(tmp_path / "m4", work_dir=tmp_path / "w", unet_minutes=budget, deepen=3, **tiny)
