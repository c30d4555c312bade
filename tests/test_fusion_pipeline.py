"""Several concepts fused into one tiny SD1 pipeline (Mix-of-Show §3.3): gradient fusion keeps each concept closer
to its own model than weight averaging does, a cancel leaves the pipeline as it was, and the fused file gives the
same model back; the command line end to end."""

import json

import pytest
import torch

from fewshot_personalize.kernels.adapters.lora import LoraWeights, adapter_paths
from fewshot_personalize.kernels.backends.diffusers import DiffusersDenoiser, DiffusersTextEncoder, load_pipeline
from fewshot_personalize.kernels.backends.diffusers.adapters import PipelineAdapters, adapter_modules
from fewshot_personalize.kernels.backends.diffusers.fusion import fuse_concepts
from fewshot_personalize.kernels.formats.concept_file import TOKEN_TEMPLATES, Concept
from fewshot_personalize.kernels.core.errors import UserInputError
from fewshot_personalize.kernels.engine.seams import Conditioning
from fewshot_personalize.kernels.formats.edlora_file import edlora_metadata, edlora_tensors
from fewshot_personalize.kernels.formats.lora_file import lora_metadata, lora_tensors
from fewshot_personalize.kernels.formats.safetensors_io import atomic_save


def _concept(pipe, token: str, seed: int, scale: float = 0.15) -> Concept:
    """A random ED-LoRA-like concept: rank-2 LoRA on every adapted layer, layer-wise tokens."""
    g = torch.Generator().manual_seed(seed)
    lora = {}
    for prefix, root in adapter_modules(pipe).items():
        targets = ("to_q", "to_k", "to_v", "to_out.0") if prefix == "lora_unet_" else ("q_proj", "v_proj")
        for path in adapter_paths(root, targets):
            m = dict(root.named_modules())[path]
            lora[prefix + path.replace(".", "_")] = LoraWeights(torch.randn(2, m.in_features, generator=g) * scale,
                                                                 torch.randn(m.out_features, 2, generator=g) * scale, 2.0)
    layers = DiffusersDenoiser(pipe).cross_attention_layers()
    width = DiffusersTextEncoder(pipe).encoders[0].width
    tokens = {token: {"clip_l": torch.randn(layers, 2, width, generator=g) * 0.05}}
    return Concept(f"{token}.safetensors", lora, tokens, [f"a photo of a {token}", token, f"a {token} on the beach"])


def _own_model_outputs(pipe, c: Concept, x, t):
    """Concept ``c`` alone (its LoRA merged, its tokens): its conditioning and the UNet's prediction."""
    adapters = PipelineAdapters(pipe)
    meta = {"fsp.method": "ed-lora", "fsp.base_family": "sd1", "fsp.token": next(iter(c.tokens))}
    adapters.apply(edlora_tensors(lora_tensors(c.lora), next(iter(c.tokens.values()))), meta, c.source)
    try:
        return _outputs(pipe, adapters, c.prompts, x, t)
    finally:
        adapters.remove()


def _outputs(pipe, adapters, prompts, x, t):
    with torch.no_grad():
        cond = adapters.encode(prompts, with_kv=False)
        pred = DiffusersDenoiser(pipe).predict(x.expand(len(prompts), -1, -1, -1), t.expand(len(prompts)),
                                               Conditioning(cond.context))
    return cond.context, pred


def _state(pipe):
    return [{k: v.clone() for k, v in m.state_dict().items()} for m in (pipe.unet, pipe.text_encoder)]


def _rel(a, b):
    return float((a - b).norm() / b.norm())


@pytest.fixture()
def pipe(tiny_sd):
    return load_pipeline(tiny_sd)


def test_gradient_fusion_keeps_each_concept_closer_to_its_own_model_than_averaging(pipe):
    concepts = [_concept(pipe, "<a>", 1), _concept(pipe, "<b>", 2)]
    g = torch.Generator().manual_seed(3)
    x, t = torch.randn(1, pipe.unet.config.in_channels, 8, 8, generator=g), torch.tensor([300])
    own = [_own_model_outputs(pipe, c, x, t) for c in concepts]
    errors = {}
    for fusion in ("gradient", "average"):
        fused = fuse_concepts(pipe, concepts, fusion, sample_steps=3, samples=1, resolution=32)
        try:
            errors[fusion] = [[_rel(o, r) for o, r in zip(_outputs(pipe, fused.adapters, c.prompts, x, t), mine)]
                              for c, mine in zip(concepts, own)]
        finally:
            fused.remove()
    # These random LoRAs change every word, so on the words the prompts share the two concepts ask for different
    # outputs from the same inputs and no single weight serves both: the text encoder can only gain a little there.
    # The UNet's prediction, what sampling sees, must come out clearly closer to each concept's own model.
    for grad, avg in zip(errors["gradient"], errors["average"]):
        assert grad[0] < avg[0]
        assert grad[1] < 0.9 * avg[1], errors


def test_a_cancelled_fusion_leaves_the_pipeline_as_it_was(pipe):
    before = _state(pipe)
    plain = DiffusersTextEncoder(pipe).encode(["a <a> toy"]).context

    def cancel(stage, done, total):
        if stage == "unet" and done == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        fuse_concepts(pipe, [_concept(pipe, "<a>", 1), _concept(pipe, "<b>", 2)], sample_steps=2, samples=1,
                      resolution=32, progress=cancel)
    assert all(torch.equal(a[k], b[k]) for a, b in zip(before, _state(pipe)) for k in a)
    assert not any(m._forward_pre_hooks for m in pipe.unet.modules())
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in pipe.text_encoder.modules())
    assert torch.equal(DiffusersTextEncoder(pipe).encode(["a <a> toy"]).context, plain)


