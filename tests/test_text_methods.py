"""Textual Inversion, CatVersion and pivotal tuning as plug-ins of the one training loop, on tiny SD1-, SD2(v)- and
SDXL-like models: they train, leave the model's weights alone, undo themselves completely, and their files give
diffusers the same conditioning as the engine has in memory."""

import pytest
import torch

from fewshot_personalize.kernels.backends.diffusers import DiffusersDenoiser, DiffusersTextEncoder, load_pipeline
from fewshot_personalize.kernels.backends.diffusers.adapters import PipelineAdapters
from fewshot_personalize.kernels.core.errors import UserInputError
from fewshot_personalize.kernels.engine.captions import captions
from fewshot_personalize.kernels.engine.config import TrainConfig
from fewshot_personalize.kernels.engine.data import TrainData
from fewshot_personalize.kernels.engine.loop import Trainer
from fewshot_personalize.kernels.methods import (CatVersion, CatVersionSettings, DreamBoothLora, LoraSettings,
                                                 PivotalSettings, PivotalTuning, TextualInversion,
                                                 TextualInversionSettings)
from fewshot_personalize.kernels.methods.catversion import default_layers

FAMILIES = [("tiny_sd", "sd1"), ("tiny_sd_v", "sd2"), ("tiny_sdxl", "sdxl")]


def _data(n=3, res=32):
    g = torch.Generator().manual_seed(0)
    return TrainData(torch.rand(n, 3, res, res, generator=g) * 2 - 1)


def _state(pipe):
    mods = [pipe.unet] + [m for m in (pipe.text_encoder, getattr(pipe, "text_encoder_2", None)) if m is not None]
    return [{k: v.clone() for k, v in m.state_dict().items()} for m in mods]


def _same_state(a, b):
    return all(a_k.keys() == b_k.keys() and all(torch.equal(a_k[k], b_k[k]) for k in a_k) for a_k, b_k in zip(a, b))


def _encode(pipe, prompts):
    with torch.no_grad():
        return DiffusersTextEncoder(pipe).encode(prompts)


def _train(pipe, method, prompts, steps=4, lr=5e-2):
    cfg = TrainConfig(instance_prompts=prompts, steps=steps, resolution=32, lr=lr, seed=1)
    trainer = Trainer(DiffusersDenoiser(pipe), DiffusersTextEncoder(pipe), method, _data(), cfg)
    result = trainer.train()
    return trainer, result


@pytest.mark.parametrize("fixture,family", FAMILIES)
def test_textual_inversion_trains_only_its_vectors_and_undoes_itself(request, fixture, family):
    pipe = load_pipeline(request.getfixturevalue(fixture))
    before, plain = _state(pipe), _encode(pipe, ["a <sks> on the beach"])
    method = TextualInversion(TextualInversionSettings(token="<sks>", init_word="toy", num_vectors=2))
    trainer, result = _train(pipe, method, captions(("a photo of a {}", "a {} on the grass"), "<sks>"))
    assert len(result.losses) == 4 and all(torch.isfinite(torch.tensor(result.losses)))
    vectors = method.tensors()
    assert list(vectors) == (["clip_l", "clip_g"] if family == "sdxl" else ["clip_l" if family == "sd1" else "clip_h"])
    init = DiffusersTextEncoder(pipe).input_embeddings(DiffusersTextEncoder(pipe).token_ids("toy"), 0)
    assert not torch.allclose(next(iter(vectors.values())), init.repeat(2, 1))  # the vectors moved
    with torch.no_grad():
        learned = trainer.text_encoder.encode(["a <sks> on the beach"])
    assert not torch.allclose(learned.context, plain.context, atol=1e-4)
    trainer.close()
    assert _same_state(before, _state(pipe))  # no weight of the model changed
    after = _encode(pipe, ["a <sks> on the beach"])
    assert torch.equal(after.context, plain.context)  # and the placeholder is plain text again


