"""Every node of the pack, driven directly (no server), on the tiny model built in code."""

from __future__ import annotations

import os

import pytest
import torch

pytestmark = pytest.mark.comfyui
if not os.environ.get("COMFYUI_PATH"):
    pytest.skip("COMFYUI_PATH is not set: the ComfyUI suite needs a ComfyUI source checkout (v0.3.64 or newer)",
                allow_module_level=True)

STEPS = 4
RES = 32


def images(n=3, h=RES, w=RES, seed=0):
    return torch.rand(n, h, w, 3, generator=torch.Generator().manual_seed(seed))


def train(objs, *, steps=STEPS, text=False, rank=4, imgs=None, preview=0, **opt):
    from fewshot_personalize.nodes.train import TrainConcept

    m, c, v = objs
    opt = {k: [val] for k, val in opt.items()}
    with torch.inference_mode():  # as ComfyUI runs every node
        out = TrainConcept.execute([m], [c], [v], imgs if imgs is not None else [images()], ["a photo of sks toy"],
                                   [steps], [1e-3], [rank], [text], [RES], [1], [0], preview_steps=[preview], **opt)
    return out.args


def denoise(model, seed=0):
    """The MODEL's denoised output on fixed inputs (weight patches applied as ComfyUI applies them); SDXL models
    also get a fixed pooled embedding with 128×128 size ids (``y``)."""
    import comfy.model_base
    import comfy.model_management as mm

    base = model.model
    unet_config = base.model_config.unet_config
    g = torch.Generator().manual_seed(seed)
    x, ctx = torch.randn(1, 4, 16, 16, generator=g), torch.randn(1, 77, unet_config["context_dim"], generator=g)
    extra = {}
    if isinstance(base, comfy.model_base.SDXL):
        pooled = torch.randn(1, unet_config["adm_in_channels"] - 6 * base.embedder.dim, generator=g)
        extra["y"] = base.encode_adm(pooled_output=pooled, width=128, height=128)
    with torch.inference_mode():
        mm.load_models_gpu([model], force_full_load=True)
        return model.model.apply_model(x * 3, torch.tensor([3.0]), c_crossattn=ctx, **extra).float().clone()


def encode(clip, text="a photo of sks toy"):
    """The CLIP's conditioning of ``text`` and its pooled output, flattened into one vector."""
    with torch.inference_mode():
        cond, pooled = clip.encode_from_tokens(clip.tokenize(text), return_pooled=True)
        return torch.cat([cond.flatten(), pooled.flatten()]).clone()


def assert_clean(m, c):
    from fewshot_personalize.nodes.backend.session import leftover_lora_layers

    assert leftover_lora_layers(m, c) == 0
    assert not m.patches and not m.object_patches
    assert not hasattr(m.model.diffusion_model, "peft_config")
    encoders = [getattr(c.cond_stage_model, n) for n in ("clip_l", "clip_g") if hasattr(c.cond_stage_model, n)]
    for enc in encoders:
        for layer in enc.transformer.text_model.encoder.layers:
            # the non-in-place forward was only an object patch on the training clone
            assert getattr(layer.forward, "__func__", None) is type(layer).forward


def test_entrypoint_lists_nodes():
    import asyncio

    from fewshot_personalize import comfy_entrypoint

    nodes = asyncio.run(asyncio.run(comfy_entrypoint()).get_node_list())
    ids = {n.define_schema().node_id for n in nodes}
    assert ids == {"FSP_TrainConcept", "FSP_TrainTextualInversion", "FSP_TrainCatVersion", "FSP_TrainPivotal", "FSP_SaveAdapter",
                   "FSP_ApplyAdapter", "FSP_SaveEmbedding", "FSP_SaveCatVersion", "FSP_LoadCatVersion",
                   "FSP_LoadDemoModel", "FSP_LoadDemoConcept", "FSP_LoadImageFolder", "FSP_EvaluateConcept",
                   "FSP_Augmentation", "FSP_AugmentationPreview", "FSP_ApplyLayerwiseConcepts", "FSP_TrainEdLora",
                   "FSP_SaveConcept", "FSP_LoadConcept", "FSP_FuseConcepts", "FSP_Region", "FSP_ApplyRegions"}
    for n in nodes:
        s = n.define_schema()
        assert s.category.startswith("fewshot/")
        assert all(i.tooltip for i in s.inputs), s.node_id


def test_load_demo_model_node():
    from fewshot_personalize.nodes.demo_loader import LoadDemoModel

    with torch.inference_mode():
        m, c, v = LoadDemoModel.execute("tiny (test)").args
    assert m.model.diffusion_model is not None and v.latent_channels == 4
    try:
        from fewshot_personalize.kernels.demo.model import demo_model_path  # noqa: F401
    except ImportError:
        with pytest.raises(ValueError, match="demo model"):
            LoadDemoModel.execute("demo")


