"""The augmentation as it travels between nodes (socket ``FSP_AUGMENTATION``): settings plus optional background
images, and how a trainer node turns it into the engine's inputs."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from comfy_api.latest import io

from ...kernels.augment.settings import AugmentSettings
from .images import images_to_training

AugmentSocket = io.Custom("FSP_AUGMENTATION")


@dataclass(frozen=True)
class Augmentation:
    """What the Augmentation node outputs: ``settings`` and the user's ``backgrounds`` (ComfyUI IMAGE) or None."""

    settings: AugmentSettings
    backgrounds: torch.Tensor | None = None


def augmentation_input() -> io.Input:
    return AugmentSocket.Input("augmentation", optional=True,
                               tooltip="Optional augmentation (Augmentation node): every step sees a new view of the "
                                       "photos (rescale, rotation, light, backgrounds, caption tags), so a few photos "
                                       "are not memorised with their surroundings.")


def augmentation_parts(augmentation, resolution: int, has_masks: bool, notes: list[str]
                       ) -> tuple[AugmentSettings | None, torch.Tensor | None]:
    """(settings, backgrounds [K,3,R,R] in [-1,1]) of the trainer's ``augmentation`` input, with notes on how it
    meets the data."""
    aug = augmentation[0] if isinstance(augmentation, list) else augmentation
    if aug is None:
        return None, None
    backgrounds = images_to_training([aug.backgrounds], resolution) if aug.backgrounds is not None else None
    notes.append(f"augmentation: {aug.settings.describe()}")
    if aug.settings.background and not has_masks:
        notes.append("no subject masks connected: backgrounds are not replaced")
    return aug.settings, backgrounds
