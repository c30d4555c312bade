"""The command line: a real train → generate run, and one clear line + exit code 2 for each bad input."""

import os
import subprocess
import sys

import pytest

from fewshot_personalize.kernels.cli import main


def _run_main(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_train_with_prior_then_generate_subprocess(tiny_sd, image_folder, tmp_path):
    out = tmp_path / "concept.safetensors"
    env = {**os.environ, "FEWSHOT_CACHE": str(tmp_path / "cache")}
    cmd = [sys.executable, "-m", "fewshot_personalize", "train", "--base", tiny_sd, "--images", str(image_folder),
           "--prompt", "a sks toy", "--class-prompt", "a toy", "--num-class-images", "3", "--steps", "6",
           "--rank", "2", "--train-text-encoder", "--out", str(out)]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr
    assert out.is_file() and "trained 6 steps" in r.stdout and str(out) in r.stdout
    assert not os.path.exists(str(out.with_suffix("")) + ".checkpoint.safetensors")
    cache = list((tmp_path / "cache" / "class_images").iterdir())
    assert len(cache) == 1 and len(list(cache[0].glob("*.png"))) == 3

    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(tiny_sd)
    pipe.load_lora_weights(str(out))  # the ecosystem reads the file

    gen = [sys.executable, "-m", "fewshot_personalize", "generate", "--base", tiny_sd, "--lora", f"{out}:0.8",
           "--prompt", "a sks toy on the beach", "--n", "2", "--steps", "3", "--out", str(tmp_path / "imgs")]
    r = subprocess.run(gen, capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in (tmp_path / "imgs").iterdir()) == ["000.png", "001.png"]


def test_class_images_are_generated_once_and_reused(tiny_sd, image_folder, tmp_path, capsys):
    folder = tmp_path / "class"
    args = ["train", "--base", tiny_sd, "--images", str(image_folder), "--prompt", "a sks toy", "--class-prompt",
            "a toy", "--class-images", str(folder), "--num-class-images", "2", "--steps", "1", "--rank", "1"]
    assert _run_main(capsys, *args, "--out", str(tmp_path / "a.safetensors"))[0] == 0
    first = {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}
    assert len(first) == 2
    assert _run_main(capsys, *args, "--out", str(tmp_path / "b.safetensors"))[0] == 0
    assert {p.name: p.stat().st_mtime_ns for p in folder.iterdir()} == first


def test_class_image_cache_follows_the_model_weights(tiny_sd, tmp_path):
    """The default class-image folder is keyed by the model's weight files, not only its path: a model rewritten
    in place gets a fresh folder; an untouched one keeps its folder."""
    import shutil

    from fewshot_personalize.kernels.backends.diffusers.class_images import default_cache_dir

    model = tmp_path / "model"
    shutil.copytree(tiny_sd, model)
    before = default_cache_dir(str(model), "a toy", 64)
    assert default_cache_dir(str(model), "a toy", 64) == before
    assert default_cache_dir(str(model), "a dog", 64) != before
    weights = next(model.glob("unet/*.safetensors"))
    weights.write_bytes(weights.read_bytes() + b" ")  # the same path, other weights
    assert default_cache_dir(str(model), "a toy", 64) != before


def test_resume_after_interrupt(tiny_sd, image_folder, tmp_path, capsys, monkeypatch):
    from fewshot_personalize.kernels.engine import loop as trainer_mod

    out = tmp_path / "r.safetensors"
    args = ["train", "--base", tiny_sd, "--images", str(image_folder), "--prompt", "a sks toy", "--steps", "6",
            "--rank", "2", "--out", str(out)]
    real = trainer_mod.Trainer.train

    def stop_at_3(self, *, on_step=None, **kw):
        def hook(step, total, loss):
            on_step(step, total, loss)
            if step == 3:
                raise KeyboardInterrupt
        return real(self, on_step=hook, **kw)

    monkeypatch.setattr(trainer_mod.Trainer, "train", stop_at_3)
    code, _, err = _run_main(capsys, *args)
    assert code == 130 and "interrupted after 3 steps" in err and not out.exists()
    monkeypatch.setattr(trainer_mod.Trainer, "train", real)
    code, stdout, err = _run_main(capsys, *args, "--resume")
    assert code == 0, err
    assert out.is_file() and "trained 6 steps" in stdout


BAD = {
    "missing image folder": (["--images", "{tmp}/nope"], "does not exist"),
    "empty image folder": (["--images", "{tmp}/empty"], "has no images"),
    "zero-byte image": (["--images", "{tmp}/zero"], "is empty (0 bytes)"),
    "unreadable image": (["--images", "{tmp}/junk"], "cannot be read"),
    "base is not a model": (["--base", "{tmp}/empty"], "not a diffusers model folder"),
    "base does not exist": (["--base", "{tmp}/nowhere"], "no such model folder"),
    "empty prompt": (["--prompt", "  "], "prompt is empty"),
    "output folder missing": (["--out", "{tmp}/no/dir/x.safetensors"], "does not exist"),
    "output exists": (["--out", "{tmp}/exists.safetensors"], "already exists"),
    "rank below one": (["--rank", "0"], "rank must be at least 1"),
    "rank too large": (["--rank", "1000"], "rank 1000 is larger"),
    "steps below one": (["--steps", "0"], "steps must be at least 1"),
    "empty class prompt": (["--class-prompt", ""], "class prompt is empty"),
}


@pytest.fixture()
def bad_inputs(tmp_path, image_folder):
    (tmp_path / "empty").mkdir()
    (tmp_path / "zero").mkdir()
    (tmp_path / "zero" / "a.png").write_bytes(b"")
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "a.png").write_text("hello")
    (tmp_path / "exists.safetensors").write_bytes(b"keep me")
    return tmp_path


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_gives_one_line_and_exit_2(case, bad_inputs, tiny_sd, image_folder, capsys):
    override, message = BAD[case]
    opts = {"--base": tiny_sd, "--images": str(image_folder), "--prompt": "a sks toy", "--steps": "2",
            "--out": str(bad_inputs / "out.safetensors")}
    for flag, value in zip(override[::2], override[1::2]):
        opts[flag] = value.format(tmp=bad_inputs)
    argv = ["train"] + [x for kv in opts.items() for x in kv]
    code, out, err = _run_main(capsys, *argv)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], err
    assert "Traceback" not in err
    assert not (bad_inputs / "out.safetensors").exists()
    assert (bad_inputs / "exists.safetensors").read_bytes() == b"keep me"


