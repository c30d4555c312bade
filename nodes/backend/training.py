"""What every trainer node shares: list inputs, the training run on clones (progress every step, which is also
ComfyUI's Cancel check), checkpoints in the output folder, and a preview sample."""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Callable

import comfy.model_management
import comfy.sample
import comfy.utils
import folder_paths
import torch
from comfy_api.latest import io

from ...kernels.core.errors import TrainingDiverged, UserInputError
from ...kernels.core.round_trip import describe as describe_round_trip
from ...kernels.engine.config import TrainConfig
from ...kernels.engine.data import TrainData
from ...kernels.engine.loop import Trainer, TrainResult
from ...kernels.engine.method import Artifact, Method
from ...kernels.formats.safetensors_io import safe_join
from .augmentation import augmentation_input, augmentation_parts
from .session import TrainingSession

CHECKPOINT_DIR = "fewshot_checkpoints"
log = logging.getLogger(__name__)


def first(v, default=None):
    """Inputs arrive as lists (trainer nodes read whole lists, so images of different sizes can come in)."""
    if isinstance(v, list):
        return v[0] if v else default
    return default if v is None else v


def checkpoint_path(name: str) -> str:
    folder = os.path.join(folder_paths.get_output_directory(), CHECKPOINT_DIR)
    os.makedirs(folder, exist_ok=True)
    return str(safe_join(folder, f"{name}.safetensors"))


@dataclasses.dataclass(frozen=True)
class Checkpointing:
    """Where a trainer node keeps its resumable state: ``path`` None = no checkpoints."""

    path: str | None = None
    every: int = 0
    resume: bool = False


def checkpoint_inputs() -> list:
    """The optional checkpoint / resume inputs every trainer node has (at the end of its inputs)."""
    return [io.Int.Input("checkpoint_every", default=0, min=0, max=100000, optional=True,
                         tooltip="Save a resumable training checkpoint every N steps (0 = only on Cancel when a name is set)."),
            io.String.Input("checkpoint_name", default="", optional=True,
                            tooltip="Name of the checkpoint file in output/fewshot_checkpoints/ (empty = no checkpoints)."),
            io.Boolean.Input("resume", default=False, optional=True,
                             tooltip="Continue from the checkpoint of this name if it exists (same settings needed).")]


def check_checkpoint_inputs(checkpoint_name=None, resume=None) -> bool | str:
    """``validate_inputs`` part of :func:`checkpoint_inputs`: a plain file name, and one when resuming."""
    name = first(checkpoint_name)
    if isinstance(name, str) and name and (os.sep in name or "/" in name or "\\" in name or name.startswith(".")):
        return f"checkpoint_name {name!r} must be a plain file name"
    if first(resume) is True and isinstance(name, str) and not name.strip():
        return "resume needs a checkpoint_name"
    return True


def checkpointing(checkpoint_every=None, checkpoint_name=None, resume=None) -> Checkpointing:
    """The node's checkpoint inputs as a :class:`Checkpointing` (files in output/fewshot_checkpoints/)."""
    name = (first(checkpoint_name, "") or "").strip()
    if not name:
        if first(resume):
            raise UserInputError("resume needs a checkpoint_name")
        return Checkpointing()
    return Checkpointing(checkpoint_path(name), first(checkpoint_every, 0) or 0, bool(first(resume)))


def run_training(model, clip, vae, method: Method, data: TrainData, cfg: TrainConfig, *,
                 checkpoints: Checkpointing = Checkpointing(), augmentation=None,
                 notes: list[str] | None = None) -> tuple[TrainResult, dict[str, Artifact], str]:
    """Train ``method`` on clones of MODEL/CLIP, through the node's ``augmentation`` input when connected; returns
    (result, exported files, model family). The caller's objects are never changed; the method is detached however
    the run ends (ComfyUI's Cancel included: the last whole step is kept in the checkpoint when one is named)."""
    cfg = dataclasses.replace(cfg, checkpoint_every=checkpoints.every if checkpoints.path else 0)
    settings, backgrounds = augmentation_parts(augmentation, cfg.resolution, data.masks is not None,
                                               notes if notes is not None else [])
    if settings is not None:
        cfg = dataclasses.replace(cfg, augment=settings)
        data = dataclasses.replace(data, backgrounds=backgrounds)
    pbar = comfy.utils.ProgressBar(cfg.steps)

    def on_step(step, total, loss):
        pbar.update_absolute(step, total)
        comfy.model_management.throw_exception_if_processing_interrupted()  # ComfyUI's Cancel

    with torch.inference_mode(False):
        with TrainingSession(model, clip, vae, method.changes_text) as session, \
                Trainer(session.denoiser, session.text_encoder, method, data, cfg,
                        device=session.denoiser.device) as trainer:
            try:
                ceiling = trainer.vae_round_trip()
                log.info(describe_round_trip(ceiling))
                result = trainer.train(on_step=on_step, checkpoint_path=checkpoints.path, resume=checkpoints.resume)
            except TrainingDiverged as e:
                raise ValueError(str(e)) from None
            result.vae_round_trip = ceiling
            artifacts = trainer.export(trainer="comfyui", final_loss=f"{result.losses[-1]:.6f}")
            return result, artifacts, session.denoiser.family


