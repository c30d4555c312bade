"""The demo model and the demo pipeline: loads, samples, a CI-sized run of `demo`, a smoke run of pretraining."""

import json

import pytest
import torch

from fewshot_personalize.kernels.cli import main
from fewshot_personalize.kernels.backends.diffusers import detect_family, load_pipeline
from fewshot_personalize.kernels.demo.model import MODEL_DIR, RESOLUTION

needs_demo = pytest.mark.skipif(not (MODEL_DIR / "model_index.json").is_file(),
                                reason="demo model weights not built (python -m fewshot_personalize.kernels.demo.pretrain)")


@needs_demo
def test_demo_model_loads_and_samples():
    from fewshot_personalize.kernels.backends.diffusers.generate import generate_images

    pipe = load_pipeline(str(MODEL_DIR))
    assert detect_family(pipe) == "sd1"
    tok = pipe.tokenizer
    for word in ("sks", "toy", "beach"):
        assert len(tok(word, add_special_tokens=False).input_ids) == 1, word  # identifiers are single rare tokens
    a = generate_images(pipe, "a red ball on the beach", n=1, steps=4, seed=0, guidance=4.0)[0]
    b = generate_images(pipe, "a red ball on the beach", n=1, steps=4, seed=0, guidance=4.0)[0]
    assert a.size == (RESOLUTION, RESOLUTION) and a.tobytes() == b.tobytes()


@needs_demo
def test_vae_round_trip_keeps_world_renders_close():
    import numpy as np

    from fewshot_personalize.kernels.demo import world
    from fewshot_personalize.kernels.demo.vae_quality import round_trip

    rng = np.random.default_rng(5)
    images = [world.render(world.sample_scene(rng, n_objects=1))[0] for _ in range(4)]
    back = round_trip(load_pipeline(str(MODEL_DIR)).vae, images)
    assert [im.size for im in back] == [im.size for im in images]
    error = [np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32)).mean() / 255 for a, b in zip(back, images)]
    swapped = [np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32)).mean() / 255
               for a, b in zip(back, images[1:] + images[:1])]
    assert max(error) < 0.08 and max(error) < min(swapped) / 2, (error, swapped)


