"""Personal concepts of the demo world: subjects the base world never contains, with few-shot references.

Each concept plays the part of a DreamBooth subject (arXiv 2208.12242 §4.1: 3–5 photos of one specific
object): it belongs to a base-world class ("toy", "ball", …) but carries a look the base world never draws
(base objects are one flat colour, without patterns or extra parts). :func:`reference_images` gives the few
training photos (mostly on the plain background, one at home on a wooden floor); :data:`PROMPTS` are the
held-out evaluation prompts, each with the context and size the evaluator must find; :func:`render_prompt`
draws the ideal answer to one (the benchmark's upper bound and the evaluator's sanity check).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
from PIL import Image

from . import world
from .world import Obj, Scene, SIZE_SCALE

log = logging.getLogger(__name__)

__all__ = ["Concept", "CONCEPTS", "PromptSpec", "PROMPTS", "get_concept", "prompt_specs", "reference_images",
           "concept_obj", "concept_scene", "render_concept", "render_prompt"]


@dataclass(frozen=True)
class Concept:
    """A personal subject: its class noun, how it is drawn, and the identifier word suggested for it."""

    name: str
    cls: str
    colour: str
    pattern: str
    identifier: str
    description: str
    colour2: str | None = None

    def phrase(self, identifier: str | None = None) -> str:
        """The subject phrase that fills a prompt template, e.g. ``"sks toy"``."""
        return f"{identifier or self.identifier} {self.cls}"


CONCEPTS: dict[str, Concept] = {
    c.name: c
    for c in (
        Concept("checker_toy", "toy", "red", "checker", "sks", "a toy figure with a red and white checker pattern",
                colour2="white"),
        Concept("twotone_ball", "ball", "blue", "twotone", "xyz", "a ball split into a blue and a yellow half",
                colour2="yellow"),
        Concept("marked_box", "box", "orange", "xmark", "zwx", "an orange box with a white X on its front"),
        Concept("creature_toy", "toy", "purple", "creature", "qrt",
                "a purple toy creature with pointed ears, big eyes and a mouth"),
    )
}


def get_concept(concept: Concept | str) -> Concept:
    """The :class:`Concept` itself, or the one registered under that name."""
    if isinstance(concept, Concept):
        return concept
    try:
        return CONCEPTS[concept]
    except (KeyError, TypeError):
        raise ValueError(f"unknown concept {concept!r}; expected one of {tuple(CONCEPTS)}") from None


@dataclass(frozen=True)
class PromptSpec:
    """A held-out prompt template; ``{}`` receives the subject phrase (``"sks toy"``). ``context``/``size``:
    what the image must show; ``others``: further base-world objects asked for, as (class, colour)."""

    template: str
    context: str = "plain"
    size: str | None = None
    others: tuple[tuple[str, str], ...] = ()

    def prompt(self, subject: str) -> str:
        """The prompt text for a subject phrase: ``PromptSpec("a {} at night", "night").prompt("sks toy")``."""
        return self.template.format(subject)

    def expected(self, cls: str) -> dict:
        """Expected attributes in :func:`world.parse_prompt`'s format (the subject's colour is not asked)."""
        unasked = {"pattern": None, "colour2": None}
        objects = [{"cls": cls, "colour": None, "size": self.size} | unasked]
        objects += [{"cls": c, "colour": col, "size": None} | unasked for c, col in self.others]
        return {"context": self.context, "objects": objects}


PROMPTS: tuple[PromptSpec, ...] = (
    PromptSpec("a {}"),
    PromptSpec("a {} on the beach", "beach"),
    PromptSpec("a {} in the snow", "snow"),
    PromptSpec("a {} at night", "night"),
    PromptSpec("a big {} on the grass", "grass", "big"),
    PromptSpec("a {} on pink fabric", "fabric"),
    PromptSpec("a {} with a city in the background", "city"),
    PromptSpec("a {} on a wooden floor", "wood"),
    PromptSpec("a small {}", "plain", "small"),
    PromptSpec("a big {} in the snow", "snow", "big"),
    PromptSpec("a small {} on the beach", "beach", "small"),
    PromptSpec("a {} and a yellow kite on the grass", "grass", None, (("kite", "yellow"),)),
    PromptSpec("a {} and a white kite at night", "night", None, (("kite", "white"),)),
)


def prompt_specs(concept: Concept | str) -> list[PromptSpec]:
    """The held-out evaluation prompts for a concept (the same table for every concept)."""
    get_concept(concept)
    return list(PROMPTS)


def concept_obj(concept: Concept | str, *, size: str = "medium", scale: float | None = None, variant: int = 0,
                flip: bool = False, x: float = 0.5, y: float = 0.5) -> Obj:
    """The concept as a world object (drawn with its pattern by :func:`world.render`)."""
    c = get_concept(concept)
    return Obj(c.cls, c.colour, size, x, y, pattern=c.pattern, scale=scale, variant=variant, flip=flip,
               colour2=c.colour2)


def concept_scene(concept: Concept | str, context: str = "plain", size: str | None = None,
                  rng: np.random.Generator | None = None, others: tuple[tuple[str, str], ...] = ()) -> Scene:
    """A scene with the concept (random pose and position) in ``context``, plus base-world ``others``
    (class, colour), medium sized. The concept is ``scene.objects[0]``."""
    rng = rng if rng is not None else np.random.default_rng(0)
    size = size or "medium"
    if size not in SIZE_SCALE:
        raise ValueError(f"unknown size {size!r}; expected one of {tuple(SIZE_SCALE)}")
    for _ in range(200):
        lo, hi = SIZE_SCALE[size]
        objs = [concept_obj(concept, size=size, scale=float(rng.uniform(lo, hi)), variant=int(rng.integers(2**31)),
                            flip=bool(rng.uniform() < 0.5))]
        for cls, colour in others:
            lo, hi = SIZE_SCALE["medium"]
            objs.append(Obj(cls, colour, "medium", scale=float(rng.uniform(lo, hi)),
                            variant=int(rng.integers(2**31)), flip=bool(rng.uniform() < 0.5)))
        boxes: list[tuple[float, float, float, float]] = []
        if all(world.place_object(o, context, rng, boxes) is not None for o in objs):
            return Scene(objs, context, int(rng.integers(2**31)))
    raise ValueError(f"could not place the concept and {len(others)} other object(s) in one image")


def render_concept(concept: Concept | str, context: str = "plain", size: str | None = None, seed: int = 0,
                   others: tuple[tuple[str, str], ...] = (), image_size: int = 64) -> tuple[Image.Image, np.ndarray]:
    """Draw the concept in a context: (RGB image, bool mask of the concept only)."""
    c = get_concept(concept)
    rng = np.random.default_rng([seed & 0xFFFFFFFF, list(CONCEPTS).index(c.name) if c.name in CONCEPTS else 99])
    scene = concept_scene(c, context, size, rng, others)
    img, _, masks = world.render(scene, image_size)
    return img, masks[0]


def render_prompt(concept: Concept | str, spec: PromptSpec, seed: int = 0,
                  image_size: int = 64) -> tuple[Image.Image, np.ndarray]:
    """The ideal image for a held-out prompt: the concept, in the asked context and size, with the others."""
    return render_concept(concept, spec.context, spec.size, seed, spec.others, image_size)


def reference_images(concept: Concept | str, n: int = 5, seed: int = 0,
                     image_size: int = 64) -> list[tuple[Image.Image, np.ndarray]]:
    """The few-shot training photos of a concept: ``n`` images with masks, varying pose, size and position;
    on the plain background except the fourth, which is on a wooden floor (a photo taken at home)."""
    if n < 1:
        raise ValueError(f"need at least one reference image, got n={n}")
    c = get_concept(concept)
    sizes = ("medium", "big", "medium", "big", "medium")
    out: list[tuple[Image.Image, np.ndarray]] = []
    for i in range(n):
        context = "wood" if i == 3 else "plain"
        img, mask = render_concept(c, context, sizes[i % len(sizes)], seed * 1009 + i, image_size=image_size)
        out.append((img, mask))
    return out