def sample_preview(model, vae, clip, tokens, negative_clip, seed: int, steps: int, size: int,
                   cfg: float = 5.0) -> torch.Tensor:
    """One image (euler, normal schedule) as an IMAGE [1,H,W,3]: ``tokens`` encoded by ``clip`` for the positive
    prompt, an empty prompt encoded by ``negative_clip`` for the negative one."""
    positive = clip.encode_from_tokens_scheduled(tokens)
    negative = negative_clip.encode_from_tokens_scheduled(negative_clip.tokenize(""))
    ds = vae.spacial_compression_encode()
    latent = torch.zeros(1, vae.latent_channels, size // ds, size // ds)
    noise = comfy.sample.prepare_noise(latent, seed)
    samples = comfy.sample.sample(model, noise, steps, cfg, "euler", "normal", positive, negative, latent,
                                  denoise=1.0, disable_pbar=True, seed=seed)
    return vae.decode(samples)


def preview_or_blank(make: Callable[[], torch.Tensor], steps: int) -> torch.Tensor:
    return make() if steps else torch.zeros(1, 64, 64, 3)


def summary(result: TrainResult, what: str) -> str:
    text = f"trained {result.steps} steps in {result.seconds:.1f} s, {what}, final loss {result.final_loss()}"
    if result.vae_round_trip is not None:
        text += "\n" + describe_round_trip(result.vae_round_trip)
    return text


def model_inputs() -> list:
    return [io.Model.Input("model", tooltip="The base model to personalise (e.g. from Load Checkpoint). It is not changed."),
            io.Clip.Input("clip", tooltip="The text encoder of the same checkpoint."),
            io.Vae.Input("vae", tooltip="The VAE of the same checkpoint (encodes the training images)."),
            io.Image.Input("images", tooltip="3-10 photos of the concept (e.g. from Load training images). Several "
                                             "batches of different sizes may be connected; each image is resized "
                                             "(shorter side) and centre-cropped.")]


def run_inputs(steps: int, lr: float) -> list:
    return [io.Int.Input("steps", default=steps, min=1, max=100000, tooltip="Optimizer steps."),
            io.Float.Input("learning_rate", default=lr, min=1e-7, max=1.0, step=1e-5, tooltip="AdamW learning rate."),
            io.Int.Input("resolution", default=512, min=8, max=4096, step=8,
                         tooltip="Training resolution in pixels (multiple of 8); the model's native size is best."),
            io.Int.Input("batch_size", default=1, min=1, max=64, tooltip="Instance images per step."),
            io.Int.Input("seed", default=0, min=0, max=2**31 - 1, control_after_generate=True,
                         tooltip="Seed of all training randomness.")]


def optional_inputs() -> list:
    return [io.Mask.Input("mask", optional=True,
                          tooltip="Optional loss mask (1 = subject): one for all images or one per image. A mask of "
                                  "another size than its image is resized to it."),
            augmentation_input(),
            io.Int.Input("preview_steps", default=20, min=0, max=200, optional=True,
                         tooltip="Sampling steps of the preview image (0 = no preview).")]


def report_outputs(preview_tooltip: str) -> list:
    return [io.Image.Output(display_name="loss_curve", tooltip="Training loss per step."),
            io.Image.Output(display_name="preview", tooltip=preview_tooltip)]


def class_pixels(class_images, class_prompt, resolution: int, notes: list[str]):
    """(class pixels or None, class prompt or None) of the optional class-image inputs; connected images need a
    prompt."""
    from ...kernels.core.errors import UserInputError
    from .images import images_to_training

    prompt = (first(class_prompt, "") or "").strip()
    if not class_images or all(c is None for c in class_images):
        return None, None
    if not prompt:
        raise UserInputError("class images are connected but the class prompt is empty (e.g. 'a photo of a toy')")
    return images_to_training(class_images, resolution, notes), prompt


def instance_pixels(images, mask, resolution: int, notes: list[str]):
    """(pixels [N,3,R,R], masks [N,1,R,R] or None) of the node's IMAGE / MASK list inputs."""
    from .images import images_to_training, masks_to_training

    pixels = images_to_training(images, resolution, notes)
    masks = masks_to_training(mask, images, resolution, notes) if mask and any(m is not None for m in mask) else None
    return pixels, masks
