"""``train``: any method on a diffusers model (or the demo model), written to adapter files."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from ..adapters.lora import UNET_TARGETS
from ..core.errors import UserInputError
from ..core.round_trip import describe as describe_round_trip
from ..engine.captions import captions
from ..engine.config import TrainConfig
from ..methods import (METHODS, CatVersion, CatVersionSettings, DreamBoothLora, EdLora, EdLoraSettings, LoraSettings,
                       PivotalSettings, PivotalTuning, TextualInversion, TextualInversionSettings)
from ..methods.catversion import parse_layer_spec
from .augment import augmentation_notes, load_backgrounds, settings_from_args
from .common import base_name, resolve_base

#: learning rate when --lr is not given: LoRA as diffusers' DreamBooth-LoRA recipes; TI as A1111/kohya practice;
#: CatVersion as the paper's effective rate (5e-3 × batch 2); ED-LoRA's UNet LoRA as Mix-of-Show
DEFAULT_LR = {"dreambooth-lora": 1e-4, "pivotal": 1e-4, "textual-inversion": 5e-3, "catversion": 1e-2, "ed-lora": 1e-4}
#: ED-LoRA's other rates when not given (Mix-of-Show: embeddings 1e-3, text-encoder LoRA 1e-5)
EDLORA_EMBEDDING_LR, EDLORA_TEXT_LR = 1e-3, 1e-5
DEFAULT_EMBEDDING_LR = 5e-3
#: the other flags the user may leave out (None in the parser), for any base model but the demo model
GENERIC_DEFAULTS = {"steps": 400, "rank": 4, "batch_size": 1, "train_text_encoder": False,
                    "unet_targets": ",".join(UNET_TARGETS)}


def fill_defaults(a) -> str | None:
    """Fill the flags left out. With ``--base demo`` they come from the benchmark's recipe for the method (the
    settings README's demo numbers were measured with; real SD models want far gentler ones), and the note
    returned says so; otherwise from :data:`GENERIC_DEFAULTS` / :data:`DEFAULT_LR`."""
    defaults = dict(GENERIC_DEFAULTS, lr=DEFAULT_LR[a.method], embedding_lr=DEFAULT_EMBEDDING_LR)
    if a.method == EdLora.name:
        defaults.update(embedding_lr=EDLORA_EMBEDDING_LR, text_lr=EDLORA_TEXT_LR, train_text_encoder=True)
    note = None
    if a.base == "demo":
        from ..demo.experiment import recipe_for

        r = recipe_for(a.method)
        defaults.update(steps=r.steps, rank=r.rank, batch_size=r.batch_size, train_text_encoder=r.text, lr=r.lr,
                        embedding_lr=r.embedding_lr, unet_targets=",".join(r.unet_targets))
        if r.text:
            defaults["text_lr"] = r.text_lr
        if r.prior and a.class_prompt and not a.class_images:
            defaults["num_class_images"] = r.n_class
        relevant = {"steps", "batch_size", "lr", "num_class_images"}
        if METHODS[a.method].uses_prior:  # the LoRA methods
            relevant |= {"rank", "train_text_encoder", "text_lr", "unet_targets"}
        if a.method in (PivotalTuning.name, EdLora.name):
            relevant.add("embedding_lr")
        taken = {k: v for k, v in defaults.items() if k in relevant and getattr(a, k, None) is None}
        note = ("--base demo: the benchmark's " + a.method + " recipe for the flags left out ("
                + ", ".join(f"{k.replace('_', '-')} {v}" for k, v in taken.items()) + ")")
        if r.prior and not a.class_prompt:
            note += '; the recipe uses prior preservation: add --class-prompt "a <class word>"'
    for k, v in defaults.items():
        if getattr(a, k, None) is None:
            setattr(a, k, v)
    return note


def build_method(a):
    """The method object of the command line's flags (settings are validated here, before any model loads)."""
    lora = lambda: LoraSettings(rank=a.rank, alpha=a.alpha, train_text_encoder=a.train_text_encoder,  # noqa: E731
                                text_lr=a.text_lr,
                                unet_targets=tuple(s.strip() for s in a.unet_targets.split(",") if s.strip()))
    ti = lambda lr=None: TextualInversionSettings(token=a.token, init_word=a.init_word,  # noqa: E731
                                                  num_vectors=a.num_vectors, lr=lr)
    if a.method == DreamBoothLora.name:
        return DreamBoothLora(lora())
    if a.method == TextualInversion.name:
        return TextualInversion(ti())
    if a.method == CatVersion.name:
        return CatVersion(CatVersionSettings(layers=parse_layer_spec(a.catversion_layers), num_tokens=a.catversion_tokens))
    if a.method == EdLora.name:
        settings = dataclasses.replace(lora(), train_text_encoder=True)
        return EdLora(EdLoraSettings(token=a.token, init_word=a.init_word, lora=settings, embedding_lr=a.embedding_lr))
    return PivotalTuning(PivotalSettings(lora=lora(), embedding=ti(a.embedding_lr)))


