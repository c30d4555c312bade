"""LoRA math: peft adapter vs merged weights, read/write/detach round trips."""

import pytest
import torch
from torch import nn

from fewshot_personalize.kernels.adapters.lora import LoraWeights, attach_lora, detach_lora, merge_lora, read_lora, write_lora


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 4))


def _randomize(root):
    w = read_lora(root)
    g = torch.Generator().manual_seed(1)
    write_lora(root, {p: LoraWeights(torch.randn(v.down.shape, generator=g), torch.randn(v.up.shape, generator=g), v.alpha)
                      for p, v in w.items()})


def test_adapter_starts_as_identity():
    m = _mlp()
    x = torch.randn(5, 8)
    ref = m(x)
    attach_lora(m, ["0", "2"], rank=2)
    assert torch.equal(m(x), ref)  # lora_B is zero-initialised


def test_adapter_equals_merged_weights():
    m = _mlp()
    x = torch.randn(5, 8)
    attach_lora(m, ["0", "2"], rank=3, alpha=6.0)
    _randomize(m)
    with torch.no_grad():
        adapted = m(x)
    weights = read_lora(m)
    assert all(w.alpha == 6.0 and w.rank == 3 for w in weights.values())
    detach_lora(m)
    merge_lora(m, weights, strength=1.0)
    with torch.no_grad():
        merged = m(x)
    torch.testing.assert_close(merged, adapted, atol=1e-5, rtol=1e-5)


def test_delta_follows_kohya_scale():
    down, up = torch.randn(2, 5), torch.randn(3, 2)
    w = LoraWeights(down, up, alpha=1.0)
    torch.testing.assert_close(w.delta(0.5), 0.5 * (1.0 / 2) * up @ down)


def test_detach_restores_original_modules():
    m = _mlp()
    originals = [m[0], m[2]]
    attach_lora(m, ["0", "2"], rank=2)
    assert m[0] is not originals[0]
    assert detach_lora(m) == 2
    assert m[0] is originals[0] and m[2] is originals[1]
    assert read_lora(m) == {}


def test_only_adapter_parameters_train():
    m = _mlp()
    attach_lora(m, ["2"], rank=2)
    trainable = [n for n, p in m.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)


def test_rank_larger_than_layer_is_refused():
    with pytest.raises(ValueError, match="rank 5 is larger"):
        attach_lora(_mlp(), ["2"], rank=5)  # 16 → 4


def test_merge_then_unmerge_is_identity():
    m = _mlp()
    before = m[0].weight.detach().clone()
    w = {"0": LoraWeights(torch.randn(2, 8), torch.randn(16, 2), 2.0)}
    merge_lora(m, w, 0.7)
    assert not torch.allclose(m[0].weight, before)
    merge_lora(m, w, -0.7)
    torch.testing.assert_close(m[0].weight, before, atol=1e-6, rtol=0)


def _convnet():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.SiLU(), nn.Conv2d(8, 6, 3, stride=2, padding=1),
                         nn.Flatten(), nn.Linear(6 * 4 * 4, 5))


def test_conv_adapter_equals_merged_kernel():
    """kohya LoCon layout: down [r, in, k, k] (a k×k conv with the layer's stride), up [out, r, 1, 1]; merging
    ΔW = (α/r)·up@down.flatten(1) reshaped to the kernel gives the adapter's output."""
    m = _convnet()
    x = torch.randn(2, 3, 8, 8)
    attach_lora(m, ["0", "2", "4"], rank=2, alpha=3.0)
    _randomize(m)
    with torch.no_grad():
        adapted = m(x)
    weights = read_lora(m)
    assert weights["2"].down.shape == (2, 8, 3, 3) and weights["2"].up.shape == (6, 2, 1, 1)
    detach_lora(m)
    merge_lora(m, weights)
    with torch.no_grad():
        merged = m(x)
    torch.testing.assert_close(merged, adapted, atol=1e-4, rtol=1e-4)


def test_all_layers_target_finds_linears_and_convs_and_conv_rank_counts_the_kernel():
    from fewshot_personalize.kernels.adapters.lora import ALL_LAYERS, check_rank, adapter_paths

    m = _convnet()
    assert adapter_paths(m, (ALL_LAYERS,)) == ["0", "2", "4"]
    assert adapter_paths(m, ("4",)) == ["4"]  # named targets stay linear-only
    check_rank(m, ["0"], 8)  # 3·3·3 = 27 inputs, 8 outputs: rank 8 fits
    with pytest.raises(ValueError, match=r"rank 9 is larger than layer 0 allows \(27→8"):
        check_rank(m, ["0"], 9)
    grouped = nn.Sequential(nn.Conv2d(4, 4, 3, groups=2))
    with pytest.raises(ValueError, match="grouped convolution"):
        check_rank(grouped, ["0"], 1)