def test_nan_loss_exits_2_and_keeps_checkpoint(tiny_sd, image_folder, tmp_path, capsys, monkeypatch):
    from fewshot_personalize.kernels.backends.diffusers import denoiser as diffusers_backend

    real = diffusers_backend.DiffusersDenoiser.predict
    calls = {"n": 0}

    def poisoned(self, x_t, t, cond):
        calls["n"] += 1
        out = real(self, x_t, t, cond)
        return out * float("nan") if calls["n"] >= 3 else out

    monkeypatch.setattr(diffusers_backend.DiffusersDenoiser, "predict", poisoned)
    out = tmp_path / "n.safetensors"
    code, _, err = _run_main(capsys, "train", "--base", tiny_sd, "--images", str(image_folder), "--prompt", "a sks toy",
                             "--steps", "5", "--out", str(out))
    assert code == 2 and "loss became nan at step 2" in err and not out.exists()
    assert os.path.exists(str(out.with_suffix("")) + ".checkpoint.safetensors")


def test_generate_bad_lora(tiny_sd, tmp_path, capsys):
    (tmp_path / "x.safetensors").write_bytes(b"junk")
    code, _, err = _run_main(capsys, "generate", "--base", tiny_sd, "--lora", str(tmp_path / "x.safetensors"),
                             "--prompt", "a toy", "--out", str(tmp_path / "o"))
    assert code == 2 and "not a readable safetensors file" in err


