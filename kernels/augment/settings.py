"""What augmentation does to each training view: one settings object for every method, and its presets.

The rescale follows Custom Diffusion (Kumari et al. 2023, §3.2 / its ``train.py``): a view shows the photo at a
random scale, shrunk onto a canvas (only the photo's region is in the loss) or enlarged and cropped, and its
caption says so ("a far away …" / "very small …" when much smaller, "zoomed in …" / "close up …" when enlarged).
Caption shuffle and dropout follow kohya sd-scripts (comma-separated tags; the first ``keep_tags`` stay in place).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

from ..core.errors import UserInputError

#: the largest enlargement: a view at scale s shows 1/s of the photo, and past 2 the subject may leave the frame
MAX_SCALE = 2.0
MIN_SCALE = 0.1
#: Custom Diffusion's thresholds: tagged "far away" below 0.6 of the frame, "close up" when enlarged
FAR_BELOW = 0.6
CLOSE_ABOVE = 1.1


@dataclass(frozen=True)
class AugmentSettings:
    """Probabilities are per view; every draw is a pure function of (seed, step), so resume stays identical.

    ``flip``: probability of a mirror image. ``rescale``: probability of a random scale in ``scale_min …
    scale_max`` (size of the photo in the frame; < 1 shrinks onto a canvas, > 1 enlarges and crops), with caption
    tags when ``scale_tags``. ``rotate``: largest rotation in degrees. ``brightness`` / ``contrast`` /
    ``saturation``: largest relative change; ``hue``: largest hue turn as a fraction of the colour circle (0 keeps
    a concept's identity colours). ``background``: probability of putting the subject (where a subject mask
    exists) onto another background: the user's backgrounds when given, else generated textures.
    ``far_tags`` / ``close_tags``: Custom Diffusion's words as caption templates (``{}`` = the caption; one is
    drawn per view); written as a trailing tag so any caption reads well. ``shuffle_tags`` / ``keep_tags`` / ``tag_dropout`` / ``caption_dropout``: kohya-style caption changes (the
    whole caption dropped means an unconditional sample). ``views``: 0 encodes a fresh view every step; K > 0
    draws K views per photo once and encodes them once (a cached pool, for slow VAEs)."""

    flip: float = 0.5
    rescale: float = 0.0
    scale_min: float = 1 / 3
    scale_max: float = 1.4
    scale_tags: bool = True
    far_tags: tuple[str, ...] = ("{}, far away", "{}, very small")
    close_tags: tuple[str, ...] = ("{}, zoomed in", "{}, close up")
    rotate: float = 0.0
    brightness: float = 0.0
    contrast: float = 0.0
    saturation: float = 0.0
    hue: float = 0.0
    background: float = 0.0
    shuffle_tags: bool = False
    keep_tags: int = 1
    tag_dropout: float = 0.0
    caption_dropout: float = 0.0
    views: int = 0

    def __post_init__(self):
        object.__setattr__(self, "far_tags", tuple(self.far_tags))
        object.__setattr__(self, "close_tags", tuple(self.close_tags))
        probabilities = {"flip": self.flip, "rescale": self.rescale, "background": self.background,
                         "tag dropout": self.tag_dropout, "caption dropout": self.caption_dropout}
        for name, p in probabilities.items():
            if not 0.0 <= p <= 1.0:
                raise UserInputError(f"augmentation: {name} probability must be in [0, 1], got {p}")
        if not MIN_SCALE <= self.scale_min <= self.scale_max:
            raise UserInputError(f"augmentation: the scale range {self.scale_min:g}–{self.scale_max:g} is empty or "
                                 f"below {MIN_SCALE:g} (the subject would be a few pixels)")
        if self.scale_max > MAX_SCALE:
            raise UserInputError(f"augmentation: a scale of {self.scale_max:g} shows 1/{self.scale_max:g} of the photo, "
                                 f"so the subject can leave the frame (at most {MAX_SCALE:g})")
        limits = {"rotate": (self.rotate, 45.0), "brightness": (self.brightness, 0.5), "contrast": (self.contrast, 0.5),
                  "saturation": (self.saturation, 1.0), "hue": (self.hue, 0.5)}
        for name, (v, top) in limits.items():
            if not 0.0 <= v <= top:
                raise UserInputError(f"augmentation: {name} must be in [0, {top:g}], got {v}")
        for t in self.far_tags + self.close_tags:
            if "{}" not in t:
                raise UserInputError(f"augmentation: the scale tag {t!r} has no '{{}}' where the caption goes")
        if self.scale_tags and self.rescale and not (self.far_tags and self.close_tags):
            raise UserInputError("augmentation: scale tags need at least one far and one close template")
        if self.keep_tags < 0 or self.views < 0:
            raise UserInputError(f"augmentation: keep_tags and views must be ≥ 0, got {self.keep_tags} and {self.views}")

    @property
    def changes_captions(self) -> bool:
        return bool((self.rescale and self.scale_tags) or self.shuffle_tags or self.tag_dropout or self.caption_dropout)

    @property
    def changes_colours(self) -> bool:
        return bool(self.saturation or self.hue)

    def describe(self) -> str:
        """The settings that differ from no augmentation, one line."""
        off = asdict(PRESETS["none"])
        parts = [f"{k} {v:g}" if isinstance(v, float) else f"{k} {v}" for k, v in asdict(self).items() if v != off[k]]
        return ", ".join(parts) or "off"


PRESETS: dict[str, AugmentSettings] = {
    # the trainer's behaviour without augmentation (no flip either)
    "none": AugmentSettings(flip=0.0),
    "flip": AugmentSettings(flip=0.5),
    # Custom Diffusion's recipe: rescale with caption tags and the valid-region loss, flip
    "custom-diffusion": AugmentSettings(flip=0.5, rescale=1.0),
    # gentle: for photos that already vary; identity colours untouched
    "light": AugmentSettings(flip=0.5, rescale=0.5, scale_min=0.6, scale_max=1.2, rotate=5.0, brightness=0.1,
                             contrast=0.1),
    # the default against memorised surroundings: rescale, rotation, mild light changes, new backgrounds
    "standard": AugmentSettings(flip=0.5, rescale=0.75, scale_min=0.4, scale_max=1.3, rotate=10.0, brightness=0.1,
                                contrast=0.1, background=0.5),
    # few photos that all share one setting
    "strong": AugmentSettings(flip=0.5, rescale=1.0, scale_min=1 / 3, scale_max=1.4, rotate=15.0, brightness=0.15,
                              contrast=0.15, saturation=0.05, background=0.75, tag_dropout=0.1),
}


def preset(name: str, **overrides) -> AugmentSettings:
    """A preset by name, with some settings changed (``None`` values are ignored)."""
    if name not in PRESETS:
        raise UserInputError(f"unknown augmentation preset {name!r}: one of {', '.join(PRESETS)}")
    changes = {k: v for k, v in overrides.items() if v is not None}
    unknown = set(changes) - set(asdict(PRESETS[name]))
    if unknown:
        raise UserInputError(f"unknown augmentation setting(s): {', '.join(sorted(unknown))}")
    return replace(PRESETS[name], **changes)
