"""Training with augmentation (engine/augmented.py) on tiny models: per-step views and a cached pool, resume stays
bit-identical, captions reach the text encoder, the valid region weights the loss, every method takes it."""


import pytest
import torch

from fewshot_personalize.kernels.augment import AugmentSettings, preset
from fewshot_personalize.kernels.backends.diffusers import DiffusersDenoiser, DiffusersTextEncoder, load_pipeline
from fewshot_personalize.kernels.core.errors import TrainingInterrupted, UserInputError
from fewshot_personalize.kernels.engine.config import TrainConfig
from fewshot_personalize.kernels.engine.data import TrainData
from fewshot_personalize.kernels.engine.loop import Trainer
from fewshot_personalize.kernels.methods import (CatVersion, CatVersionSettings, DreamBoothLora, LoraSettings,
                                                 TextualInversion, TextualInversionSettings)

TAGGED = preset("strong", scale_min=0.3, scale_max=1.5)


def _data(n=3, m=4, res=32, masks=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    mk = None
    if masks:
        mk = torch.zeros(n, 1, res, res)
        mk[..., 6:26, 8:24] = 1
    return TrainData(torch.rand(n, 3, res, res, generator=g) * 2 - 1, torch.rand(m, 3, res, res, generator=g) * 2 - 1, mk)


def _trainer(base, method=None, data=None, **kw):
    pipe = load_pipeline(base)
    kw = {"instance_prompts": "a sks toy", "class_prompt": "a toy", "steps": 6, "resolution": 32, "lr": 1e-3,
          "augment": TAGGED, **kw}
    method = method or DreamBoothLora(LoraSettings(train_text_encoder=True))
    return Trainer(DiffusersDenoiser(pipe), DiffusersTextEncoder(pipe), method, data or _data(), TrainConfig(**kw))


def _state(trainer):
    return {n: p.detach().clone() for n, p in trainer.params.items()}


@pytest.mark.parametrize("views", [0, 3])
def test_interrupted_and_resumed_run_ends_identical(tiny_sd, tmp_path, views):
    kw = dict(steps=7, grad_accum=2, batch_size=2, augment=AugmentSettings(**{**TAGGED.__dict__, "views": views}))
    full = _trainer(tiny_sd, **kw)
    full_losses = full.train().losses
    ckpt = str(tmp_path / "run.checkpoint.safetensors")

    def stop_at_3(step, total, loss):
        if step == 3:
            raise KeyboardInterrupt

    with pytest.raises(TrainingInterrupted):
        _trainer(tiny_sd, **kw).train(on_step=stop_at_3, checkpoint_path=ckpt)
    resumed = _trainer(tiny_sd, **kw)
    assert resumed.train(checkpoint_path=ckpt, resume=True).losses == full_losses
    a, b = _state(full), _state(resumed)
    assert all(torch.equal(a[n], b[n]) for n in a)


def test_augmentation_changes_training_and_the_fingerprint(tiny_sd, tmp_path):
    plain = _trainer(tiny_sd, augment=None)
    aug = _trainer(tiny_sd)
    assert plain.fingerprint != aug.fingerprint
    assert plain.train().losses != aug.train().losses
    ckpt = str(tmp_path / "c.safetensors")
    t = _trainer(tiny_sd, steps=4, checkpoint_every=2)
    t.cfg.steps = 3
    t.train(checkpoint_path=ckpt)
    with pytest.raises(UserInputError, match="other training settings"):
        _trainer(tiny_sd, steps=4, checkpoint_every=2, augment=preset("light")).train(checkpoint_path=ckpt, resume=True)


def test_tagged_captions_reach_the_text_encoder(tiny_sd):
    trainer = _trainer(tiny_sd, steps=8, batch_size=2, augment=preset("custom-diffusion", scale_min=0.3, scale_max=1.5))
    seen = []
    encode = trainer.text_encoder.encode

    def spy(prompts, *a, **kw):
        seen.extend(prompts)
        return encode(prompts, *a, **kw)

    trainer.text_encoder.encode = spy
    trainer.train()
    tags = {p.split(", ")[-1] for p in seen if p.startswith("a sks toy, ")}
    assert tags & {"far away", "very small"} and tags & {"zoomed in", "close up"}
    assert "a toy" in seen  # the class prompt is never tagged


def test_frozen_text_encodes_each_distinct_caption_once(tiny_sd):
    trainer = _trainer(tiny_sd, method=DreamBoothLora(LoraSettings()), steps=10, batch_size=2)
    calls = []
    encode = trainer.text_encoder.encode
    trainer.text_encoder.encode = lambda prompts, *a, **kw: calls.append(list(prompts)) or encode(prompts, *a, **kw)
    trainer.train()
    flat = [p for c in calls for p in c]
    assert len(flat) == len(set(flat)) and len(flat) >= 2


def test_loss_weight_is_zero_off_the_shrunk_photo(tiny_sd):
    trainer = _trainer(tiny_sd, augment=AugmentSettings(flip=0.0, rescale=1.0, scale_min=0.4, scale_max=0.5),
                       class_prompt=None, data=TrainData(_data().instance))
    latents, weight, captions = trainer.augmented.sample(torch.tensor([0, 1, 2]), ["a sks toy"] * 3, step=0, micro=0)
    assert weight.shape[-2:] == latents.shape[-2:] and weight.shape[1] == 1
    share = weight.flatten(1).mean(1)
    assert ((share > 0.1) & (share < 0.4)).all()  # about scale² of the frame
    assert all(c.endswith(("far away", "very small")) for c in captions)


def test_pool_encodes_once_and_draws_from_it(tiny_sd):
    trainer = _trainer(tiny_sd, augment=AugmentSettings(**{**TAGGED.__dict__, "views": 4}))
    count = []
    enc = trainer.denoiser.encode_images
    trainer.denoiser.encode_images = lambda x: count.append(x.shape[0]) or enc(x)
    trainer.train()
    assert count == [] and len(trainer.augmented.pool) == 4


@pytest.mark.parametrize("kind", ["textual-inversion", "catversion"])
def test_text_methods_train_with_augmentation(tiny_sd, kind):
    if kind == "textual-inversion":
        method, prompt = TextualInversion(TextualInversionSettings(token="<sks>", init_word="toy")), "a photo of <sks>"
    else:
        method, prompt = CatVersion(CatVersionSettings(num_tokens=2)), "a photo of a toy"
    d = _data()
    trainer = _trainer(tiny_sd, method=method, instance_prompts=prompt, class_prompt=None,
                       data=TrainData(d.instance, None, d.masks))
    before = _state(trainer)
    result = trainer.train()
    assert all(torch.isfinite(torch.tensor(result.losses)))
    assert any(not torch.equal(before[n], p) for n, p in trainer.params.items())


def test_round_trip_report_without_a_latent_cache(tiny_sd):
    report = _trainer(tiny_sd).vae_round_trip()
    assert report["psnr_db"] > 0


def test_backgrounds_of_another_count_and_empty_sets(tiny_sd):
    d = _data()
    with pytest.raises(UserInputError, match="background set is empty"):
        TrainData(d.instance, None, d.masks, torch.zeros(0, 3, 32, 32))
    with pytest.raises(UserInputError, match="2 masks for 3 images"):
        TrainData(d.instance, None, d.masks[:2])
    trainer = _trainer(tiny_sd, class_prompt=None, data=TrainData(d.instance, None, d.masks, torch.zeros(5, 3, 48, 40)))
    assert all(torch.isfinite(torch.tensor(trainer.train().losses)))


def test_training_views_are_the_views_training_sees(tiny_sd):
    """``training_views`` (no model needed: the augment command and the preview node) draws exactly the pixels the
    loop encodes and the captions it conditions on."""
    from fewshot_personalize.kernels.engine.augmented import training_views

    trainer = _trainer(tiny_sd, steps=3, batch_size=2, grad_accum=2, class_prompt=None,
                       data=TrainData(_data().instance, None, _data().masks))
    encoded, captions = [], []
    enc = trainer.denoiser.encode_images
    trainer.denoiser.encode_images = lambda x: encoded.append(x.clone()) or enc(x)
    orig = trainer._caption_conditioning
    trainer._caption_conditioning = lambda c: captions.extend(c) or orig(c)
    trainer.train()
    preview = training_views(trainer.data, trainer.cfg, 12)
    assert torch.equal(torch.cat(encoded), torch.stack([p for p, _, _, _ in preview]))
    assert captions == [c for _, _, _, c in preview]


def test_pool_previews_match_the_pool_training_draws(tiny_sd):
    """With a cached pool, training_views shows the pool entries and captions the loop picks."""
    from fewshot_personalize.kernels.engine.augmented import AugmentedInstances, training_views
    from fewshot_personalize.kernels.engine.data import step_generator
    from fewshot_personalize.kernels.engine.augmented import instance_draw

    aug = AugmentSettings(**{**TAGGED.__dict__, "views": 3})
    trainer = _trainer(tiny_sd, steps=2, batch_size=2, augment=aug, class_prompt=None,
                       data=TrainData(_data().instance, None, _data().masks))
    assert "mean" in trainer.augmented.pool[0] and trainer.augmented.pool_views is None
    preview = training_views(trainer.data, trainer.cfg, 4)
    for step in range(2):
        idx, base = instance_draw(trainer.cfg, 3, step, 0, step_generator(trainer.cfg.seed, step, 0))
        _, _, captions = trainer.augmented.sample(idx, base, step, 0)
        assert captions == [c for _, _, _, c in preview[2 * step:2 * step + 2]]
    previewer = AugmentedInstances(trainer.data, trainer.cfg)
    assert [float(s) for e in previewer.pool for s in e["scales"]] == \
        [float(s) for e in trainer.augmented.pool for s in e["scales"]]
