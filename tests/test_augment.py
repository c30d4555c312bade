"""Augmentation (kernels/augment): views are pure functions of their generator, masks and valid regions travel
with the photo through every transform, captions say what the view shows, and bad settings are refused."""

import os

import pytest
import torch

from fewshot_personalize.kernels.augment import PRESETS, AugmentSettings, Augmenter, Subject, compose_subjects, preset
from fewshot_personalize.kernels.augment.backgrounds import generated_backgrounds
from fewshot_personalize.kernels.augment.caption_ops import shuffle_and_drop
from fewshot_personalize.kernels.augment.colour import colour_jitter
from fewshot_personalize.kernels.augment.settings import CLOSE_ABOVE, FAR_BELOW
from fewshot_personalize.kernels.core.errors import UserInputError

DREAMBOOTH = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "dreambooth")
GEOMETRY_ONLY = AugmentSettings(flip=0.5, rescale=1.0, scale_min=0.3, scale_max=1.6, rotate=20.0)


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _disc_masks(n, size, radius=0.3):
    ys, xs = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")
    centres = torch.linspace(-0.3, 0.3, n)
    return torch.stack([(((xs - c) ** 2 + (ys + c / 2) ** 2) < radius ** 2).float()[None] for c in centres])


def test_views_are_a_pure_function_of_the_generator():
    x, m = torch.rand(3, 3, 32, 32) * 2 - 1, _disc_masks(3, 32)
    aug = Augmenter(PRESETS["strong"])
    a, b, c = (aug(x, m, ["a sks toy, red, small"] * 3, _gen(s)) for s in (5, 5, 6))
    assert torch.equal(a.pixels, b.pixels) and torch.equal(a.masks, b.masks) and a.captions == b.captions
    assert not torch.equal(a.pixels, c.pixels)


def test_switching_parts_on_does_not_change_the_other_draws():
    """Every draw happens whatever is switched on: adding colour jitter leaves the geometry of each view alone."""
    x, m = torch.rand(4, 3, 32, 32) * 2 - 1, _disc_masks(4, 32)
    plain = Augmenter(GEOMETRY_ONLY)(x, m, ["a"] * 4, _gen(1))
    jittered = Augmenter(AugmentSettings(**{**GEOMETRY_ONLY.__dict__, "brightness": 0.2}))(x, m, ["a"] * 4, _gen(1))
    assert torch.equal(plain.masks, jittered.masks) and torch.equal(plain.scales, jittered.scales)
    assert not torch.equal(plain.pixels, jittered.pixels)


def test_mask_and_valid_region_travel_with_the_photo():
    """A photo that *is* its mask (white subject, black rest) comes out equal to its transformed mask wherever the
    view shows the photo, through mirror, rescale, rotation and shift."""
    m = _disc_masks(6, 48)
    photo = (m * 2 - 1).expand(-1, 3, -1, -1)
    for seed in range(5):
        v = Augmenter(GEOMETRY_ONLY)(photo, m, [""] * 6, _gen(seed))
        # outside the valid region both are 0 (photo: mid grey, mask: none); inside, photo = 2·mask − 1 there
        expected = (2 * v.masks - v.valid)
        assert torch.allclose(v.pixels, expected.expand_as(v.pixels), atol=1e-5)
        assert v.rescaled.all()


def test_identity_settings_return_the_photos():
    x, m = torch.rand(2, 3, 16, 16) * 2 - 1, _disc_masks(2, 16)
    v = Augmenter(PRESETS["none"])(x, m, ["a sks toy", "a sks toy, red"], _gen(0))
    assert torch.equal(v.pixels, x) and torch.equal(v.masks, m) and (v.valid == 1).all()
    assert v.captions == ["a sks toy", "a sks toy, red"]


def test_flip_mirrors_exactly():
    x = torch.rand(8, 3, 16, 16) * 2 - 1
    v = Augmenter(AugmentSettings(flip=0.5))(x, None, [""] * 8, _gen(3))
    flipped = [torch.allclose(v.pixels[i], x[i].flip(-1), atol=1e-5) for i in range(8)]
    kept = [torch.allclose(v.pixels[i], x[i], atol=1e-5) for i in range(8)]
    assert all(f or k for f, k in zip(flipped, kept)) and any(flipped) and any(kept)


