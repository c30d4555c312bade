"""Our LoRA files read by diffusers' ``load_lora_weights`` give the same UNet and text-encoder outputs as the
in-memory peft adapter they were saved from (and as our own merge-based loader).

Tolerance: atol 1e-4 / rtol 1e-4 in fp32 (adapter-vs-merged arithmetic differs only in summation order).
"""

import pytest
import torch

from fewshot_personalize.kernels.backends.diffusers import DiffusersDenoiser, DiffusersTextEncoder, load_pipeline
from fewshot_personalize.kernels.backends.diffusers.adapters import apply_lora_file
from fewshot_personalize.kernels.adapters.lora import ALL_LAYERS, UNET_TARGETS, LoraWeights, read_lora, write_lora
from fewshot_personalize.kernels.formats.lora_file import load_lora_file, lora_metadata, save_lora_file
from fewshot_personalize.kernels.engine.seams import Conditioning
from fewshot_personalize.kernels.engine.config import TrainConfig
from fewshot_personalize.kernels.engine.data import TrainData
from fewshot_personalize.kernels.engine.loop import Trainer
from fewshot_personalize.kernels.methods import DreamBoothLora, LoraSettings

TOL = dict(atol=1e-4, rtol=1e-4)


def _trained(base, tmp_path, unet_targets=UNET_TARGETS):
    pipe = load_pipeline(base)
    d, te = DiffusersDenoiser(pipe), DiffusersTextEncoder(pipe)
    data = TrainData(torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1)
    cfg = TrainConfig("a sks toy", steps=2, resolution=32)
    settings = LoraSettings(rank=4, alpha=2.0, train_text_encoder=True, unet_targets=unet_targets)
    trainer = Trainer(d, te, DreamBoothLora(settings), data, cfg)
    trainer.train()
    # make the adapter clearly non-zero so a wrong key, scale or transpose shows up
    g = torch.Generator().manual_seed(5)
    for r in trainer.method.roots:
        write_lora(r.module, {p: LoraWeights(torch.randn(w.down.shape, generator=g) * 0.1,
                                             torch.randn(w.up.shape, generator=g) * 0.1, w.alpha)
                              for p, w in read_lora(r.module).items()})
    path = tmp_path / "concept.safetensors"
    save_lora_file(path, trainer.method.weights(), lora_metadata(family=d.family, method="dreambooth-lora", rank=4, alpha=2.0, steps=2))
    return d, te, path


def _outputs(denoiser, text_encoder):
    g = torch.Generator().manual_seed(9)
    with torch.no_grad():
        cond = text_encoder.encode(["a sks toy on the beach", "a red ball"])
        x = torch.randn(2, 4, 16, 16, generator=g)
        t = torch.tensor([10, 700])
        return cond, denoiser.predict(x, t, cond)


def _pipe_outputs(pipe):
    return _outputs(DiffusersDenoiser(pipe), DiffusersTextEncoder(pipe))


PLACEMENTS = [pytest.param(UNET_TARGETS, id="attention"), pytest.param((ALL_LAYERS,), id="every-layer")]


@pytest.mark.parametrize("targets", PLACEMENTS)
@pytest.mark.parametrize("fixture", ["tiny_sd", "tiny_sdxl"])
def test_diffusers_load_lora_weights_matches_our_adapter(request, fixture, targets, tmp_path):
    base = request.getfixturevalue(fixture)
    d, te, path = _trained(base, tmp_path, targets)
    ours_cond, ours_eps = _outputs(d, te)

    pipe = load_pipeline(base)
    plain_cond, plain_eps = _pipe_outputs(pipe)
    assert not torch.allclose(plain_eps, ours_eps, atol=1e-3)  # the adapter really changes the output
    assert not torch.allclose(plain_cond.context, ours_cond.context, atol=1e-3)

    pipe.load_lora_weights(str(path))
    theirs_cond, theirs_eps = _pipe_outputs(pipe)
    torch.testing.assert_close(theirs_cond.context, ours_cond.context, **TOL)
    if ours_cond.pooled is not None:
        torch.testing.assert_close(theirs_cond.pooled, ours_cond.pooled, **TOL)
    torch.testing.assert_close(theirs_eps, ours_eps, **TOL)


@pytest.mark.parametrize("targets", PLACEMENTS)
@pytest.mark.parametrize("fixture", ["tiny_sd", "tiny_sdxl"])
def test_our_merge_loader_matches_the_adapter(request, fixture, targets, tmp_path):
    base = request.getfixturevalue(fixture)
    d, te, path = _trained(base, tmp_path, targets)
    ours_cond, ours_eps = _outputs(d, te)
    pipe = load_pipeline(base)
    n = apply_lora_file(pipe, path)
    assert n == len(load_lora_file(path)[0])
    merged_cond, merged_eps = _pipe_outputs(pipe)
    torch.testing.assert_close(merged_cond.context, ours_cond.context, **TOL)
    torch.testing.assert_close(merged_eps, ours_eps, **TOL)


def test_sdxl_adapter_is_refused_by_an_sd1_model(tiny_sd, tiny_sdxl, tmp_path):
    from fewshot_personalize.kernels.core.errors import UserInputError

    _, _, path = _trained(tiny_sdxl, tmp_path)
    with pytest.raises(UserInputError, match="trained for a sdxl model"):
        apply_lora_file(load_pipeline(tiny_sd), path)


def test_conditioning_select_and_cat():
    c = Conditioning(torch.arange(6.).view(2, 3, 1), torch.tensor([[1.], [2.]]))
    s = c.select(torch.tensor([1, 1, 0]))
    assert s.context[:, 0, 0].tolist() == [3., 3., 0.] and s.pooled[:, 0].tolist() == [2., 2., 1.]
    assert Conditioning.cat([c, s]).context.shape[0] == 5