def test_train_node_outputs_and_leaves_caller_clean(family_case, loras_dir):
    family, _, objs = family_case
    m, c, v = objs
    before, before_text = denoise(m), encode(c)
    out_m, out_c, adapter, curve, preview = train(objs, text=True, preview=2)
    assert_clean(m, c)
    assert torch.equal(denoise(m), before) and torch.equal(encode(c), before_text)
    assert out_m is not m and len(out_m.patches) > 0 and len(out_c.patcher.patches) > 0
    assert not torch.allclose(denoise(out_m), before)
    assert curve.shape[0] == 1 and curve.shape[-1] == 3 and preview.shape == (1, RES, RES, 3)
    assert adapter.metadata["fsp.steps"] == str(STEPS) and adapter.family == family
    # the same metadata writer as the command line: method name and booleans spelled one way
    assert adapter.metadata["fsp.method"] == "dreambooth-lora" and adapter.metadata["fsp.train_text_encoder"] == "true"
    assert adapter.metadata["fsp.trainer"] == "comfyui"
    assert not torch.allclose(encode(out_c), before_text)
    assert all(torch.isfinite(w.up).all() and torch.isfinite(w.down).all() for w in adapter.weights.values())


def test_train_without_text_encoder_patches_only_the_model(family_case, loras_dir):
    _, _, objs = family_case
    m, c, _ = objs
    before, before_text = denoise(m), encode(c)
    out_m, out_c, adapter, _, _ = train(objs, text=False)
    assert_clean(m, c)
    assert torch.equal(denoise(m), before) and torch.equal(encode(c), before_text)
    assert adapter.weights and all(k.startswith("lora_unet_") for k in adapter.weights)
    assert not out_c.patcher.patches and torch.equal(encode(out_c), before_text)
    assert not torch.allclose(denoise(out_m), before)


@pytest.mark.parametrize("layers", ["attention", "all"])
def test_adapter_keys_match_the_diffusers_back_end(family_case, loras_dir, layers):
    from fewshot_personalize.kernels.backends.diffusers import DiffusersDenoiser, DiffusersTextEncoder, load_pipeline
    from fewshot_personalize.kernels.formats.lora_file import kohya_name
    from fewshot_personalize.nodes.train import LORA_LAYERS

    family, folder, objs = family_case
    adapter = train(objs, steps=1, text=True, lora_layers=layers)[2]
    pipe = load_pipeline(str(folder))
    expected = {kohya_name(r.prefix, p) for r in DiffusersDenoiser(pipe).adapter_roots(LORA_LAYERS[layers]) for p in r.paths}
    expected |= {kohya_name(r.prefix, p) for r in DiffusersTextEncoder(pipe).adapter_roots() for p in r.paths}
    assert set(adapter.weights) == expected
    text_prefixes = {k.split("_text_model_")[0] for k in adapter.weights if not k.startswith("lora_unet_")}
    assert text_prefixes == ({"lora_te1", "lora_te2"} if family == "sdxl" else {"lora_te"})


@pytest.mark.parametrize("layers", ["attention", "all"])
def test_saved_lora_through_stock_loraloader_equals_in_graph_adapter(family_case, loras_dir, comfy_nodes, layers):
    import folder_paths

    from fewshot_personalize.nodes.apply_adapter import ApplyAdapter
    from fewshot_personalize.nodes.save_adapter import SaveAdapter

    _, _, objs = family_case
    m, c, v = objs
    out_m, out_c, adapter, _, _ = train(objs, text=True, lora_layers=layers)
    convs = [k for k, w in adapter.weights.items() if w.down.ndim == 4]
    assert bool(convs) == (layers == "all")  # 'all' adapts the convolutions too (kohya LoCon layout)
    name = SaveAdapter.execute(adapter, "fewshot/concept", False).args[0]
    assert name == "fewshot/concept.safetensors" and (loras_dir / name).is_file()
    assert name in folder_paths.get_filename_list("loras")  # listed without a restart
    stock_m, stock_c = comfy_nodes.LoraLoader().load_lora(m, c, name, 1.0, 1.0)
    assert torch.allclose(denoise(stock_m), denoise(out_m), atol=1e-5)
    assert torch.allclose(encode(stock_c), encode(out_c), atol=1e-5)
    assert not torch.allclose(denoise(stock_m), denoise(m)) and not torch.allclose(encode(stock_c), encode(c))
    # our Apply node from the file and from the in-graph adapter agree as well
    file_m, file_c = ApplyAdapter.execute(m, name, 1.0, 1.0, clip=c).args
    graph_m, _ = ApplyAdapter.execute(m, "(use the adapter input)", 1.0, 1.0, clip=c, adapter=adapter).args
    assert torch.allclose(denoise(file_m), denoise(out_m), atol=1e-5)
    assert torch.allclose(denoise(graph_m), denoise(out_m), atol=1e-5)
    # separate strengths: model strength 0 leaves the denoiser as it was, clip strength still applies
    m0, c1 = ApplyAdapter.execute(m, name, 0.0, 1.0, clip=c).args
    assert torch.allclose(denoise(m0), denoise(m), atol=1e-6)
    assert torch.allclose(encode(c1), encode(out_c), atol=1e-5)