def instance_prompts(a) -> tuple[str, ...]:
    if a.prompt is not None:
        return (a.prompt,)
    if a.method == DreamBoothLora.name:
        raise UserInputError('dreambooth-lora needs --prompt with a rare identifier, e.g. --prompt "a sks toy"')
    subject = a.init_word if a.method == CatVersion.name else a.token
    return captions(a.templates, subject)


def output_paths(out: Path, method: str) -> dict[str, Path]:
    """Where each part goes: the main file is --out; pivotal adds its two parts beside it."""
    paths = {"main": out}
    if method == PivotalTuning.name:
        stem = str(out.with_suffix(""))
        paths.update(lora=Path(stem + "-lora.safetensors"), embedding=Path(stem + "-embedding.safetensors"))
    return paths


def cmd_train(a) -> int:
    """Train and write the adapter file(s). Under ``accelerate launch --num_processes N`` every process runs this:
    ``--batch-size`` stays the global batch (each process trains batch/N of it, so the result is one process's at
    the same flags), class images are generated by all of them in turn, and only the main process prints, shows
    progress and writes files (engine/distributed.py)."""
    from tqdm import tqdm

    from ..backends.diffusers import DiffusersDenoiser, DiffusersTextEncoder, load_pipeline, native_resolution
    from ..backends.diffusers.class_images import count_images, default_cache_dir, ensure_class_images
    from ..backends.diffusers.generate import use_sampler
    from ..core.devices import default_device
    from ..core.images import list_images, load_image_folder, load_masked_folder
    from ..engine.data import TrainData
    from ..engine.distributed import launched
    from ..engine.loop import Trainer
    from ..formats.safetensors_io import atomic_save, check_output_path

    procs = launched(a.device)
    say = print if procs.is_main else (lambda *args, **kw: None)
    note = fill_defaults(a)
    if note:
        say(f"note: {note}")
    method = build_method(a)
    # validated before the model loads; resolution 8 stands in for the model's native size until then
    cfg = TrainConfig(instance_prompts=instance_prompts(a), class_prompt=a.class_prompt, prior_weight=a.prior_weight,
                      steps=a.steps, batch_size=a.batch_size, grad_accum=a.grad_accum,
                      lr=a.lr, lr_schedule=a.lr_schedule,
                      warmup_steps=a.warmup_steps, snr_gamma=a.snr_gamma, noise_offset=a.noise_offset,
                      random_flip=a.flip, gradient_checkpointing=a.gradient_checkpointing, resolution=a.resolution or 8,
                      seed=a.seed, checkpoint_every=a.checkpoint_every, dtype=a.dtype,
                      background_loss_weight=a.background_weight, augment=settings_from_args(a))
    method.check_prompts(cfg.instance_prompts)
    if procs.num > 1:
        local = procs.local_batch(cfg.batch_size)  # refuses a batch that does not split evenly
        say(f"note: {procs.num} processes ({procs.device}), each trains {local} of every batch of {cfg.batch_size}")
    if (a.class_prompt or a.class_images or a.num_class_images) and not METHODS[a.method].uses_prior:
        raise UserInputError(f"{a.method} trains no denoiser weights, so prior preservation does not apply: "
                             "leave out --class-prompt / --class-images / --num-class-images")
    paths = {part: check_output_path(p, overwrite=a.overwrite or a.resume)
             for part, p in output_paths(Path(a.out), a.method).items()}
    out = paths["main"]
    if a.num_class_images is not None and a.num_class_images < 1:
        raise UserInputError(f"--num-class-images must be at least 1, got {a.num_class_images}")
    if (a.class_images or a.num_class_images) and not a.class_prompt:
        raise UserInputError("class images need a class prompt (--class-prompt \"a toy\")")
    list_images(a.images)  # fail fast on a missing/empty folder, before loading the model
    if a.backgrounds:
        list_images(a.backgrounds)
    device = procs.device or a.device or default_device()
    pipe = load_pipeline(resolve_base(a.base), device)
    cfg = dataclasses.replace(cfg, resolution=a.resolution or native_resolution(pipe))
    denoiser, text = DiffusersDenoiser(pipe), DiffusersTextEncoder(pipe)
    method.preflight(denoiser, text)  # rank, layers, placeholder: refused before any slow work
    instance, masks, notes = load_masked_folder(a.images, cfg.resolution)
    for note in notes:
        say(f"note: {note}")
    if masks is not None:
        say(f"using the masks of {a.images} (loss outside the subject weighted {cfg.background_loss_weight})")
    backgrounds = load_backgrounds(a, cfg.resolution)
    if cfg.augment is not None:
        for note in augmentation_notes(cfg.augment, masks, backgrounds):
            say(f"note: {note}")

    class_pixels = None
    if a.class_prompt:
        folder = a.class_images
        if a.num_class_images or not folder:
            num = a.num_class_images or 100
            folder = folder or str(default_cache_dir(resolve_base(a.base), a.class_prompt, cfg.resolution))
            use_sampler(pipe, "dpm")
            have = count_images(Path(folder))
            procs.wait()  # every process counted the images there before any adds one; then each makes its share

            share = len(range(have, max(have, num))[procs.index::procs.num])

            def make() -> None:
                with tqdm(total=share, desc="class images", unit="img", leave=False, disable=not procs.is_main) as bar:
                    ensure_class_images(pipe, a.class_prompt, folder, num, seed=a.seed, resolution=cfg.resolution,
                                        on_image=lambda i, n: bar.update(1), have=have,
                                        part=(procs.index, procs.num))
            procs.together(make, "generating class images")
        class_pixels = load_image_folder(folder, cfg.resolution)
        if a.num_class_images:
            class_pixels = class_pixels[: a.num_class_images]

    ckpt = str(out.with_suffix("")) + ".checkpoint.safetensors"
    data = TrainData(instance, class_pixels, masks, backgrounds)
    with Trainer(denoiser, text, method, data, cfg, device=device, processes=procs) as trainer:
        if procs.is_main:
            print(describe_round_trip(trainer.vae_round_trip()))
        bar = tqdm(total=cfg.steps, desc=f"train {a.method}", unit="step", disable=not procs.is_main)
        if a.resume and os.path.exists(ckpt):
            bar.set_description(f"train {a.method} (resumed)")

        def on_step(step: int, total: int, loss: float) -> None:
            bar.n = step
            bar.set_postfix(loss=f"{loss:.4f}")
            bar.refresh()

        try:
            result = trainer.train(on_step=on_step, checkpoint_path=ckpt, resume=a.resume)
        finally:
            bar.close()
        artifacts = trainer.export(base_model=base_name(a.base), final_loss=f"{result.losses[-1]:.6f}",
                                   trainer="cli")
    written = []

    def write() -> None:
        for part, artifact in artifacts.items():
            path = paths["main"] if len(artifacts) == 1 or part == "pivotal" else paths[part]
            atomic_save(artifact.tensors, path, artifact.metadata, overwrite=a.overwrite or a.resume)
            written.append(str(path))
        if os.path.exists(ckpt):
            os.unlink(ckpt)
    procs.on_main(write, "writing the adapter")  # the others wait for the files
    say(f"trained {result.steps} steps of {a.method} in {result.seconds:.1f} s "
          f"({result.seconds / max(1, result.steps):.3f} s/step), final loss {result.final_loss()} → {', '.join(written)}")
    return 0
