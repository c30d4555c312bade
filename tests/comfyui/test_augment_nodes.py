"""The Augmentation and Augmentation preview nodes, and every trainer node taking the augmentation input."""

from __future__ import annotations

import os

import pytest
import torch

pytestmark = pytest.mark.comfyui
if not os.environ.get("COMFYUI_PATH"):
    pytest.skip("COMFYUI_PATH is not set: the ComfyUI suite needs a ComfyUI source checkout (v0.3.64 or newer)",
                allow_module_level=True)

RES = 32
CUSTOM = dict(flip=0.5, rescale=1.0, scale_min=0.4, scale_max=1.3, scale_tags=True, rotate=10.0, brightness=0.1,
              contrast=0.1, saturation=0.0, hue=0.0, background=1.0, shuffle_tags=False, keep_tags=1, tag_dropout=0.0,
              caption_dropout=0.0, views=0)


def _augmentation(preset="custom", backgrounds=None, **kw):
    from fewshot_personalize.nodes.augment import AugmentationNode

    return AugmentationNode.execute(preset, **{**CUSTOM, **kw}, backgrounds=backgrounds).args[0]


def _demo_concept(n=3):
    from fewshot_personalize.nodes.training_images import LoadDemoConcept

    images, masks, _, prompt = LoadDemoConcept.execute("checker_toy", n, 0).args
    return images, masks, prompt


def test_preview_shows_exactly_the_views_of_training():
    from fewshot_personalize.kernels.engine.augmented import training_views
    from fewshot_personalize.kernels.engine.config import TrainConfig
    from fewshot_personalize.kernels.engine.data import TrainData
    from fewshot_personalize.nodes.augment import AugmentationPreview

    images, masks, prompt = _demo_concept()
    aug = _augmentation()
    with torch.inference_mode():
        views, subject, valid, captions = AugmentationPreview.execute([images], [aug], [prompt], [8], [64], [1], [5],
                                                                      mask=[masks]).args
    assert views.shape == (8, 64, 64, 3) and subject.shape == valid.shape == (8, 64, 64)
    assert len(captions.splitlines()) == 8 and all(c.startswith(prompt) for c in captions.splitlines())
    cfg = TrainConfig(instance_prompts=prompt, resolution=64, seed=5, augment=aug.settings)
    expected = training_views(TrainData(images.movedim(-1, 1) * 2 - 1, None, masks[:, None]), cfg, 8)
    torch.testing.assert_close(views, torch.stack([((p + 1) / 2).clamp(0, 1).movedim(0, -1) for p, _, _, _ in expected]))
    # background 1.0 with masks: every view's background is new, so no view shows the photo's own
    assert not torch.allclose(views[0], images[0], atol=0.05)


def test_presets_and_custom_values():
    aug = _augmentation("strong", rotate=1.0)
    from fewshot_personalize.kernels.augment import PRESETS

    assert aug.settings == PRESETS["strong"]  # a preset ignores the custom widgets
    assert _augmentation("custom", rotate=3.0).settings.rotate == 3.0
    assert _augmentation("standard", views=4).settings.views == 4


def test_bad_augmentation_inputs():
    from fewshot_personalize.kernels.core.errors import UserInputError

    with pytest.raises(UserInputError, match="scale range"):
        _augmentation(scale_min=1.5, scale_max=1.0)
    with pytest.raises(UserInputError, match="empty batch"):
        _augmentation(backgrounds=torch.zeros(0, 8, 8, 3))


@pytest.mark.parametrize("node", ["concept", "textual-inversion", "catversion", "pivotal"])
def test_every_trainer_takes_the_augmentation(tiny_objects, node, tmp_path, monkeypatch):
    import folder_paths

    monkeypatch.setattr(folder_paths, "get_output_directory", lambda: str(tmp_path))
    m, c, v = tiny_objects
    images = torch.rand(3, RES, RES, 3, generator=torch.Generator().manual_seed(0))
    masks = torch.zeros(3, RES, RES)
    masks[:, 8:24, 8:24] = 1
    aug = [_augmentation(backgrounds=torch.rand(2, 40, 40, 3))]
    with torch.inference_mode():
        if node == "concept":
            from fewshot_personalize.nodes.train import TrainConcept

            out = TrainConcept.execute([m], [c], [v], [images], ["a photo of sks toy"], [3], [1e-3], [2], [False],
                                       [RES], [1], [0], mask=[masks], preview_steps=[0], augmentation=aug)
        elif node == "textual-inversion":
            from fewshot_personalize.nodes.train_embedding import TrainTextualInversion

            out = TrainTextualInversion.execute([m], [c], [v], [images], ["<sks>"], ["toy"], [1], ["object"], [3],
                                                [1e-3], [RES], [1], [0], mask=[masks], preview_steps=[0],
                                                augmentation=aug)
        elif node == "catversion":
            from fewshot_personalize.nodes.train_catversion import TrainCatVersion

            out = TrainCatVersion.execute([m], [c], [v], [images], ["toy"], ["object"], [""], [1], [3], [1e-2], [RES],
                                          [1], [0], mask=[masks], preview_steps=[0], augmentation=aug)
        else:
            from fewshot_personalize.nodes.train_pivotal import TrainPivotal

            out = TrainPivotal.execute([m], [c], [v], [images], ["<sks>"], ["toy"], [1], ["object"], [2], [False],
                                       [5e-3], [3], [1e-3], [RES], [1], [0], mask=[masks], preview_steps=[0],
                                       augmentation=aug)
    text = out.ui.as_dict()["text"][0]
    assert "augmentation: flip 0.5, rescale 1" in text