def test_scale_tags_say_what_the_view_shows():
    """A view tagged far away shows the subject at under FAR_BELOW² of its area; one tagged close up, enlarged."""
    m = _disc_masks(8, 64, radius=0.35)
    photo = (m * 2 - 1).expand(-1, 3, -1, -1)
    settings = AugmentSettings(flip=0.0, rescale=1.0, scale_min=0.3, scale_max=1.5)
    seen = set()
    for seed in range(6):
        v = Augmenter(settings)(photo, m, ["a sks toy"] * 8, _gen(seed))
        for i, caption in enumerate(v.captions):
            ratio = float(v.masks[i].sum() / m[i].sum())
            s = float(v.scales[i])
            if caption.endswith(("far away", "very small")):
                seen.add("far")
                assert s < FAR_BELOW and ratio == pytest.approx(s * s, rel=0.15)
            elif caption.endswith(("zoomed in", "close up")):
                seen.add("close")
                assert s > CLOSE_ABOVE and ratio > 1.0  # enlarged, and the subject is still in the frame
            else:
                assert caption == "a sks toy" and FAR_BELOW <= s <= CLOSE_ABOVE
    assert seen == {"far", "close"}


def test_enlarged_views_keep_the_subject_in_frame():
    m = torch.zeros(16, 1, 64, 64)
    m[..., 2:14, 50:62] = 1  # a subject in the top right corner
    v = Augmenter(AugmentSettings(flip=0.0, rescale=1.0, scale_min=1.9, scale_max=2.0))(
        m.expand(-1, 3, -1, -1) * 2 - 1, m, [""] * 16, _gen(0))
    assert (v.masks.flatten(1).sum(1) > 0.5 * 4 * m[0].sum()).all()


def test_background_replacement_keeps_the_subject_and_changes_the_rest():
    x, m = torch.rand(6, 3, 32, 32) * 2 - 1, _disc_masks(6, 32)
    v = Augmenter(AugmentSettings(flip=0.0, background=1.0))(x, m, [""] * 6, _gen(2))
    assert v.replaced.all() and (v.valid == 1).all()
    inside, outside = m.expand_as(x) > 0.5, m.expand_as(x) < 0.5
    assert torch.equal(v.pixels[inside], x[inside])
    assert (v.pixels[outside] - x[outside]).abs().mean() > 0.2


def test_user_backgrounds_are_used():
    x, m = torch.rand(4, 3, 16, 16) * 2 - 1, _disc_masks(4, 16)
    bg = torch.full((2, 3, 16, 16), 0.25)
    bg[1] = -0.75
    v = Augmenter(AugmentSettings(flip=0.0, background=1.0), bg)(x, m, [""] * 4, _gen(0))
    rest = v.pixels.expand(-1, 3, -1, -1)[m.expand(-1, 3, -1, -1) < 0.5]
    assert set(torch.unique(rest).tolist()) <= {0.25, -0.75}


def test_generated_backgrounds_vary_and_stay_in_range():
    bg = generated_backgrounds(9, (24, 24), _gen(0))
    assert bg.shape == (9, 3, 24, 24) and bg.min() >= -1 and bg.max() <= 1
    assert torch.cdist(bg.flatten(1), bg.flatten(1)).fill_diagonal_(1e9).min() > 0.1


def test_colour_jitter_is_bounded_and_hue_zero_keeps_hues():
    x = torch.rand(4, 3, 8, 8) * 2 - 1
    zero = torch.zeros(4)
    assert torch.allclose(colour_jitter(x, zero, zero, zero, zero), x, atol=1e-5)
    y = colour_jitter(x, torch.full((4,), 0.1), zero, zero, zero)
    assert torch.allclose((y + 1) / 2, ((x + 1) / 2 * 1.1).clamp(0, 1), atol=1e-5)
    # a full hue turn is the identity; a half turn moves colours
    assert torch.allclose(colour_jitter(x, zero, zero, zero, torch.ones(4)), x, atol=1e-4)
    assert (colour_jitter(x, zero, zero, zero, torch.full((4,), 0.5)) - x).abs().mean() > 0.05


def test_caption_shuffle_keeps_the_first_tags_and_dropout_drops():
    s = AugmentSettings(flip=0.0, shuffle_tags=True, keep_tags=1)
    outs = {shuffle_and_drop("sks toy, red, on grass, sunny, photo", s, _gen(k)) for k in range(20)}
    assert all(o.startswith("sks toy, ") and sorted(o.split(", ")) == sorted("sks toy, red, on grass, sunny, photo".split(", "))
               for o in outs) and len(outs) > 3
    drop = AugmentSettings(flip=0.0, tag_dropout=1.0, keep_tags=1)
    assert shuffle_and_drop("sks toy, red, on grass", drop, _gen(0)) == "sks toy"
    v = Augmenter(AugmentSettings(flip=0.0, caption_dropout=1.0))(torch.zeros(2, 3, 8, 8), None, ["a", "b"], _gen(0))
    assert v.captions == ["", ""]


