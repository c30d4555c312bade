"""ED-LoRA (Mix-of-Show §3.2) on tiny SD1- and SDXL-like models: layer-wise contexts reach each cross-attention
layer, layer-wise tokens encode as per-layer Textual Inversion would, the method trains and undoes itself, and its
file gives diffusers the engine's conditioning and prediction."""

import pytest
import torch

from fewshot_personalize.kernels.adapters.layerwise_context import layer_context, stack_layer_contexts
from fewshot_personalize.kernels.backends.diffusers import DiffusersDenoiser, DiffusersTextEncoder, load_pipeline
from fewshot_personalize.kernels.backends.diffusers.adapters import PipelineAdapters
from fewshot_personalize.kernels.core.errors import UserInputError
from fewshot_personalize.kernels.engine.config import TrainConfig
from fewshot_personalize.kernels.engine.data import TrainData
from fewshot_personalize.kernels.engine.loop import Trainer
from fewshot_personalize.kernels.formats.edlora_file import parse_edlora
from fewshot_personalize.kernels.methods import EdLora, EdLoraSettings, LoraSettings

FAMILIES = [("tiny_sd", "sd1"), ("tiny_sdxl", "sdxl")]


def _attn2(unet):
    return [m for n, m in unet.named_modules() if n.endswith(".attn2")]  # registration order


def _inputs(pipe, b=2):
    g = torch.Generator().manual_seed(0)
    c = pipe.unet.config
    x = torch.randn(b, c.in_channels, 8, 8, generator=g)
    return x, torch.tensor([10, 500][:b])


def _predict(pipe, den, x, t, context, pooled=None):
    from fewshot_personalize.kernels.engine.seams import Conditioning

    with torch.no_grad():
        return den.predict(x, t, Conditioning(context, pooled))


@pytest.mark.parametrize("fixture,family", FAMILIES)
def test_cross_attention_layers_are_counted_in_forward_order(request, fixture, family):
    pipe = load_pipeline(request.getfixturevalue(fixture))
    den, text = DiffusersDenoiser(pipe), DiffusersTextEncoder(pipe)
    modules, calls = den.cross_attention_modules(), []
    assert den.cross_attention_layers() == len(modules) == len(_attn2(pipe.unet)) > 1
    hooks = [m.register_forward_pre_hook(lambda mod, a, i=i: calls.append(i)) for i, m in enumerate(modules)]
    cond = text.encode(["a toy"])
    x, t = _inputs(pipe, 1)
    _predict(pipe, den, x, t, cond.context, cond.pooled)
    for h in hooks:
        h.remove()
    assert calls == list(range(len(modules)))  # the router's layer i is the i-th cross-attention called


@pytest.mark.parametrize("fixture,family", FAMILIES)
def test_each_layer_reads_its_own_context_and_copies_equal_the_plain_prediction(request, fixture, family):
    pipe = load_pipeline(request.getfixturevalue(fixture))
    den, text = DiffusersDenoiser(pipe), DiffusersTextEncoder(pipe)
    n = den.cross_attention_layers()
    cond = text.encode(["a toy on the beach", "a dog"])
    x, t = _inputs(pipe)
    plain = _predict(pipe, den, x, t, cond.context, cond.pooled)
    handle = den.install_layerwise_context(cond.context.shape[1])
    try:
        copies = stack_layer_contexts(cond.context.unsqueeze(0).repeat(n, 1, 1, 1))
        assert torch.allclose(_predict(pipe, den, x, t, copies, cond.pooled), plain, atol=1e-5)
        assert torch.equal(_predict(pipe, den, x, t, cond.context, cond.pooled), plain)  # ordinary contexts pass

        per_layer = torch.randn(n, *cond.context.shape, generator=torch.Generator().manual_seed(1))
        seen = {}
        modules = den.cross_attention_modules()
        spies = [m.register_forward_pre_hook(lambda mod, a, kw, i=i: seen.__setitem__(i, kw["encoder_hidden_states"]),
                                             with_kwargs=True) for i, m in enumerate(modules)]
        _predict(pipe, den, x, t, stack_layer_contexts(per_layer), cond.pooled)
        for s in spies:
            s.remove()
        assert all(torch.equal(seen[i], per_layer[i]) for i in range(n))
    finally:
        handle.remove()
    assert not any(m._forward_pre_hooks for m in _attn2(pipe.unet))


def test_layer_context_slices_only_stacked_contexts():
    ctx = torch.arange(2 * 3 * 4 * 5, dtype=torch.float32).view(3, 2, 4, 5)  # layers, B, L, D
    stacked = stack_layer_contexts(ctx)
    assert stacked.shape == (2, 12, 5)
    assert all(torch.equal(layer_context(stacked, i, 3, 4), ctx[i]) for i in range(3))
    assert torch.equal(layer_context(ctx[0], 1, 3, 4), ctx[0])  # an ordinary context passes


@pytest.mark.parametrize("fixture,family", FAMILIES)
def test_layerwise_tokens_encode_as_textual_inversion_per_layer(request, fixture, family):
    pipe = load_pipeline(request.getfixturevalue(fixture))
    text = DiffusersTextEncoder(pipe)
    g = torch.Generator().manual_seed(0)
    layers, prompts = 3, ["a <sks> on the beach", "a photo of a dog"]
    vecs = [torch.randn(layers, 2, e.width, generator=g) * 0.02 for e in text.encoders]
    with torch.no_grad():
        handle = text.install_placeholders({"<sks>": vecs})
        stacked = text.encode(prompts)
        handle.remove()
        for i in range(layers):
            h = text.install_placeholders({"<sks>": [v[i] for v in vecs]})
            one = text.encode(prompts)
            h.remove()
            tokens = one.context.shape[1]
            assert stacked.context.shape[1] == layers * tokens
            assert torch.allclose(layer_context(stacked.context, i, layers, tokens), one.context, atol=1e-5)
            if i == 0 and one.pooled is not None:
                assert torch.allclose(stacked.pooled, one.pooled, atol=1e-5)
    with pytest.raises(ValueError, match="different numbers of layers"):
        text.install_placeholders({"<a>": [torch.zeros(2, 1, e.width) for e in text.encoders],
                                   "<b>": [torch.zeros(3, 1, e.width) for e in text.encoders]})