def test_fusion_refuses_what_cannot_be_fused(pipe):
    a = _concept(pipe, "<a>", 1)
    with pytest.raises(UserInputError, match="two or more concepts"):
        fuse_concepts(pipe, [a])
    with pytest.raises(UserInputError, match="both use the token '<a>'"):
        fuse_concepts(pipe, [a, _concept(pipe, "<a>", 2)])
    with pytest.raises(UserInputError, match="fusion must be one of"):
        fuse_concepts(pipe, [a, _concept(pipe, "<b>", 2)], "median")
    bad = _concept(pipe, "<b>", 2)
    bad.lora["lora_unet_no_such_layer"] = next(iter(bad.lora.values()))
    with pytest.raises(UserInputError, match="no_such_layer"):
        fuse_concepts(pipe, [a, bad])
    conv = _concept(pipe, "<c>", 3)  # a LoCon-style adapter ('--unet-targets all') carries convolutions
    conv.lora["lora_unet_conv_in"] = LoraWeights(torch.zeros(2, 4, 3, 3), torch.zeros(32, 2, 1, 1), 2.0)
    with pytest.raises(UserInputError, match="conv_in is a convolution; gradient fusion fuses linear layers"):
        fuse_concepts(pipe, [a, conv])


def _write_concept(pipe, c: Concept, path):
    vectors = next(iter(c.tokens.values()))
    meta = edlora_metadata(lora_metadata(family="sd1", method="ed-lora", rank=2, alpha=2.0, steps=1),
                           next(iter(c.tokens)), vectors)
    atomic_save(edlora_tensors(lora_tensors(c.lora), vectors), path, meta)


def test_fuse_command_writes_a_file_that_gives_the_fused_model_back(pipe, tiny_sd, tmp_path, capsys):
    from safetensors import safe_open

    from fewshot_personalize.kernels.cli.main import main

    concepts = [_concept(pipe, "<a>", 1), _concept(pipe, "<b>", 2)]
    for c in concepts:
        _write_concept(pipe, c, tmp_path / c.source)
    out = tmp_path / "fused.safetensors"
    code = main(["fuse", "--base", tiny_sd, "--adapter", str(tmp_path / "<a>.safetensors"), "--adapter",
                 str(tmp_path / "<b>.safetensors"), "--steps", "2", "--samples", "1", "--resolution", "32",
                 "--out", str(out)])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "fused 2 concepts (gradient" in captured.out
    with safe_open(str(out), "pt") as f:
        meta = f.metadata()
    assert meta["fsp.method"] == "fused" and json.loads(meta["fsp.tokens"]) == ["<a>", "<b>"]

    for c in concepts:  # what the command records a token concept on
        c.prompts = [t.format(next(iter(c.tokens))) for t in TOKEN_TEMPLATES]
    fused = fuse_concepts(pipe, concepts, sample_steps=2, samples=1, resolution=32)  # the same run, in memory
    in_memory = _state(pipe)
    prompts = ["a <a> and a <b> on the beach"]
    with torch.no_grad():
        cond = fused.adapters.encode(prompts, with_kv=False).context
    fused.remove()
    loaded = PipelineAdapters(pipe)
    assert loaded.load(out) == "fused"
    assert all(torch.allclose(a[k], b[k], atol=1e-4) for a, b in zip(in_memory, _state(pipe)) for k in a)
    with torch.no_grad():
        assert torch.allclose(loaded.encode(prompts, with_kv=False).context, cond, atol=1e-4)
    loaded.remove()

    code = main(["generate", "--base", tiny_sd, "--adapter", str(out), "--prompt", prompts[0], "--n", "1",
                 "--steps", "2", "--out", str(tmp_path / "imgs")])
    assert code == 0 and (tmp_path / "imgs" / "000.png").is_file()
    code = main(["fuse", "--base", tiny_sd, "--adapter", str(tmp_path / "<a>.safetensors"), "--out",
                 str(tmp_path / "one.safetensors")])
    assert code == 2 and "two or more --adapter" in capsys.readouterr().err
    assert not (tmp_path / "one.safetensors").exists()


def test_fuse_command_takes_dreambooth_loras_by_their_instance_prompts(pipe, tiny_sd, tmp_path, capsys):
    from safetensors import safe_open

    from fewshot_personalize.kernels.cli.main import main

    for name, seed, prompt in (("a", 1, "a sks toy"), ("b", 2, None)):
        c = _concept(pipe, "<x>", seed)
        meta = lora_metadata(family="sd1", method="dreambooth-lora", rank=2, alpha=2.0, steps=1, instance_prompt=prompt)
        atomic_save(lora_tensors(c.lora), tmp_path / f"{name}.safetensors", meta)
    args = ["fuse", "--base", tiny_sd, "--adapter", str(tmp_path / "a.safetensors"), "--steps", "1", "--samples", "1",
            "--resolution", "32"]
    code = main([*args, "--adapter", str(tmp_path / "b.safetensors"), "--out", str(tmp_path / "f1.safetensors")])
    assert code == 2 and "records no instance prompt" in capsys.readouterr().err  # b says nothing of itself
    assert not (tmp_path / "f1.safetensors").exists()
    code = main([*args, "--adapter", f"{tmp_path / 'b.safetensors'}=a zwx ball", "--out", str(tmp_path / "f.safetensors")])
    assert code == 0, capsys.readouterr().err
    with safe_open(str(tmp_path / "f.safetensors"), "pt") as f:
        assert json.loads(f.metadata()["fsp.tokens"]) == [] and f.metadata()["fsp.fusion"] == "gradient"