@pytest.mark.parametrize("method,extra,files", [
    ("textual-inversion", ["--num-vectors", "2", "--init-word", "toy"], ["ti.safetensors"]),
    ("catversion", ["--catversion-layers", "-1", "--prompt", "a photo of a toy"], ["ti.safetensors"]),
    ("pivotal", ["--rank", "2", "--prompt", "a <sks> toy"],
     ["ti-embedding.safetensors", "ti-lora.safetensors", "ti.safetensors"]),
    ("ed-lora", ["--rank", "2", "--init-word", "toy"], ["ti.safetensors"]),
])
def test_train_each_method_then_generate_with_adapter(method, extra, files, tiny_sd, image_folder, tmp_path, capsys):
    from safetensors import safe_open

    out = tmp_path / "ti.safetensors"
    code, stdout, err = _run_main(capsys, "train", "--method", method, "--base", tiny_sd, "--images", str(image_folder),
                                  "--steps", "2", "--out", str(out), *extra)
    assert code == 0, err
    assert sorted(p.name for p in tmp_path.glob("ti*.safetensors")) == files and f"of {method}" in stdout
    with safe_open(str(out), "pt") as f:
        assert f.metadata()["fsp.method"] == method and f.metadata()["fsp.trainer"] == "cli"
    prompt = "a photo of a toy" if method == "catversion" else "a <sks> toy on the beach"
    code, stdout, err = _run_main(capsys, "generate", "--base", tiny_sd, "--adapter", f"{out}:0.7", "--prompt", prompt,
                                  "--n", "1", "--steps", "2", "--out", str(tmp_path / "imgs"))
    assert code == 0, err
    assert (tmp_path / "imgs" / "000.png").is_file() and "with 1 adapter(s)" in stdout


METHOD_BAD = {
    "placeholder is a vocabulary word": (["--method", "textual-inversion", "--token", "toy"], "already a word"),
    "zero vectors": (["--method", "textual-inversion", "--num-vectors", "0"], "--num-vectors must be at least 1"),
    "prompt without the token": (["--method", "textual-inversion", "--prompt", "a toy"], "does not contain the placeholder"),
    "layers beyond the model": (["--method", "catversion", "--catversion-layers", "7"], "layer 7 is beyond"),
    "layers not numbers": (["--method", "catversion", "--catversion-layers", "last"], "give layer numbers"),
    "prior with textual inversion": (["--method", "textual-inversion", "--class-prompt", "a toy"], "prior preservation"),
    "dreambooth without prompt": (["--method", "dreambooth-lora"], "needs --prompt"),
    "ed-lora prompt without the token": (["--method", "ed-lora", "--prompt", "a toy"], "does not contain the placeholder"),
    "ed-lora token is a vocabulary word": (["--method", "ed-lora", "--token", "toy"], "already a word"),
}


@pytest.mark.parametrize("case", sorted(METHOD_BAD))
def test_bad_method_input_gives_one_line_and_exit_2(case, tiny_sd, image_folder, tmp_path, capsys):
    flags, message = METHOD_BAD[case]
    out = tmp_path / "o.safetensors"
    code, _, err = _run_main(capsys, "train", "--base", tiny_sd, "--images", str(image_folder), "--steps", "1",
                             "--out", str(out), *flags)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and message in lines[0], err
    assert not list(tmp_path.glob("*.safetensors"))


def test_generate_refuses_an_adapter_of_another_family(tiny_sd, tiny_sdxl, image_folder, tmp_path, capsys):
    out = tmp_path / "xl.safetensors"
    assert _run_main(capsys, "train", "--method", "textual-inversion", "--base", tiny_sdxl, "--images",
                     str(image_folder), "--steps", "1", "--out", str(out))[0] == 0
    code, _, err = _run_main(capsys, "generate", "--base", tiny_sd, "--adapter", str(out), "--prompt", "a <sks>",
                             "--n", "1", "--steps", "1", "--out", str(tmp_path / "i"))
    assert code == 2 and "trained for a sdxl model, but this model is sd1" in err


def _train_args(*extra):
    from fewshot_personalize.kernels.cli.main import build_parser

    return build_parser().parse_args(["train", "--images", "imgs", "--out", "o.safetensors", *extra])