def _train(pipe, steps=4):
    settings = EdLoraSettings(token="<sks>", init_word="toy",
                              lora=LoraSettings(rank=2, train_text_encoder=True, text_lr=1e-3), embedding_lr=5e-2)
    method = EdLora(settings)
    cfg = TrainConfig(instance_prompts=("a photo of a <sks>", "a <sks> on the grass"), steps=steps, resolution=32,
                      lr=1e-2, seed=1)
    g = torch.Generator().manual_seed(0)
    trainer = Trainer(DiffusersDenoiser(pipe), DiffusersTextEncoder(pipe), method,
                      TrainData(torch.rand(3, 3, 32, 32, generator=g) * 2 - 1), cfg)
    return trainer, trainer.train(), method


def _state(pipe):
    mods = [pipe.unet] + [m for m in (pipe.text_encoder, getattr(pipe, "text_encoder_2", None)) if m is not None]
    return [{k: v.clone() for k, v in m.state_dict().items()} for m in mods]


@pytest.mark.parametrize("fixture,family", FAMILIES)
def test_ed_lora_trains_its_three_parts_and_its_file_gives_diffusers_the_same_prediction(request, fixture, family,
                                                                                          tmp_path):
    pipe = load_pipeline(request.getfixturevalue(fixture))
    before = _state(pipe)
    layers = DiffusersDenoiser(pipe).cross_attention_layers()
    cls = DiffusersTextEncoder(pipe).input_embeddings(DiffusersTextEncoder(pipe).token_ids("toy"), 0).mean(0)
    trainer, result, method = _train(pipe)
    assert len(result.losses) == 4 and all(torch.isfinite(torch.tensor(result.losses)))
    vectors = method.tensors()
    first = next(iter(vectors.values()))
    assert first.shape[:2] == (layers, 2)
    assert not torch.allclose(first[:, 1], cls.expand(layers, -1), atol=1e-4)  # the class word moved
    assert not torch.allclose(first[0], first[-1])  # and each layer has its own tokens now
    names = {g.name for g in trainer.groups}
    assert names == {"unet", "text", "embeddings"}

    prompt = ["a <sks> on the beach"]
    den = trainer.denoiser
    x, t = _inputs(pipe, 1)
    with torch.no_grad():
        cond = trainer.text_encoder.encode(prompt)
        ours = den.predict(x, t, cond)
    art = trainer.export()["ed-lora"]
    assert art.metadata["fsp.method"] == "ed-lora" and art.metadata["fsp.layers"] == str(layers)
    trainer.close()
    assert all(a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a) for a, b in zip(before, _state(pipe)))
    assert not any(m._forward_pre_hooks for m in _attn2(pipe.unet))

    adapters = PipelineAdapters(pipe)
    assert adapters.apply(art.tensors, art.metadata, "concept") == "ed-lora"
    with torch.no_grad():
        theirs_cond = adapters.encode(prompt, with_kv=True)
        theirs = DiffusersDenoiser(pipe).predict(x, t, theirs_cond)
    assert torch.allclose(theirs_cond.context, cond.context, atol=1e-4)
    assert torch.allclose(theirs, ours, atol=1e-4)
    kwargs = adapters.pipeline_kwargs("a <sks> toy", None, 2)
    assert kwargs["prompt_embeds"].shape == kwargs["negative_prompt_embeds"].shape
    adapters.remove()
    assert all(torch.equal(a[k], b[k]) for a, b in zip(before, _state(pipe)) for k in a)


def test_ed_lora_file_is_refused_by_a_model_of_another_layer_count_or_family():
    t = {"lora_unet_x.lora_down.weight": torch.zeros(2, 4), "edlora_emb.clip_l": torch.zeros(5, 2, 32)}
    meta = {"fsp.method": "ed-lora", "fsp.base_family": "sd1", "fsp.token": "<a>"}
    _, vectors, token = parse_edlora(t, meta, {"clip_l": 32}, 5, "sd1", "a.safetensors")
    assert token == "<a>" and vectors["clip_l"].shape == (5, 2, 32)
    with pytest.raises(UserInputError, match="5 cross-attention layers; this model has 16"):
        parse_edlora(t, meta, {"clip_l": 32}, 16, "sd1", "a.safetensors")
    with pytest.raises(UserInputError, match="sd1 model, but this model is sdxl"):
        parse_edlora(t, meta, {"clip_l": 32}, 5, "sdxl", "a.safetensors")
    with pytest.raises(UserInputError, match="32 wide; this model's clip_l is 768"):
        parse_edlora(t, meta, {"clip_l": 768}, 5, "sd1", "a.safetensors")
    with pytest.raises(UserInputError, match="without its token"):
        parse_edlora(t, {"fsp.method": "ed-lora"}, {"clip_l": 32}, 5, "sd1", "a.safetensors")
    with pytest.raises(UserInputError, match="ED-LoRA adapts the text encoder"):
        EdLoraSettings(lora=LoraSettings(train_text_encoder=False))