def test_save_never_overwrites_unless_asked(tiny_objects, loras_dir):
    from fewshot_personalize.nodes.save_adapter import SaveAdapter

    adapter = train(tiny_objects, steps=1)[2]
    SaveAdapter.execute(adapter, "one", False)
    msg = SaveAdapter.validate_inputs(filename="one", overwrite=False)
    assert isinstance(msg, str) and "already exists" in msg
    with pytest.raises(ValueError, match="already exists"):
        SaveAdapter.execute(adapter, "one", False)
    SaveAdapter.execute(adapter, "one", True)
    assert [p.name for p in loras_dir.iterdir()] == ["one.safetensors"]  # no temporary files left
    assert isinstance(SaveAdapter.validate_inputs(filename="../escape", overwrite=False), str)


def test_apply_refuses_corrupt_foreign_and_other_family_files(tiny_objects, loras_dir):
    from safetensors.torch import save_file

    from fewshot_personalize.nodes.apply_adapter import ApplyAdapter

    m, c, _ = tiny_objects
    (loras_dir / "corrupt.safetensors").write_bytes(b"not a safetensors file at all")
    save_file({"some.weight": torch.zeros(2, 2)}, str(loras_dir / "foreign.safetensors"))
    xl = {"lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight": torch.zeros(4, 640),
          "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q.lora_up.weight": torch.zeros(640, 4)}
    save_file(xl, str(loras_dir / "xl_meta.safetensors"), metadata={"ss_base_model_version": "sdxl_base_v1-0"})
    save_file(xl, str(loras_dir / "xl_plain.safetensors"))
    import folder_paths

    folder_paths.filename_list_cache.pop("loras", None)
    for name, pattern in [("corrupt", "not a readable safetensors"), ("foreign", "not a LoRA"),
                          ("xl_meta", "sdxl model, but this model is sd1"), ("xl_plain", "layers this model does not have")]:
        with pytest.raises(ValueError, match=pattern):
            ApplyAdapter.execute(m, f"{name}.safetensors", 1.0, 1.0, clip=c)
    assert "not in models/loras" in ApplyAdapter.validate_inputs(lora_name="missing.safetensors")


def test_apply_refuses_an_adapter_of_the_other_family(tiny_objects, tiny_sdxl_objects, loras_dir):
    """SDXL adapters on the SD1 model and SD1 adapters on the SDXL model are refused by name, in-graph and from
    a file; a file without our metadata is refused by its layers."""
    from safetensors.torch import load_file, save_file

    from fewshot_personalize.nodes.apply_adapter import ApplyAdapter
    from fewshot_personalize.nodes.save_adapter import SaveAdapter

    for (src, src_family), (dst, dst_family) in [((tiny_sdxl_objects, "sdxl"), (tiny_objects, "sd1")),
                                                 ((tiny_objects, "sd1"), (tiny_sdxl_objects, "sdxl"))]:
        adapter = train(src, steps=1, text=True)[2]
        name = SaveAdapter.execute(adapter, f"from_{src_family}", False).args[0]
        message = f"trained for a {src_family} model, but this model is {dst_family}"
        m, c, _ = dst
        with pytest.raises(ValueError, match=message):
            ApplyAdapter.execute(m, "(use the adapter input)", 1.0, 1.0, clip=c, adapter=adapter)
        with pytest.raises(ValueError, match=message):
            ApplyAdapter.execute(m, name, 1.0, 1.0, clip=c)
        save_file(load_file(str(loras_dir / name)), str(loras_dir / f"bare_{src_family}.safetensors"))
        with pytest.raises(ValueError, match="layers this model does not have"):
            ApplyAdapter.execute(m, f"bare_{src_family}.safetensors", 1.0, 1.0, clip=c)
        assert_clean(m, c)