@needs_demo
def test_demo_command_ci_sized(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--steps", "3"]) == 0
    printed = capsys.readouterr().out
    for name in ("grid.png", "loss.png", "metrics.json", "checker_toy.safetensors"):
        assert (out / name).is_file() and str(out / name) in printed, name
    m = json.loads((out / "metrics.json").read_text())
    assert m["steps"] == 3 and 0 <= m["after"]["subject_fidelity"] <= 1
    assert main(["demo", "--out", str(out), "--steps", "3"]) == 2  # refuses to overwrite without --overwrite


@needs_demo
@pytest.mark.parametrize("method,expected", [("textual-inversion", "a <sks> toy on the beach"),
                                             ("catversion", "a toy on the beach"), ("ed-lora", "a <sks> on the beach")])
def test_demo_command_other_methods_ci_sized(method, expected, tmp_path, capsys):
    from safetensors import safe_open

    from fewshot_personalize.kernels.demo.experiment import recipe_for

    out = tmp_path / method
    assert main(["demo", "--method", method, "--out", str(out), "--steps", "2"]) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["steps"] == 2 and m["method"] == recipe_for(method).name
    with safe_open(str(out / "checker_toy.safetensors"), "pt") as f:
        assert f.metadata()["fsp.method"] == method
    assert expected in m["prompts"]


TINY = dict(n_images=48, threads=2, measure=False)


def test_pretraining_smoke(tmp_path):
    from fewshot_personalize.kernels.demo.model import DEFAULT_SCHEDULE
    from fewshot_personalize.kernels.demo.pretrain import pretrain

    first = pretrain(tmp_path / "m", work_dir=tmp_path / "w", vae_minutes=0.01, unet_minutes=0, **TINY)
    assert first["vae"]["steps"] >= 1 and first["unet"]["steps"] == 0  # stop after the VAE, for a look at it
    assert first["sessions"][0]["schedule"] == DEFAULT_SCHEDULE  # the default, recorded per session
    vae_steps, more = first["vae"]["steps"], first["vae"]["done_s"] / 60 + 0.02
    rec = pretrain(tmp_path / "m", work_dir=tmp_path / "w", vae_minutes=more, unet_minutes=0.02, **TINY)
    assert rec["vae"]["steps"] > vae_steps  # the VAE trained on: the UNet had not started
    assert rec["unet"]["steps"] >= 1 and rec["latent_scaling_factor"] > 0
    check = rec["vae"]["held_out_reconstruction"]
    assert 0 < check["mse"] < 10 and check["images"] > 0 and check["object_mse"] > 0
    pipe = load_pipeline(str(tmp_path / "m"))
    assert pipe.vae.config.scaling_factor == pytest.approx(rec["latent_scaling_factor"])
    assert json.loads((tmp_path / "m" / "pretrain_log.json").read_text())["settings"]["seed"] == 0
    assert torch.isfinite(next(pipe.unet.parameters())).all()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m", "w"]  # no staging folder left behind
    assert not any("_name_or_path" in json.loads(c.read_text()) for c in (tmp_path / "m").glob("*/config.json"))


def test_pretraining_resumes_after_an_interruption_and_extends_a_finished_run(tmp_path, monkeypatch):
    from safetensors.torch import load_file

    from fewshot_personalize.kernels.demo import pretrain as P
    from fewshot_personalize.kernels.demo import unet_training

    real, calls = unet_training.lr_factor, []

    def stop_after_three(*a, **kw):
        calls.append(1)
        if len(calls) > 3:
            raise KeyboardInterrupt
        return real(*a, **kw)

    monkeypatch.setattr(unet_training, "lr_factor", stop_after_three)
    with pytest.raises(KeyboardInterrupt):  # killed in the UNet stage, after a checkpoint at every step
        P.pretrain(tmp_path / "m", work_dir=tmp_path / "w", vae_minutes=0.02, unet_minutes=600, checkpoint_every_s=0,
                   **TINY)
    assert not (tmp_path / "m").exists()
    progress = json.loads((tmp_path / "w" / "progress.json").read_text())
    assert progress["unet"]["steps"] == 3 and progress["vae"]["steps"] >= 1
    vae_state = load_file(str(tmp_path / "w" / "vae_state.safetensors"))

    monkeypatch.setattr(unet_training, "lr_factor", real)
    more = progress["unet"]["done_s"] / 60 + 0.03  # a budget beyond what the interrupted session spent
    rec = P.pretrain(tmp_path / "m", work_dir=tmp_path / "w", vae_minutes=0.02, unet_minutes=more, **TINY)
    assert len(rec["sessions"]) == 2 and rec["unet"]["steps"] > 3
    assert "render_s" not in rec["sessions"][1]  # the latents were cached: nothing re-rendered
    assert all(torch.equal(vae_state[k], v) for k, v in load_file(str(tmp_path / "w" / "vae_state.safetensors")).items())
    unet_before = load_file(str(tmp_path / "m" / "unet" / "diffusion_pytorch_model.safetensors"))

    more = rec["unet"]["done_s"] / 60 + 0.03
    rec2 = P.pretrain(tmp_path / "m", work_dir=tmp_path / "w", vae_minutes=0.02, unet_minutes=more, **TINY)
    assert rec2["unet"]["steps"] > rec["unet"]["steps"] and rec2["unet"]["done_s"] >= more * 60
    unet_after = load_file(str(tmp_path / "m" / "unet" / "diffusion_pytorch_model.safetensors"))
    assert any(not torch.equal(unet_before[k], unet_after[k]) for k in unet_before)

    with pytest.raises(ValueError, match="other settings.*n_images"):
        P.pretrain(tmp_path / "m", work_dir=tmp_path / "w", vae_minutes=0.02, unet_minutes=more,
                   **(TINY | {"n_images": 40}))
    with pytest.raises(ValueError, match="VAE stage .* is finished"):
        P.pretrain(tmp_path / "m", work_dir=tmp_path / "w", vae_minutes=5, unet_minutes=more, **TINY)


def test_a_rewarmed_extension_starts_its_own_schedule_and_keeps_it(tmp_path, monkeypatch):
    """--rewarm F on an extended budget: the extension's first step warms up afresh to F × the peak (not the stretched
    cooldown's tail), the stage records where the extension began, and a later session of the same extension keeps
    that record."""
    from fewshot_personalize.kernels.demo import pretrain as P
    from fewshot_personalize.kernels.demo import unet_training

    first = P.pretrain(tmp_path / "m", work_dir=tmp_path / "w", vae_minutes=0.01, unet_minutes=0.01, **TINY)
    real, factors = unet_training.scheduled_factor, []
    monkeypatch.setattr(unet_training, "scheduled_factor", lambda *a, **kw: factors.append(real(*a, **kw)) or factors[-1])
    budget = first["unet"]["done_s"] / 60 + 0.02
    rec = P.pretrain(tmp_path / "m", work_dir=tmp_path / "w", vae_minutes=0.01, unet_minutes=budget, rewarm=0.5,
                     session_minutes=0.01, **TINY)
    assert rec["unet"]["rewarm"] == {"from_s": first["unet"]["done_s"], "from_step": first["unet"]["steps"],
                                     "peak": 0.5, "budget_s": budget * 60}
    assert factors[0] == pytest.approx(0.5 / 100)  # step 1 of a fresh warm-up to half the peak
    again = P.pretrain(tmp_path / "m", work_dir=tmp_path / "w", vae_minutes=0.01, unet_minutes=budget, rewarm=0.5,
                       **TINY)
    assert again["unet"]["rewarm"] == rec["unet"]["rewarm"] and again["finished"]
    with pytest.raises(ValueError, match="rewarm is a share"):
        P.pretrain(tmp_path / "m", work_dir=tmp_path / "w", unet_minutes=budget + 1, rewarm=1.5, **TINY)


def test_pretraining_stops_after_its_session_minutes_and_continues_from_that_folder_elsewhere(tmp_path):
    from safetensors.torch import load_file

    from fewshot_personalize.kernels.demo.pretrain import pretrain

    first = pretrain(tmp_path / "m1", work_dir=tmp_path / "w1", vae_minutes=0.01, unet_minutes=600,
                     session_minutes=0.1, **TINY)
    assert first["finished"] is False and first["unet"]["steps"] >= 1 and first["unet"]["done_s"] < 60
    load_pipeline(str(tmp_path / "m1"))  # the unfinished model is a whole diffusers folder

    # a new machine: no work folder, only the folder written above
    more = first["unet"]["done_s"] / 60 + 0.02
    rec = pretrain(tmp_path / "m2", work_dir=tmp_path / "w2", vae_minutes=0.01, unet_minutes=more,
                   from_dir=tmp_path / "m1", **TINY)
    assert rec["finished"] is True and len(rec["sessions"]) == 2
    assert rec["sessions"][1]["continued_from"] == str(tmp_path / "m1")
    assert rec["vae"]["steps"] == first["vae"]["steps"]  # the VAE stage was done: not trained again
    assert rec["unet"]["steps"] > first["unet"]["steps"]
    assert rec["latent_scaling_factor"] == pytest.approx(first["latent_scaling_factor"], rel=1e-5)  # same latents
    vae1 = load_file(str(tmp_path / "m1" / "vae" / "diffusion_pytorch_model.safetensors"))
    vae2 = load_file(str(tmp_path / "m2" / "vae" / "diffusion_pytorch_model.safetensors"))
    assert all(torch.equal(vae1[k], vae2[k]) for k in vae1)
    unet1 = load_file(str(tmp_path / "m1" / "unet" / "diffusion_pytorch_model.safetensors"))
    unet2 = load_file(str(tmp_path / "m2" / "unet" / "diffusion_pytorch_model.safetensors"))
    assert any(not torch.equal(unet1[k], unet2[k]) for k in unet1)

    with pytest.raises(ValueError, match="other settings.*n_images"):
        pretrain(tmp_path / "m3", work_dir=tmp_path / "w3", from_dir=tmp_path / "m1", **(TINY | {"n_images": 40}))
    with pytest.raises(ValueError, match="no pretrain_log.json"):
        pretrain(tmp_path / "m3", work_dir=tmp_path / "w4", from_dir=tmp_path / "w1", **TINY)


def test_pretraining_continues_from_a_folder_of_the_vae_alone(tmp_path, monkeypatch):
    import shutil

    from safetensors.torch import load_file

    from fewshot_personalize.kernels.demo import pretrain as P
    from fewshot_personalize.kernels.demo.pretrain import pretrain

    starts = []
    real = P.train_vae

    def spy(vae, *a, **kw):
        starts.append({k: v.clone() for k, v in vae.state_dict().items()})
        return real(vae, *a, **kw)

    monkeypatch.setattr(P, "train_vae", spy)

    first = pretrain(tmp_path / "m1", work_dir=tmp_path / "w1", vae_minutes=0.01, unet_minutes=0, **TINY)
    keep = tmp_path / "vae_only"
    keep.mkdir()
    shutil.copytree(tmp_path / "m1" / "vae", keep / "vae")
    shutil.copy(tmp_path / "m1" / "pretrain_log.json", keep)
    more = first["vae"]["done_s"] / 60 + 0.01  # the VAE may still train on: the UNet has not started
    rec = pretrain(tmp_path / "m2", work_dir=tmp_path / "w2", vae_minutes=more, unet_minutes=0, from_dir=keep, **TINY)
    assert rec["vae"]["steps"] > first["vae"]["steps"] and rec["sessions"][1]["continued_from"] == str(keep)
    kept = load_file(str(keep / "vae" / "diffusion_pytorch_model.safetensors"))
    assert all(torch.equal(starts[1][k], kept[k]) for k in kept)  # the second session started from the kept VAE


def test_decoder_stage_fine_tunes_the_decoder_alone_and_resumes(tmp_path):
    """Stage 5 trains only the decoder (encoder, latent scale and UNet stay bit-identical, so the UNet's latent space
    is untouched), records its budget and measurement, and a second run of the same command trains no further."""
    from safetensors.torch import load_file

    from fewshot_personalize.kernels.demo.pretrain import pretrain

    first = pretrain(tmp_path / "m1", work_dir=tmp_path / "w", vae_minutes=0.01, unet_minutes=0.01, **TINY)
    assert "decoder" not in first and first["budget_minutes"]["decoder"] == 0
    rec = pretrain(tmp_path / "m2", work_dir=tmp_path / "w", vae_minutes=0.01, unet_minutes=0.01,
                   decoder_minutes=0.02, **TINY)
    assert rec["finished"] is True and rec["decoder"]["steps"] >= 1 and rec["unet"]["steps"] == first["unet"]["steps"]
    assert rec["decoder"]["lr"] > 0 and rec["decoder"]["held_out_reconstruction"]["images"] > 0
    assert rec["sessions"][-1]["decoder_s"] > 0 and rec["latent_scaling_factor"] == first["latent_scaling_factor"]

    def weights(m, part):
        return load_file(str(tmp_path / m / part / "diffusion_pytorch_model.safetensors"))

    v1, v2 = weights("m1", "vae"), weights("m2", "vae")
    kept = [k for k in v1 if k.startswith(("encoder.", "quant_conv."))]
    tuned = [k for k in v1 if k.startswith(("decoder.", "post_quant_conv."))]
    assert kept and tuned and len(kept) + len(tuned) == len(v1)
    assert all(torch.equal(v1[k], v2[k]) for k in kept)
    assert any(not torch.equal(v1[k], v2[k]) for k in tuned)
    u1, u2 = weights("m1", "unet"), weights("m2", "unet")
    assert all(torch.equal(u1[k], u2[k]) for k in u1)

    again = pretrain(tmp_path / "m3", work_dir=tmp_path / "w", vae_minutes=0.01, unet_minutes=0.01,
                     decoder_minutes=0.02, **TINY)
    assert again["decoder"]["steps"] == rec["decoder"]["steps"]  # budget spent: nothing more
    v3 = weights("m3", "vae")
    assert all(torch.equal(v2[k], v3[k]) for k in v2)  # the fine-tuned decoder is loaded from the work folder

    # a longer budget on patterned scenes (faces and marks): trains on, recorded per session; the encoder stays
    more = pretrain(tmp_path / "m4", work_dir=tmp_path / "w", vae_minutes=0.01, unet_minutes=0.01,
                    decoder_minutes=0.04, decoder_patterns=0.5, decoder_prefer_shape=0.9, **TINY)
    assert more["decoder"]["steps"] > rec["decoder"]["steps"]
    assert more["decoder"]["pattern_share_per_session"][-1] == 0.5 and more["sessions"][-1]["decoder_patterns"] == 0.5
    assert more["sessions"][-1]["decoder_prefer_shape"] == 0.9
    v4 = weights("m4", "vae")
    assert all(torch.equal(v1[k], v4[k]) for k in kept) and any(not torch.equal(v3[k], v4[k]) for k in tuned)
    with pytest.raises(ValueError, match="decoder patterns is a share"):
        pretrain(tmp_path / "m5", work_dir=tmp_path / "w", decoder_patterns=1.5, **TINY)
    with pytest.raises(ValueError, match="decoder prefer shape is a share"):
        pretrain(tmp_path / "m5", work_dir=tmp_path / "w", decoder_patterns=0.5, decoder_prefer_shape=-0.1, **TINY)


def test_world_patterns_teach_the_vocabulary_never_a_concept():
    """add_patterns: share 1 patterns every object with a second colour of its own and never a measured concept's
    combination; share 0 draws nothing from the generator, so flat-world datasets stay what they were."""
    import numpy as np

    from fewshot_personalize.kernels.demo import world
    from fewshot_personalize.kernels.demo.world_patterns import PATTERNS, add_patterns, excluded_combinations

    excluded = excluded_combinations()
    assert ("ball", "stripes", frozenset(("red", "yellow"))) in excluded and len(excluded) == 5
    rng = np.random.default_rng(0)
    patterned = 0
    for _ in range(300):
        scene = world.sample_scene(rng, p_two=0.5)
        patterned += add_patterns(scene, rng, 1.0, excluded)
        for obj in scene.objects:
            assert obj.pattern in PATTERNS and obj.colour2 not in (None, obj.colour)
            assert (obj.cls, obj.pattern, frozenset((obj.colour, obj.colour2))) not in excluded
        world.render(scene, 32)  # every patterned scene renders
    assert patterned >= 300
    a, b = np.random.default_rng(5), np.random.default_rng(5)
    assert add_patterns(world.sample_scene(a), a, 0.0, excluded) == 0
    world.sample_scene(b)
    assert a.uniform() == b.uniform()


def test_shape_bound_patterns_go_on_their_class_only_and_never_make_a_concept():
    """With every pattern allowed, a creature face lands only on toys and an X only on boxes, without a second
    colour, and never in the creature toy's purple or the marked box's orange; two-colour ones as before."""
    import numpy as np

    from fewshot_personalize.kernels.demo import world
    from fewshot_personalize.kernels.demo.world_patterns import (ALL_PATTERNS, SHAPE_PATTERNS, add_patterns,
                                                                 excluded_combinations)

    excluded = excluded_combinations()
    rng = np.random.default_rng(1)
    seen = set()
    for _ in range(400):
        scene = world.sample_scene(rng)
        add_patterns(scene, rng, 1.0, excluded, ALL_PATTERNS)
        for obj in scene.objects:
            seen.add(obj.pattern)
            if obj.pattern in SHAPE_PATTERNS:
                assert obj.cls == SHAPE_PATTERNS[obj.pattern] and obj.colour2 is None
            assert (obj.cls, obj.pattern, frozenset((obj.colour, obj.colour2))) not in excluded
            world.render(scene, 32)  # every drawn combination renders
    assert set(ALL_PATTERNS) <= seen
    # prefer_shape: toys get their face first (unless purple, the creature toy's own colour)
    faces = {p: 0 for p in (0.0, 1.0)}
    for prefer in faces:
        rng = np.random.default_rng(2)
        for _ in range(300):
            scene = world.sample_scene(rng, classes=["toy"], n_objects=1)
            add_patterns(scene, rng, 1.0, excluded, ALL_PATTERNS, prefer_shape=prefer)
            faces[prefer] += scene.objects[0].pattern == "creature"
    assert faces[1.0] > 250 and faces[0.0] < 100, faces


def test_pretraining_patterns_are_a_per_session_setting(tmp_path):
    """--patterns S renders and encodes the UNet's scenes once more with patterned objects, trains on them, and is
    recorded per session; the flat world's latents and the VAE are untouched."""
    import numpy as np

    from fewshot_personalize.kernels.demo.pretrain import pretrain, render_dataset

    flat, _, _ = render_dataset(12, 3)
    again, _, _ = render_dataset(12, 3, pattern_share=0.0)
    some, _, _ = render_dataset(12, 3, pattern_share=1.0)
    assert np.array_equal(flat, again) and not np.array_equal(flat, some)

    first = pretrain(tmp_path / "m", work_dir=tmp_path / "w", vae_minutes=0.01, unet_minutes=0.01, **TINY)
    more = first["unet"]["done_s"] / 60 + 0.02
    rec = pretrain(tmp_path / "m", work_dir=tmp_path / "w", vae_minutes=0.01, unet_minutes=more, patterns=0.5, **TINY)
    assert [s["patterns"] for s in rec["sessions"]] == [0.0, 0.5]
    assert rec["unet"]["steps"] > first["unet"]["steps"] and rec["latent_scaling_factor"] == first["latent_scaling_factor"]
    assert (tmp_path / "w" / "latents_patterns0.5.safetensors").is_file()
    with pytest.raises(ValueError, match="share of objects"):
        pretrain(tmp_path / "m", work_dir=tmp_path / "w", patterns=1.5, **TINY)


def test_pair_patterns_keep_two_object_scenes_flat(tmp_path, monkeypatch):
    """--pair-patterns S: the two-object scenes of a patterned session get share S (0: flat, as in the flat world),
    one-object scenes keep --patterns; the latents are kept apart per pair of shares and the session records S."""
    from fewshot_personalize.kernels.demo import world_patterns
    from fewshot_personalize.kernels.demo.pretrain import pretrain, render_dataset

    real, seen = world_patterns.add_patterns, []

    def spy(scene, rng, share, *args, **kwargs):
        n = real(scene, rng, share, *args, **kwargs)
        seen.append((len(scene.objects), share, n))
        return n

    monkeypatch.setattr(world_patterns, "add_patterns", spy)
    render_dataset(40, 3, pattern_share=1.0, pair_share=0.0)
    assert {(k, share) for k, share, _ in seen} == {(1, 1.0), (2, 0.0)}
    assert all(n == 0 for k, _, n in seen if k == 2) and sum(n for k, _, n in seen if k == 1) > 0
    monkeypatch.setattr(world_patterns, "add_patterns", real)

    first = pretrain(tmp_path / "m", work_dir=tmp_path / "w", vae_minutes=0.01, unet_minutes=0.01, **TINY)
    more = first["unet"]["done_s"] / 60 + 0.02
    rec = pretrain(tmp_path / "m", work_dir=tmp_path / "w", vae_minutes=0.01, unet_minutes=more, patterns=0.5,
                   pair_patterns=0.0, **TINY)
    assert rec["sessions"][-1]["pair_patterns"] == 0.0 and "pair_patterns" not in rec["sessions"][0]
    assert (tmp_path / "w" / "latents_patterns0.5_pairs0.safetensors").is_file()
    assert not (tmp_path / "w" / "latents_patterns0.5.safetensors").exists()
    with pytest.raises(ValueError, match="pair patterns is a share"):
        pretrain(tmp_path / "m", work_dir=tmp_path / "w", patterns=0.5, pair_patterns=2.0, **TINY)


def test_two_objects_share_per_session(tmp_path):
    """--two-objects S: this session's UNet scenes are rendered again with a share S of two-object scenes (flat
    unless --patterns), encoded once into their own latents file, and the session records S; out of 0..1 refused."""
    import json

    from fewshot_personalize.kernels.formats.safetensors_io import load_safetensors
    from fewshot_personalize.kernels.demo import world
    from fewshot_personalize.kernels.demo.pretrain import pretrain

    first = pretrain(tmp_path / "m", work_dir=tmp_path / "w", vae_minutes=0.01, unet_minutes=0.01, **TINY)
    more = first["unet"]["done_s"] / 60 + 0.02
    rec = pretrain(tmp_path / "m", work_dir=tmp_path / "w", vae_minutes=0.01, unet_minutes=more, two_objects=1.0,
                   **TINY)
    assert rec["sessions"][-1]["two_objects"] == 1.0 and "two_objects" not in rec["sessions"][0]
    assert rec["unet"]["steps"] > first["unet"]["steps"]
    _, meta = load_safetensors(tmp_path / "w" / "latents_patterns0_two1.safetensors")
    counts = [len(world.parse_prompt(c)["objects"]) for c in json.loads(meta["captions"])]
    _, flat = load_safetensors(tmp_path / "w" / "latents.safetensors")
    assert set(counts) == {2} and 1 in {len(world.parse_prompt(c)["objects"]) for c in json.loads(flat["captions"])}
    with pytest.raises(ValueError, match="two objects is a share of scenes"):
        pretrain(tmp_path / "m", work_dir=tmp_path / "w", two_objects=1.5, **TINY)


def test_pair_patterns_need_a_patterned_session(tmp_path, capsys):
    """--pair-patterns without --patterns would be ignored (the session's scenes are flat): refused, nothing written."""
    from fewshot_personalize.kernels.demo.pretrain import main, pretrain

    with pytest.raises(ValueError, match="give --patterns above 0"):
        pretrain(tmp_path / "m", work_dir=tmp_path / "w", pair_patterns=0.0, **TINY)
    assert not (tmp_path / "m").exists() and not (tmp_path / "w").exists()
    with pytest.raises(SystemExit) as stop:
        main(["--out", str(tmp_path / "m"), "--work", str(tmp_path / "w"), "--pair-patterns", "0"])
    assert stop.value.code == 2 and "error: pair patterns" in capsys.readouterr().err


def test_pattern_words_name_the_patterns_and_grow_an_older_text_encoder(tmp_path, monkeypatch):
    """--pattern-words: this session's captions name each two-colour pattern ("… with yellow stripes"), in latents
    of their own, recorded per session, refused without --patterns; --from a model whose tokenizer predates the
    pattern nouns grows its text encoder to them (old rows kept by token, new ones added) and trains on."""
    import json

    from safetensors.torch import load_file
    from transformers import CLIPTokenizer

    from fewshot_personalize.kernels.demo import world
    from fewshot_personalize.kernels.demo.pretrain import pretrain
    from fewshot_personalize.kernels.formats.safetensors_io import load_safetensors

    new_words = world.all_words()
    old_words = [w for w in new_words if w not in world.PATTERN_NOUNS.values()]
    monkeypatch.setattr(world, "all_words", lambda: old_words)  # a model of the vocabulary before the nouns
    first = pretrain(tmp_path / "m1", work_dir=tmp_path / "w1", vae_minutes=0.01, unet_minutes=0.01, **TINY)
    monkeypatch.setattr(world, "all_words", lambda: new_words)
    old_vocab = CLIPTokenizer.from_pretrained(str(tmp_path / "m1" / "tokenizer")).get_vocab()
    assert "stripes</w>" not in old_vocab

    more = first["unet"]["done_s"] / 60 + 0.02
    rec = pretrain(tmp_path / "m2", work_dir=tmp_path / "w2", vae_minutes=0.01, unet_minutes=more, patterns=1.0,
                   pattern_words=True, from_dir=tmp_path / "m1", **TINY)
    assert rec["sessions"][-1]["pattern_words"] is True and "pattern_words" not in rec["sessions"][0]
    assert rec["unet"]["steps"] > first["unet"]["steps"]
    _, meta = load_safetensors(tmp_path / "w2" / "latents_patterns1_named.safetensors")
    captions = json.loads(meta["captions"])
    assert any(world.parse_prompt(c)["objects"][0]["pattern"] is not None for c in captions)
    assert all(not world.parse_prompt(c)["unknown"] for c in captions)

    new_vocab = CLIPTokenizer.from_pretrained(str(tmp_path / "m2" / "tokenizer")).get_vocab()
    assert set(old_vocab) < set(new_vocab) and "stripes</w>" in new_vocab
    key = "embeddings.token_embedding.weight"
    before = load_file(str(tmp_path / "m1" / "text_encoder" / "model.safetensors"))[key]
    after = load_file(str(tmp_path / "m2" / "text_encoder" / "model.safetensors"))[key]
    assert after.shape[0] == len(new_vocab) > before.shape[0] == len(old_vocab)
    tokenizer = CLIPTokenizer.from_pretrained(str(tmp_path / "m1" / "tokenizer"))
    used = {t for w in new_words for t in tokenizer.tokenize(w)}  # e.g. "orange" is or|an|g|e</w>
    unused = [t for t in old_vocab if len(t) == 1 and t not in used]  # byte symbols in no caption: rows never move
    assert len(unused) > 100
    torch.testing.assert_close(after[[new_vocab[t] for t in unused]], before[[old_vocab[t] for t in unused]])
    with pytest.raises(ValueError, match="pattern words name the patterns"):
        pretrain(tmp_path / "m3", work_dir=tmp_path / "w3", pattern_words=True, **TINY)