@pytest.mark.parametrize("fixture,family", FAMILIES)
def test_embedding_file_gives_diffusers_the_engines_conditioning(request, fixture, family, tmp_path):
    base = request.getfixturevalue(fixture)
    pipe = load_pipeline(base)
    method = TextualInversion(TextualInversionSettings(token="<sks>", init_word="toy", num_vectors=2))
    trainer, _ = _train(pipe, method, "a photo of a <sks>", steps=3)
    prompt = "a photo of a <sks> on the beach"
    with torch.no_grad():
        ours = trainer.text_encoder.encode([prompt])
    art = trainer.export()["embedding"]
    trainer.close()
    path = tmp_path / "sks.safetensors"
    from safetensors.torch import save_file
    save_file(art.tensors, str(path), metadata=art.metadata)

    other = load_pipeline(base)
    if family == "sdxl":
        other.load_textual_inversion(art.tensors["clip_l"], token="<sks>", text_encoder=other.text_encoder,
                                     tokenizer=other.tokenizer)
        other.load_textual_inversion(art.tensors["clip_g"], token="<sks>", text_encoder=other.text_encoder_2,
                                     tokenizer=other.tokenizer_2)
    else:
        other.load_textual_inversion(str(path), token="<sks>")
    expanded = other.maybe_convert_prompt(prompt, other.tokenizer)  # "<sks>" → "<sks> <sks>_1"
    theirs = _encode(other, [expanded])
    torch.testing.assert_close(theirs.context, ours.context, atol=1e-5, rtol=1e-5)
    if family == "sdxl":
        torch.testing.assert_close(theirs.pooled, ours.pooled, atol=1e-5, rtol=1e-5)

    # our own loader (generate --adapter) reads the same file into the same conditioning
    fresh = load_pipeline(base)
    adapters = PipelineAdapters(fresh)
    assert adapters.load(path) == "embedding"
    torch.testing.assert_close(adapters.encode([prompt], with_kv=True).context, ours.context, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("fixture,family", FAMILIES)
def test_catversion_trains_kv_tokens_acts_on_every_prompt_and_undoes_itself(request, fixture, family):
    pipe = load_pipeline(request.getfixturevalue(fixture))
    before = _state(pipe)
    plain = _encode(pipe, ["a toy", "a red ball at night"])
    method = CatVersion(CatVersionSettings())
    trainer, result = _train(pipe, method, "a photo of a toy")
    kv = method.tensors()
    te = DiffusersTextEncoder(pipe)
    assert {enc: sorted(layers) for enc, layers in kv.items()} == \
        {e.name: list(default_layers(e)) for e in te.encoders}
    with torch.no_grad():
        learned = trainer.text_encoder.encode(["a toy", "a red ball at night"])
    assert not torch.allclose(learned.context[1], plain.context[1], atol=1e-4)  # every prompt, not only the trained one
    trainer.close()
    assert _same_state(before, _state(pipe))
    assert torch.equal(_encode(pipe, ["a toy", "a red ball at night"]).context, plain.context)


def test_catversion_default_layers_skip_what_the_conditioning_never_reads(tiny_sd, tiny_sdxl):
    sd1 = DiffusersTextEncoder(load_pipeline(tiny_sd)).encoders[0]
    assert sd1.used_layers == sd1.num_layers == 2 and default_layers(sd1) == (0, 1)
    for enc in DiffusersTextEncoder(load_pipeline(tiny_sdxl)).encoders:  # SDXL reads the penultimate layer
        assert enc.used_layers == enc.num_layers - 1 and default_layers(enc) == (0,)


def test_catversion_file_applied_to_the_prompt_only(tiny_sd):
    pipe = load_pipeline(tiny_sd)
    method = CatVersion(CatVersionSettings(layers=(-1,), num_tokens=2))
    trainer, _ = _train(pipe, method, "a photo of a toy", steps=2)
    with torch.no_grad():
        ours = trainer.text_encoder.encode(["a toy on the beach"])
    art = trainer.export()["catversion"]
    trainer.close()
    assert art.metadata["fsp.layers.clip_l"] == "1" and art.metadata["fsp.tokens"] == "2"
    adapters = PipelineAdapters(pipe)
    assert adapters.apply(art.tensors, art.metadata, "test") == "catversion"
    kw = adapters.pipeline_kwargs("a toy on the beach", None, 1)
    torch.testing.assert_close(kw["prompt_embeds"], ours.context)
    torch.testing.assert_close(kw["negative_prompt_embeds"], _encode(pipe, [""]).context)  # adapter-free negative


def test_pivotal_tuning_trains_both_and_exports_one_bundle_and_the_parts(tiny_sd):
    pipe = load_pipeline(tiny_sd)
    before = _state(pipe)
    method = PivotalTuning(PivotalSettings(LoraSettings(rank=2), TextualInversionSettings(token="<sks>", lr=1e-2)))
    trainer, _ = _train(pipe, method, "a <sks> toy", steps=3, lr=1e-3)
    groups = {g.name: g.lr for g in trainer.groups}
    assert groups == {"unet": 1e-3, "embeddings": 1e-2}
    with torch.no_grad():
        ours = trainer.text_encoder.encode(["a <sks> toy at night"])
    arts = trainer.export()
    trainer.close()
    assert _same_state(before, _state(pipe))
    assert set(arts) == {"pivotal", "lora", "embedding"}
    bundle = arts["pivotal"].tensors
    assert any(k.startswith("bundle_emb.sks.") for k in bundle) and any(k.endswith(".lora_down.weight") for k in bundle)
    adapters = PipelineAdapters(pipe)
    adapters.apply(bundle, arts["pivotal"].metadata, "bundle")
    torch.testing.assert_close(adapters.encode(["a <sks> toy at night"], with_kv=True).context, ours.context)
    adapters.remove()
    assert _same_state(before, _state(pipe))  # merged LoRA weights restored exactly


def test_bad_settings_and_prompts_are_refused(tiny_sd):
    pipe = load_pipeline(tiny_sd)
    cases = [
        (lambda: TextualInversionSettings(num_vectors=0), "at least 1"),
        (lambda: _train(pipe, TextualInversion(TextualInversionSettings(token="toy")), "a toy"), "already a word"),
        (lambda: _train(pipe, TextualInversion(TextualInversionSettings(token="<sks>")), "a photo of a toy"),
         "does not contain the placeholder"),
        (lambda: _train(pipe, CatVersion(CatVersionSettings(layers=(5,))), "a toy"), "layer 5 is beyond"),
        (lambda: CatVersionSettings(num_tokens=0), "at least 1"),
    ]
    for make, message in cases:
        with pytest.raises(UserInputError, match=message):
            make()
    cfg = TrainConfig("a <sks>", class_prompt="a toy", steps=1, resolution=32)
    with pytest.raises(UserInputError, match="prior preservation"):
        Trainer(DiffusersDenoiser(pipe), DiffusersTextEncoder(pipe), TextualInversion(), TrainData(
            _data().instance, _data().instance), cfg)
    assert _encode(pipe, ["a <sks>"]).context.shape[0] == 1  # nothing was left attached by the refusals
    assert not DiffusersTextEncoder(pipe)._placeholders


def test_a_failing_attach_detaches_what_was_attached(tiny_sdxl):
    pipe = load_pipeline(tiny_sdxl)
    before = _state(pipe)
    method = DreamBoothLora(LoraSettings(rank=2, train_text_encoder=True, text_targets=("q_proj", "no_such_layer")))
    original = method.attach

    def attach_then_fail(*a):
        original(*a)
        raise RuntimeError("boom")

    method.attach = attach_then_fail
    with pytest.raises(RuntimeError, match="boom"):
        Trainer(DiffusersDenoiser(pipe), DiffusersTextEncoder(pipe), method, _data(), TrainConfig("a sks toy", steps=1,
                                                                                                  resolution=32))
    assert _same_state(before, _state(pipe))
    from fewshot_personalize.kernels.adapters.lora import lora_layers
    assert not lora_layers(pipe.unet) and not lora_layers(pipe.text_encoder_2)  # both SDXL encoders clean


def test_a_failure_after_attaching_detaches_the_method(tiny_sd):
    """E.g. ComfyUI's Cancel raised while the training images are being encoded: nothing stays attached."""
    pipe = load_pipeline(tiny_sd)
    before = _state(pipe)
    denoiser = DiffusersDenoiser(pipe)

    def cancelled(pixels):
        raise KeyboardInterrupt

    denoiser.encode_images = cancelled
    method = DreamBoothLora(LoraSettings(rank=2, train_text_encoder=True))
    with pytest.raises(KeyboardInterrupt):
        Trainer(denoiser, DiffusersTextEncoder(pipe), method, _data(), TrainConfig("a sks toy", steps=1, resolution=32))
    assert _same_state(before, _state(pipe)) and not method.roots


def test_catversion_layers_per_encoder_on_sdxl(tiny_sdxl):
    from fewshot_personalize.kernels.methods.catversion import parse_layer_spec

    assert parse_layer_spec("clip_l:1;clip_g:-2") == {"clip_l": (1,), "clip_g": (-2,)}
    assert parse_layer_spec(" 9, 10 ") == (9, 10) and parse_layer_spec("") is None
    pipe = load_pipeline(tiny_sdxl)
    method = CatVersion(CatVersionSettings(layers=parse_layer_spec("clip_l:1;clip_g:-2")))
    trainer, _ = _train(pipe, method, "a photo of a toy", steps=1)
    trainer.close()
    assert {enc: sorted(layers) for enc, layers in method.tensors().items()} == {"clip_l": [1], "clip_g": [0]}
    with pytest.raises(UserInputError, match="encoder clip_h, which this model does not have"):
        _train(pipe, CatVersion(CatVersionSettings(layers={"clip_h": (1,)})), "a toy", steps=1)