def test_cancel_mid_training_leaves_no_patch_and_resumes(tiny_objects, loras_dir, monkeypatch):
    import comfy.model_management as mm

    m, c, _ = tiny_objects
    before = denoise(m)
    import comfy.utils

    real_update, steps_seen = comfy.utils.ProgressBar.update_absolute, []

    def press_cancel_at_step_2(self, value, total=None, preview=None):  # what the Cancel button does: set the flag
        steps_seen.append(value)
        if value == 2:
            mm.interrupt_current_processing(True)
        return real_update(self, value, total, preview)

    monkeypatch.setattr(comfy.utils.ProgressBar, "update_absolute", press_cancel_at_step_2)
    with pytest.raises(mm.InterruptProcessingException):
        train(tiny_objects, steps=6, text=True, checkpoint_name="cancelled")
    monkeypatch.setattr(comfy.utils.ProgressBar, "update_absolute", real_update)
    assert steps_seen == [1, 2]  # progress every step; the node stops at the step Cancel was pressed
    assert_clean(m, c)
    assert torch.equal(denoise(m), before)
    ckpt = loras_dir.parent / "output" / "fewshot_checkpoints" / "cancelled.safetensors"
    assert ckpt.is_file()  # the last good step is kept
    from safetensors import safe_open
    with safe_open(str(ckpt), "pt") as f:
        assert f.metadata()["step"] == "2"
    # resuming finishes the run, and ends where an uninterrupted run ends
    resumed = train(tiny_objects, steps=6, text=True, checkpoint_name="cancelled", resume=True)[2]
    fresh = train(tiny_objects, steps=6, text=True)[2]
    for k, w in fresh.weights.items():
        assert torch.allclose(resumed.weights[k].up, w.up, atol=1e-6), k
    assert_clean(m, c)


def test_bad_inputs_give_clear_messages(tiny_objects, loras_dir):
    from fewshot_personalize.nodes.train import TrainConcept

    m, c, _ = tiny_objects
    assert "instance prompt is empty" in TrainConcept.validate_inputs(instance_prompt=["  "])
    with pytest.raises(ValueError, match="rank 64 is larger"):
        train(tiny_objects, steps=1, rank=64)
    with pytest.raises(ValueError, match="class prompt is empty"):
        train(tiny_objects, steps=1, class_images=images(2, seed=3))
    with pytest.raises(ValueError, match="2 masks for 3 images"):
        train(tiny_objects, steps=1, mask=torch.ones(2, RES, RES))
    assert_clean(m, c)


def test_images_of_different_sizes_and_mask_of_wrong_size_are_resized(tiny_objects, loras_dir, caplog):
    from fewshot_personalize.nodes.train import TrainConcept

    m, c, v = tiny_objects
    imgs = [images(2, 48, 64, seed=1), images(1, 40, 32, seed=2)]
    with caplog.at_level("WARNING"), torch.inference_mode():
        result = TrainConcept.execute([m], [c], [v], imgs, ["a photo of sks toy"], [1], [1e-3], [4], [False], [RES],
                                      [1], [0], mask=[torch.ones(1, 10, 12)], preview_steps=[0])
    assert result.args[2].weights and "resizing the mask" in caplog.text
    text = result.ui.as_dict()["text"][0]  # what the node shows in the UI
    assert text.startswith("trained 1 steps")
    assert "VAE round trip of the 3 instance images (subject)" in text  # the model's ceiling, before blaming the method
    assert f"2 image(s) of 64x48 scaled (shorter side to {RES}) and centre-cropped to {RES}x{RES}" in text
    assert f"1 image(s) of 32x40 centre-cropped to {RES}x{RES}" in text  # shorter side already 32: crop only
    assert "mask 0 is 12x10 but its image is 64x48: resizing the mask to the image" in text
    assert "mask 2 is 12x10 but its image is 32x40" in text
    assert_clean(m, c)


def test_prior_preservation_with_class_images(tiny_objects, loras_dir):
    out = train(tiny_objects, steps=2, class_images=images(2, seed=5), class_prompt="a photo of a toy", prior_weight=1.0)
    assert out[2].metadata["fsp.class_prompt"] == "a photo of a toy"


def test_comfyuis_own_parser_reads_the_registry_metadata():
    from pathlib import Path

    from comfy_config import config_parser

    cfg = config_parser.extract_node_configuration(str(Path(__file__).resolve().parents[2]))
    assert cfg.tool_comfy.publisher_id == "fewshot-personalize"
    assert cfg.project.supported_comfyui_version.startswith(">=")
    assert "GPU :: NVIDIA CUDA" in cfg.project.supported_accelerators  # [] when any accelerator classifier is invalid
    assert cfg.project.supported_os == ["OS Independent"]
