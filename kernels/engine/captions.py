"""Caption templates for methods that learn a token or an adapter acting on every prompt.

The object and style lists are those of Textual Inversion's reference training script (Gal et al. 2022; the
``imagenet_templates_small`` / ``imagenet_style_templates_small`` of diffusers' ``textual_inversion.py``).
``{}`` is replaced by the subject: a placeholder (TI: ``<sks>``) or a class word (CatVersion: ``toy``).
"""

from __future__ import annotations

from ..core.errors import UserInputError

OBJECT_TEMPLATES = (
    "a photo of a {}", "a rendering of a {}", "a cropped photo of the {}", "the photo of a {}",
    "a photo of a clean {}", "a photo of a dirty {}", "a dark photo of the {}", "a photo of my {}",
    "a photo of the cool {}", "a close-up photo of a {}", "a bright photo of the {}", "a cropped photo of a {}",
    "a photo of the {}", "a good photo of the {}", "a photo of one {}", "a close-up photo of the {}",
    "a rendition of the {}", "a photo of the clean {}", "a rendition of a {}", "a photo of a nice {}",
    "a good photo of a {}", "a photo of the nice {}", "a photo of the small {}", "a photo of the weird {}",
    "a photo of the large {}", "a photo of a cool {}", "a photo of a small {}",
)
STYLE_TEMPLATES = (
    "a painting in the style of {}", "a rendering in the style of {}", "a cropped painting in the style of {}",
    "the painting in the style of {}", "a clean painting in the style of {}", "a dirty painting in the style of {}",
    "a dark painting in the style of {}", "a picture in the style of {}", "a cool painting in the style of {}",
    "a close-up painting in the style of {}", "a bright painting in the style of {}", "a good painting in the style of {}",
    "a rendition in the style of {}", "a nice painting in the style of {}", "a small painting in the style of {}",
    "a weird painting in the style of {}", "a large painting in the style of {}",
)
TEMPLATE_SETS = {"object": OBJECT_TEMPLATES, "style": STYLE_TEMPLATES}


def captions(templates: str | tuple[str, ...], subject: str) -> tuple[str, ...]:
    """The instance prompts: ``templates`` (a set name or the templates themselves) with ``{}`` = ``subject``."""
    if isinstance(templates, str):
        if templates not in TEMPLATE_SETS:
            raise UserInputError(f"caption templates must be one of {', '.join(TEMPLATE_SETS)}, got {templates!r}")
        templates = TEMPLATE_SETS[templates]
    bad = [t for t in templates if "{}" not in t]
    if bad:
        raise UserInputError(f"caption template {bad[0]!r} has no '{{}}' where the subject goes")
    return tuple(t.format(subject) for t in templates)