def test_base_demo_takes_the_benchmark_recipe_unless_flags_say_otherwise():
    from fewshot_personalize.kernels.cli.train import fill_defaults
    from fewshot_personalize.kernels.demo.experiment import recipe_for

    a = _train_args("--base", "demo", "--prompt", "a sks toy", "--class-prompt", "a toy")
    note = fill_defaults(a)
    r = recipe_for("dreambooth-lora")
    assert (a.steps, a.lr, a.text_lr, a.rank, a.batch_size, a.train_text_encoder, a.num_class_images) == \
        (r.steps, r.lr, r.text_lr, r.rank, r.batch_size, r.text, r.n_class)
    assert a.unet_targets == ",".join(r.unet_targets) == "all"  # the recipe adapts every UNet layer
    assert "--base demo" in note and f"lr {r.lr}" in note and "unet-targets all" in note

    a = _train_args("--base", "demo", "--prompt", "a sks toy", "--unet-targets", "to_k,to_v")
    fill_defaults(a)
    assert a.unet_targets == "to_k,to_v"

    a = _train_args("--base", "demo", "--prompt", "a sks toy", "--lr", "1e-4", "--steps", "50", "--no-train-text-encoder")
    note = fill_defaults(a)
    assert (a.lr, a.steps, a.train_text_encoder) == (1e-4, 50, False)
    assert "lr " not in note.replace("text-lr", "") and "--class-prompt" in note  # the recipe's prior is suggested

    a = _train_args("--base", "demo", "--method", "textual-inversion")
    fill_defaults(a)
    assert a.lr == recipe_for("textual-inversion").lr


def test_other_bases_keep_the_generic_defaults():
    from fewshot_personalize.kernels.cli.train import DEFAULT_LR, GENERIC_DEFAULTS, fill_defaults

    a = _train_args("--base", "some/model", "--prompt", "a sks toy")
    assert fill_defaults(a) is None
    assert (a.steps, a.rank, a.batch_size, a.train_text_encoder) == tuple(GENERIC_DEFAULTS[k] for k in
                                                                          ("steps", "rank", "batch_size", "train_text_encoder"))
    assert a.unet_targets == "to_q,to_k,to_v,to_out.0"  # attention only: DreamBooth-LoRA's usual choice
    assert a.lr == DEFAULT_LR["dreambooth-lora"] and a.text_lr is None

    a = _train_args("--base", "some/model", "--method", "ed-lora")  # Mix-of-Show's rates per part
    fill_defaults(a)
    assert (a.lr, a.text_lr, a.embedding_lr, a.train_text_encoder) == (1e-4, 1e-5, 1e-3, True)


def test_train_reports_the_vae_round_trip(tiny_sd, image_folder, tmp_path, capsys):
    code, out, _ = _run_main(capsys, "train", "--base", tiny_sd, "--images", str(image_folder), "--prompt",
                             "a sks toy", "--steps", "1", "--rank", "1", "--out", str(tmp_path / "a.safetensors"))
    assert code == 0
    assert "VAE round trip of the" in out and "fine detail kept" in out


def test_train_every_layer_writes_conv_loras_and_refuses_all_mixed_with_names(tiny_sd, image_folder, tmp_path, capsys):
    from fewshot_personalize.kernels.formats.lora_file import load_lora_file

    out = tmp_path / "all.safetensors"
    code, _, _ = _run_main(capsys, "train", "--base", tiny_sd, "--images", str(image_folder), "--prompt", "a sks toy",
                           "--steps", "1", "--rank", "2", "--unet-targets", "all", "--dtype", "fp32", "--out", str(out))
    assert code == 0
    weights, _ = load_lora_file(out)
    convs = [k for k, w in weights.items() if w.down.ndim == 4]
    assert "lora_unet_conv_in" in convs and any("resnets" in k for k in convs)
    assert "lora_unet_time_embedding_linear_1" in weights
    code, _, err = _run_main(capsys, "train", "--base", tiny_sd, "--images", str(image_folder), "--prompt", "a sks toy",
                             "--steps", "1", "--unet-targets", "all,to_q", "--out", str(tmp_path / "b.safetensors"))
    assert code == 2 and "'all' already means every layer" in err
    assert not (tmp_path / "b.safetensors").exists()