def test_composition_places_each_subject_in_its_own_mask():
    size = 64
    a = torch.full((3, 40, 40), -1.0)
    a[0] = 1.0  # red subject
    b = torch.full((3, 40, 40), -1.0)
    b[2] = 1.0  # blue subject
    ma, mb = torch.zeros(1, 40, 40), torch.zeros(1, 40, 40)
    ma[:, 5:35, 10:30], mb[:, 10:30, 5:35] = 1, 1
    for seed in range(4):
        img, masks, caption = compose_subjects([Subject(a, ma, "sks toy"), Subject(b, mb, "zxq ball")], size, _gen(seed))
        assert masks.shape == (2, 1, size, size) and caption.startswith("a photo of a ")
        assert {caption.split(" and ")[0].split()[-1], caption.split()[-1]} == {"toy", "ball"}
        solid_a, solid_b = masks[0, 0] > 0.99, masks[1, 0] > 0.99
        assert solid_a.any() and solid_b.any() and not (solid_a & solid_b).any()
        assert torch.allclose(img[:, solid_a], a[:, :1, :1].reshape(3, 1), atol=1e-4)
        assert torch.allclose(img[:, solid_b], b[:, :1, :1].reshape(3, 1), atol=1e-4)
        # the left-to-right order of the caption is the order in the frame
        left_a = torch.nonzero(solid_a)[:, 1].float().mean() < torch.nonzero(solid_b)[:, 1].float().mean()
        assert (caption.index("toy") < caption.index("ball")) == bool(left_a)


@pytest.mark.parametrize("bad,match", [
    (dict(flip=1.5), "flip probability"),
    (dict(scale_min=0.05), "scale range"),
    (dict(scale_min=1.2, scale_max=1.0), "scale range"),
    (dict(scale_max=3.0), "leave the frame"),
    (dict(rotate=90.0), "rotate"),
    (dict(hue=0.7), "hue"),
    (dict(far_tags=("far away",)), "no '{}'"),
    (dict(views=-1), "views"),
])
def test_bad_settings_are_refused(bad, match):
    with pytest.raises(UserInputError, match=match):
        AugmentSettings(**bad)


def test_presets_and_overrides():
    assert preset("strong", rotate=5.0).rotate == 5.0 and preset("strong", rotate=None).rotate == PRESETS["strong"].rotate
    with pytest.raises(UserInputError, match="unknown augmentation preset 'wild'"):
        preset("wild")
    with pytest.raises(UserInputError, match="unknown augmentation setting"):
        preset("light", spin=3)
    with pytest.raises(UserInputError, match="background set is empty"):
        Augmenter(PRESETS["standard"], torch.zeros(0, 3, 8, 8))


@pytest.mark.skipif(not os.path.isdir(DREAMBOOTH), reason="DreamBooth sample photos (../shared/data/dreambooth) not present")
@pytest.mark.parametrize("subject", ["backpack", "dog", "duck_toy", "teapot"])
def test_real_photos_keep_the_subject_inside_its_mask(subject):
    """On the DreamBooth photos, with an ellipse standing in for the subject mask and everything outside it painted
    magenta: after every transform of the strong preset (colour jitter off, so magenta stays magenta), the pixels
    the view's mask calls subject are photo, the rest of the photo's region is magenta, and captions match scales."""
    from fewshot_personalize.kernels.core.images import load_image_folder

    photos = load_image_folder(os.path.join(DREAMBOOTH, subject), 96)
    n = photos.shape[0]
    ys, xs = torch.meshgrid(torch.linspace(-1, 1, 96), torch.linspace(-1, 1, 96), indexing="ij")
    m = ((xs / 0.55) ** 2 + (ys / 0.7) ** 2 < 1).float()[None, None].expand(n, 1, -1, -1).contiguous()
    magenta = torch.tensor([1.0, -1.0, 1.0])[None, :, None, None]
    painted = m * photos + (1 - m) * magenta
    settings = preset("strong", brightness=0.0, contrast=0.0, saturation=0.0, background=0.0, tag_dropout=0.0)
    for seed in range(4):
        v = Augmenter(settings)(painted, m, [f"a photo of sks {subject}"] * n, _gen(seed))
        distance = (v.pixels - magenta).abs().amax(1)  # 0 on magenta
        subject_px = v.masks[:, 0] > 0.999
        rest_px = (v.masks[:, 0] < 0.001) & (v.valid[:, 0] > 0.999)
        assert subject_px.any() and rest_px.any()
        # off the subject the photo shows through only as much as the (interpolated) mask weight lets it, and the
        # canvas only as much as the valid region's edge does
        bound = 2 * v.masks[:, 0] + (1 - v.valid[:, 0]) + 1e-5
        assert (distance[rest_px] <= bound[rest_px]).all()
        far = photos.new_tensor([c.endswith(("far away", "very small")) for c in v.captions]).bool()
        assert torch.equal(far, v.scales < FAR_BELOW)
        # the photos themselves are nowhere near magenta, so subject pixels are photo, not canvas
        assert (distance[subject_px] > 0.05).float().mean() > 0.99
