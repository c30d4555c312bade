"""The demo world: procedurally generated, captioned 64×64 scenes (numpy + PIL only).

Real Stable Diffusion weights cannot be downloaded here, so the project proves that personalization works in
a small world of its own. A scene is one or two objects (class, colour, size, position) on a textured context
background; its caption names exactly what was drawn::

    "a red ball"                                   (plain background: no context phrase)
    "a small blue box and a green kite in the snow"

:func:`sample_scene` draws flat-coloured objects with shading; patterns are what the personal concepts
(:mod:`.concepts`) are made of. The shipped demo model has never seen them; :mod:`.world_patterns` gives base scenes
random patterns (never a concept's own combination) for a pretraining session that should know them.

Everything is a pure function of its arguments: :func:`sample_scene` draws from the ``numpy`` generator it is
given, :func:`render` depends on the :class:`Scene` only (the scene carries its own texture seed and every
object its own shape seed), so the same seed gives byte-identical images. Shapes are drawn 4× supersampled and
box-filtered down, and are kept chunky, because the demo diffusion model works in a 4×-downsampled latent.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw

log = logging.getLogger(__name__)

__all__ = [
    "CLASSES",
    "COLOURS",
    "SIZES",
    "CONTEXTS",
    "CONTEXT_PHRASES",
    "IDENTIFIERS",
    "PATTERNS",
    "PATTERN_NOUNS",
    "PALETTE",
    "LOW_CONTRAST",
    "Obj",
    "Scene",
    "render",
    "sample_scene",
    "place_object",
    "parse_prompt",
    "all_words",
    "object_caption",
]

# --------------------------------------------------------------------------------------------------- vocabulary
CLASSES: tuple[str, ...] = ("toy", "ball", "box", "kite")
COLOURS: tuple[str, ...] = ("red", "orange", "yellow", "green", "blue", "purple", "pink", "white", "black")
SIZES: tuple[str, ...] = ("small", "medium", "big")  # "medium" is never written in a caption
CONTEXTS: tuple[str, ...] = ("plain", "beach", "snow", "grass", "night", "fabric", "wood", "city")
CONTEXT_PHRASES: dict[str, str] = {
    "plain": "",
    "beach": "on the beach",
    "snow": "in the snow",
    "grass": "on the grass",
    "night": "at night",
    "fabric": "on pink fabric",
    "wood": "on a wooden floor",
    "city": "with a city in the background",
}
#: Rare words kept free for personal concepts ("a sks toy").
IDENTIFIERS: tuple[str, ...] = ("sks", "xyz", "zwx", "qrt")
#: Object patterns the renderer knows. ``None`` (flat colour) is the only one :func:`sample_scene` draws; the
#: first four make the personal concepts, "stripes" and "dots" teach the evaluator that a multi-coloured object is
#: still one object; world_patterns.py puts the two-colour ones on base scenes for a pattern-aware pretraining.
PATTERNS: tuple[str, ...] = ("checker", "twotone", "xmark", "creature", "stripes", "dots")
#: the patterns drawn with a second colour (``colour2``)
TWO_COLOUR_PATTERNS: tuple[str, ...] = ("checker", "twotone", "stripes", "dots")
FUNCTION_WORDS: tuple[str, ...] = ("a", "an", "and")
#: How a caption names a two-colour pattern, when a pretraining session asks it to (``Scene.caption(name_patterns=
#: True)``): "a red ball with yellow stripes", "a blue box with white checks", "a toy with pink dots", "a red ball
#: with a yellow half". Shape-bound patterns (a face, an X) are never named. Base captions leave patterns unnamed.
PATTERN_NOUNS: dict[str, str] = {"stripes": "stripes", "checker": "checks", "dots": "dots", "twotone": "half"}

PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (214, 38, 38),
    "orange": (246, 138, 28),
    "yellow": (246, 214, 40),
    "green": (46, 168, 60),
    "blue": (38, 88, 222),
    "purple": (128, 58, 190),
    "pink": (246, 128, 190),
    "white": (246, 246, 246),
    "black": (34, 34, 40),
}
#: Object extent as a fraction of the image side (height for toys and kites, diameter for balls, largest side
#: for boxes). The gaps between the ranges keep the size words recognisable.
SIZE_SCALE: dict[str, tuple[float, float]] = {"small": (0.27, 0.33), "medium": (0.40, 0.48), "big": (0.57, 0.65)}
#: Colour/context pairs the sampler avoids (object would vanish into the background).
LOW_CONTRAST: dict[str, frozenset[str]] = {
    "snow": frozenset({"white"}),
    "grass": frozenset({"green"}),
    "fabric": frozenset({"pink"}),
    "night": frozenset({"black"}),
    "city": frozenset({"black"}),
}
#: Contexts with a ground line: objects (except kites, which fly) stand in the lower part of the image.
_GROUND_CONTEXTS = frozenset({"beach", "snow", "grass", "city"})
_SS = 4  # supersampling factor
_PLAIN_RGB = (0.77, 0.77, 0.78)


def all_words() -> list[str]:
    """Every word any caption or concept prompt can contain, plus the identifier words (tokenizer vocabulary).
    Words added later go at the end, so that a model grown to the longer list tokenizes its old captions as before
    (vocabulary_growth.py)."""
    words: list[str] = list(FUNCTION_WORDS)
    for phrase in CONTEXT_PHRASES.values():
        words += phrase.split()
    words += [s for s in SIZES if s != "medium"] + list(COLOURS) + list(CLASSES) + list(IDENTIFIERS)
    words += list(PATTERN_NOUNS.values())  # last: a word list extended at its end keeps the earlier words' tokens
    seen: set[str] = set()
    return [w for w in words if not (w in seen or seen.add(w))]


# ------------------------------------------------------------------------------------------------- scene model
@dataclass
class Obj:
    """One object. ``x``/``y``: centre as a fraction of the image side; ``scale``: extent (see ``SIZE_SCALE``),
    default the middle of the size word's range; ``variant``: seed of the shape details (pose, proportions);
    ``pattern``/``colour2``: only personal concepts use them."""

    cls: str
    colour: str
    size: str = "medium"
    x: float = 0.5
    y: float = 0.5
    pattern: str | None = None
    scale: float | None = None
    variant: int = 0
    flip: bool = False
    colour2: str | None = None

    def __post_init__(self) -> None:
        if self.cls not in CLASSES:
            raise ValueError(f"unknown object class {self.cls!r}; expected one of {CLASSES}")
        if self.colour not in PALETTE:
            raise ValueError(f"unknown colour {self.colour!r}; expected one of {tuple(PALETTE)}")
        if self.colour2 is not None and self.colour2 not in PALETTE:
            raise ValueError(f"unknown second colour {self.colour2!r}; expected one of {tuple(PALETTE)}")
        if self.size not in SIZES:
            raise ValueError(f"unknown size {self.size!r}; expected one of {SIZES}")
        if self.pattern is not None and self.pattern not in PATTERNS:
            raise ValueError(f"unknown pattern {self.pattern!r}; expected None or one of {PATTERNS}")
        if self.pattern in TWO_COLOUR_PATTERNS and self.colour2 is None:
            raise ValueError(f"pattern {self.pattern!r} needs a second colour (colour2)")

    @property
    def extent(self) -> float:
        """Object extent as a fraction of the image side."""
        if self.scale is not None:
            return float(self.scale)
        lo, hi = SIZE_SCALE[self.size]
        return (lo + hi) / 2

    def caption(self, name_pattern: bool = False) -> str:
        """``"a small red ball"`` (medium size is not named); with ``name_pattern`` a two-colour pattern is named
        too (:data:`PATTERN_NOUNS`): ``"a small red ball with yellow stripes"``."""
        return object_caption(self.cls, self.colour, self.size,
                              *((self.pattern, self.colour2) if name_pattern else ()))

    def bbox(self) -> tuple[float, float, float, float]:
        """(x0, y0, x1, y1) of the drawn shape, in fractions of the image side."""
        prims = _shape(self)
        u0, v0, u1, v1 = _prims_bbox(prims)
        s = self.extent
        return (self.x + u0 * s, self.y + v0 * s, self.x + u1 * s, self.y + v1 * s)


def object_caption(cls: str, colour: str | None = None, size: str | None = None, pattern: str | None = None,
                   colour2: str | None = None) -> str:
    """Noun phrase with the right article: ``object_caption("ball", "orange", "big") == "a big orange ball"``; a
    two-colour ``pattern`` of :data:`PATTERN_NOUNS` with its ``colour2`` adds ``"with yellow stripes"`` (``"with a
    yellow half"`` for two-tone); other patterns are not named."""
    words = [w for w in (size if size != "medium" else None, colour, cls) if w]
    article = "an" if words[0][0] in "aeiou" else "a"
    phrase = " ".join([article, *words])
    if pattern in PATTERN_NOUNS and colour2 is not None:
        phrase += f" with a {colour2} half" if pattern == "twotone" else f" with {colour2} {PATTERN_NOUNS[pattern]}"
    return phrase


@dataclass
class Scene:
    """Objects on a context background. ``texture_seed`` fixes the background texture (planks, stars, flakes)."""

    objects: list[Obj] = field(default_factory=list)
    context: str = "plain"
    texture_seed: int = 0

    def __post_init__(self) -> None:
        if self.context not in CONTEXTS:
            raise ValueError(f"unknown context {self.context!r}; expected one of {CONTEXTS}")

    def caption(self, name_patterns: bool = False) -> str:
        """The scene's caption, e.g. ``"a small blue box and a green kite in the snow"``; plain: ``"a red ball"``;
        ``name_patterns``: two-colour patterns named (:meth:`Obj.caption`)."""
        parts = [" and ".join(o.caption(name_patterns) for o in self.objects), CONTEXT_PHRASES[self.context]]
        return " ".join(p for p in parts if p)


_PATTERN_OF_NOUN = {noun: pattern for pattern, noun in PATTERN_NOUNS.items()}


def parse_prompt(prompt: str) -> dict:
    """Attributes a caption or prompt asks for, read with the world's vocabulary.

    Returns ``{"context": str, "objects": [{"cls", "colour", "size", "pattern", "colour2"}...], "unknown": [words],
    "subject_index": int | None}``; colour, size and pattern are ``None`` where not stated (a pattern is stated as
    in ``"a red ball with yellow stripes"``, :data:`PATTERN_NOUNS`), words outside the vocabulary
    (identifiers such as ``sks``) land in ``unknown``, and ``subject_index`` is the first object whose phrase
    holds such a word (the personal subject in "a sks toy and a red ball"). The context phrase is matched first, so "pink" in "on pink fabric" is not an object colour.
    """
    if not isinstance(prompt, str):
        raise ValueError(f"prompt must be a string, got {type(prompt).__name__}")
    text = " " + " ".join(prompt.lower().replace(",", " ").split()) + " "
    context = "plain"
    for key, phrase in CONTEXT_PHRASES.items():
        if phrase and f" {phrase} " in text:
            context = key
            text = text.replace(f" {phrase} ", " ")
            break
    objects: list[dict] = []
    unknown: list[str] = []
    subject_index = None
    for chunk in text.split(" and "):
        words = chunk.split()
        if not words:
            continue
        obj: dict = {"cls": None, "colour": None, "size": None, "pattern": None, "colour2": None}
        if "with" in words:  # "… with yellow stripes", "… with a yellow half": the object's pattern
            at = words.index("with")
            tail = [w for w in words[at + 1:] if w not in FUNCTION_WORDS]
            if tail and tail[-1] in _PATTERN_OF_NOUN and (len(tail) == 1 or len(tail) == 2 and tail[0] in COLOURS):
                obj["pattern"], obj["colour2"] = _PATTERN_OF_NOUN[tail[-1]], (tail[0] if len(tail) == 2 else None)
                words = words[:at]
        strange = [w for w in words if w not in CLASSES + COLOURS + SIZES + FUNCTION_WORDS]
        for w in words:
            if w in CLASSES:
                obj["cls"] = w
            elif w in COLOURS:
                obj["colour"] = w
            elif w in SIZES:
                obj["size"] = w
        unknown += strange
        if obj["cls"] is not None:
            if strange and subject_index is None:
                subject_index = len(objects)
            objects.append(obj)
    return {"context": context, "objects": objects, "unknown": unknown, "subject_index": subject_index}


# ------------------------------------------------------------------------------------------------------ shapes
# A shape is a list of primitives in object units: (u, v) relative to the object centre, scaled by the extent.
# Each primitive: kind ("ellipse" | "polygon" | "rrect"), points, and how it is painted:
#   shade  -- multiplies the object's (pattern) colour: 100 = base, < 100 darker, > 100 mixed towards white
#   decor  -- a fixed RGB colour instead (eyes, marks), not affected by pattern or shade
#   outline -- draw a dark rim (shade 60)


def _prim(kind: str, pts: Sequence[tuple[float, float]], shade: int = 100, outline: bool = True,
          decor: tuple[int, int, int] | None = None, radius: float = 0.0) -> dict:
    return {"kind": kind, "pts": [(float(u), float(v)) for u, v in pts], "shade": shade, "outline": outline,
            "decor": decor, "radius": radius}


def _circle(cu: float, cv: float, r: float, **kw) -> dict:
    return _prim("ellipse", [(cu - r, cv - r), (cu + r, cv + r)], **kw)


def _thick_line(p: tuple[float, float], q: tuple[float, float], w: float, **kw) -> dict:
    dx, dy = q[0] - p[0], q[1] - p[1]
    n = math.hypot(dx, dy) or 1.0
    ox, oy = -dy / n * w / 2, dx / n * w / 2
    return _prim("polygon", [(p[0] + ox, p[1] + oy), (q[0] + ox, q[1] + oy), (q[0] - ox, q[1] - oy),
                             (p[0] - ox, p[1] - oy)], **kw)


def _rot(pts: list[tuple[float, float]], c: tuple[float, float], a: float) -> list[tuple[float, float]]:
    ca, sa = math.cos(a), math.sin(a)
    return [(c[0] + (u - c[0]) * ca - (v - c[1]) * sa, c[1] + (u - c[0]) * sa + (v - c[1]) * ca) for u, v in pts]


def _toy(r: np.random.Generator, creature: bool) -> list[dict]:
    head_r = r.uniform(0.19, 0.22) if creature else r.uniform(0.15, 0.19)
    ear = 0.11 if creature else 0.0
    head_c = -0.5 + ear + head_r
    body_top = -0.5 + ear + 2 * head_r - 0.03
    body_h = r.uniform(0.28, 0.34) if creature else r.uniform(0.30, 0.36)
    body_w = r.uniform(0.36, 0.46)
    body_bot = body_top + body_h
    leg_w, leg_x, splay = 0.16, body_w * r.uniform(0.2, 0.3), r.uniform(0.0, 0.06)
    arm_len, arm_w = r.uniform(0.19, 0.24), 0.14
    prims: list[dict] = []
    for side in (-1, 1):  # legs
        top = (side * leg_x, body_bot - 0.04)
        prims.append(_thick_line(top, (side * (leg_x + splay), 0.5 - 0.02), leg_w))
    for side in (-1, 1):  # arms, drawn behind the body
        a = math.radians(r.uniform(-70, 35))
        sh = (side * (body_w / 2 - 0.05), body_top + 0.07)
        end = (sh[0] + side * arm_len * math.cos(a), sh[1] - arm_len * math.sin(a))
        prims.append(_thick_line(sh, end, arm_w))
        prims.append(_circle(end[0], end[1], 0.075))
    prims.append(_prim("rrect", [(-body_w / 2, body_top), (body_w / 2, body_bot)], radius=0.07))
    if creature:  # pointed ears, behind the head
        for side in (-1, 1):
            base_u = side * head_r * 0.6
            prims.append(_prim("polygon", [(base_u - 0.09, head_c - head_r * 0.45), (side * head_r * 1.0, -0.5),
                                           (base_u + 0.09, head_c - head_r * 0.45)]))
    prims.append(_circle(0.0, head_c, head_r))
    if creature:  # big eyes with pupils, a mouth
        gaze = r.uniform(-0.02, 0.02)
        for side in (-1, 1):
            prims.append(_circle(side * 0.095, head_c - 0.01, 0.088, outline=False, decor=(250, 250, 250)))
            prims.append(_circle(side * 0.095 + gaze, head_c, 0.042, outline=False, decor=(20, 20, 24)))
        prims.append(_thick_line((-0.05, head_c + 0.12), (0.05, head_c + 0.12), 0.03, outline=False, shade=35))
    else:
        for side in (-1, 1):
            prims.append(_circle(side * 0.06, head_c - 0.01, 0.028, outline=False, shade=30))
    return prims


def _ball(r: np.random.Generator) -> list[dict]:
    hu, hv = r.uniform(-0.22, -0.12), r.uniform(-0.22, -0.12)
    return [_circle(0.0, 0.0, 0.5), _circle(hu, hv, r.uniform(0.09, 0.12), outline=False, shade=150)]


def _box(r: np.random.Generator, mark: bool) -> list[dict]:
    d = r.uniform(0.14, 0.30)
    hf = (1 - d) * r.uniform(0.65, 1.0)
    v0 = -(hf + d) / 2
    fl, fr, ft, fb = -0.5, 0.5 - d, v0 + d, v0 + d + hf
    prims = [
        _prim("polygon", [(fl, ft), (fl + d, v0), (0.5, v0), (fr, ft)], shade=135),  # top face
        _prim("polygon", [(fr, ft), (0.5, v0), (0.5, v0 + hf), (fr, fb)], shade=70),  # side face
        _prim("polygon", [(fl, ft), (fr, ft), (fr, fb), (fl, fb)]),  # front face
    ]
    if mark:  # a white X on the front face
        iu, iv = (fr - fl) * 0.2, hf * 0.2
        w = 0.11
        prims.append(_thick_line((fl + iu, ft + iv), (fr - iu, fb - iv), w, outline=False, decor=(250, 250, 250)))
        prims.append(_thick_line((fl + iu, fb - iv), (fr - iu, ft + iv), w, outline=False, decor=(250, 250, 250)))
    return prims


def _kite(r: np.random.Generator) -> list[dict]:
    hb = r.uniform(0.66, 0.72)
    wb = hb * r.uniform(0.75, 0.9)
    a = hb * r.uniform(0.30, 0.38)
    top = -0.5
    c = (0.0, top + hb / 2)
    tilt = r.uniform(-0.25, 0.25)
    t, lft, rgt, bot = _rot([(0.0, top), (-wb / 2, top + a), (wb / 2, top + a), (0.0, top + hb)], c, tilt)
    prims = [_prim("polygon", [t, lft, bot, rgt])]
    prims.append(_thick_line(t, bot, 0.035, outline=False, shade=60))
    prims.append(_thick_line(lft, rgt, 0.035, outline=False, shade=60))
    # tail: a zigzag from the bottom corner down to the bottom of the extent, with two bows
    n = 5
    amp = r.uniform(0.04, 0.07)
    drift = r.uniform(-0.12, 0.12)
    pts = [bot]
    for i in range(1, n + 1):
        f = i / n
        pts.append((bot[0] + drift * f + (amp if i % 2 else -amp), bot[1] + (0.5 - bot[1]) * f))
    for p, q in zip(pts[:-1], pts[1:]):
        prims.append(_thick_line(p, q, 0.08, outline=False, shade=85))
    for k in (2, 4):
        bu, bv = pts[k]
        s = 0.07
        prims.append(_prim("polygon", [(bu, bv), (bu - s * 1.4, bv - s), (bu - s * 1.4, bv + s)], shade=85))
        prims.append(_prim("polygon", [(bu, bv), (bu + s * 1.4, bv - s), (bu + s * 1.4, bv + s)], shade=85))
    return prims


def _shape(obj: Obj) -> list[dict]:
    r = np.random.default_rng([obj.variant & 0xFFFFFFFF, CLASSES.index(obj.cls)])
    if obj.cls == "toy":
        prims = _toy(r, creature=obj.pattern == "creature")
    elif obj.cls == "ball":
        prims = _ball(r)
    elif obj.cls == "box":
        prims = _box(r, mark=obj.pattern == "xmark")
    else:
        prims = _kite(r)
    if obj.flip:
        for p in prims:
            pts = [(-u, v) for u, v in p["pts"]]
            if p["kind"] in ("ellipse", "rrect"):  # keep (min, max) corner order
                (u0, v0), (u1, v1) = pts
                pts = [(min(u0, u1), v0), (max(u0, u1), v1)]
            p["pts"] = pts
    return prims


def _prims_bbox(prims: list[dict]) -> tuple[float, float, float, float]:
    us = [u for p in prims for u, _ in p["pts"]]
    vs = [v for p in prims for _, v in p["pts"]]
    return min(us), min(vs), max(us), max(vs)


# ------------------------------------------------------------------------------------------------------ render
def _grid(n: int) -> tuple[np.ndarray, np.ndarray]:
    c = (np.arange(n, dtype=np.float32) + 0.5) / n
    return np.meshgrid(c, c, indexing="xy")  # (X, Y) in [0, 1]


def _pattern_field(obj: Obj, n: int, window: tuple[int, int, int, int]) -> np.ndarray:
    """Per-pixel base colour (h×w×3 in [0, 1]) of the object before shading, over the pixel ``window``
    (x0, y0, x1, y1) of an n×n canvas."""
    x0, y0, x1, y1 = window
    c1 = np.asarray(PALETTE[obj.colour], np.float32) / 255
    out = np.broadcast_to(c1, (y1 - y0, x1 - x0, 3)).copy()
    if obj.pattern not in TWO_COLOUR_PATTERNS:
        return out
    c2 = np.asarray(PALETTE[obj.colour2], np.float32) / 255  # type: ignore[index]
    s = obj.extent
    u = ((np.arange(x0, x1, dtype=np.float32) + 0.5) / n - obj.x) / s
    v = ((np.arange(y0, y1, dtype=np.float32) + 0.5) / n - obj.y) / s
    U, V = np.meshgrid(u, v, indexing="xy")
    r = np.random.default_rng([obj.variant & 0xFFFFFFFF, 99])
    if obj.pattern == "checker":
        cell = 0.16
        sel = ((np.floor(U / cell + 0.5) + np.floor(V / cell + 0.5)) % 2) == 1
    elif obj.pattern == "stripes":  # bands at a random angle and width
        a, width = r.uniform(0, math.pi), r.uniform(0.1, 0.25)
        sel = np.floor((U * math.cos(a) + V * math.sin(a)) / width + r.uniform(0, 1)) % 2 == 1
    elif obj.pattern == "dots":  # a few random spots
        sel = np.zeros(U.shape, bool)
        for _ in range(int(r.integers(2, 6))):
            cu, cv, rad = r.uniform(-0.35, 0.35), r.uniform(-0.35, 0.35), r.uniform(0.06, 0.14)
            sel |= (U - cu) ** 2 + (V - cv) ** 2 < rad**2
    else:  # two halves split by a near-vertical line through the centre
        a = math.radians(r.uniform(-30, 30))
        sel = (U * math.cos(a) + V * math.sin(a)) > 0
        if obj.flip:
            sel = ~sel
    out[sel] = c2
    return out


def _draw_object(obj: Obj, n: int) -> tuple[np.ndarray, np.ndarray, tuple[int, int, int, int]]:
    """Object colour (h×w×3) and coverage (h×w bool) at supersampled resolution ``n``, inside the returned
    pixel window (x0, y0, x1, y1) of the n×n canvas."""
    prims = _shape(obj)
    s_px = obj.extent * n
    ow = max(0.025 * s_px, 0.7 * _SS)
    u0, v0, u1, v1 = _prims_bbox(prims)
    pad = ow + 2
    wx0 = int(max(0, math.floor(obj.x * n + u0 * s_px - pad)))
    wy0 = int(max(0, math.floor(obj.y * n + v0 * s_px - pad)))
    wx1 = int(min(n, math.ceil(obj.x * n + u1 * s_px + pad)))
    wy1 = int(min(n, math.ceil(obj.y * n + v1 * s_px + pad)))
    if wx1 <= wx0 or wy1 <= wy0:  # entirely outside the image
        return np.zeros((0, 0, 3), np.float32), np.zeros((0, 0), bool), (0, 0, 0, 0)
    w, h = wx1 - wx0, wy1 - wy0
    ox, oy = obj.x * n - wx0, obj.y * n - wy0
    alpha = Image.new("L", (w, h), 0)
    shade = Image.new("L", (w, h), 0)
    decor = Image.new("RGB", (w, h), (0, 0, 0))
    decor_a = Image.new("L", (w, h), 0)
    da, ds, dd, dda = (ImageDraw.Draw(im) for im in (alpha, shade, decor, decor_a))

    for p in prims:
        pts = [(ox + u * s_px, oy + v * s_px) for u, v in p["pts"]]
        kind = p["kind"]
        lw = int(round(ow)) if p["outline"] else 0

        def paint(d: ImageDraw.ImageDraw, fill, outline=None, width=0) -> None:
            if kind == "ellipse":
                d.ellipse(pts, fill=fill, outline=outline, width=width)
            elif kind == "rrect":
                d.rounded_rectangle(pts, radius=p["radius"] * s_px, fill=fill, outline=outline, width=width)
            else:
                d.polygon(pts, fill=fill, outline=outline, width=width)

        paint(da, 255)
        if p["decor"] is None:
            paint(ds, p["shade"], outline=60 if lw else None, width=lw)
            paint(dda, 0)
        else:
            paint(dd, tuple(p["decor"]))
            paint(dda, 255)
    base = _pattern_field(obj, n, (wx0, wy0, wx1, wy1))
    sh = np.asarray(shade, np.float32)[..., None] / 100.0
    rgb = np.where(sh <= 1.0, base * sh, base + (1.0 - base) * np.clip(sh - 1.0, 0, 1))
    dmask = np.asarray(decor_a)[..., None] > 0
    rgb = np.where(dmask, np.asarray(decor, np.float32) / 255, rgb)
    return rgb.astype(np.float32), np.asarray(alpha) > 0, (wx0, wy0, wx1, wy1)


def render(scene: Scene, size: int = 64) -> tuple[Image.Image, np.ndarray, list[np.ndarray]]:
    """Draw a scene: (RGB image, bool mask of all objects, one bool mask per object, visible part only)."""
    if not isinstance(scene, Scene):
        raise ValueError(f"render expects a Scene, got {type(scene).__name__}")
    if size < 8:
        raise ValueError(f"image size must be at least 8 pixels, got {size}")
    n = size * _SS
    canvas = _background(scene.context, n, scene.texture_seed)
    covers: list[np.ndarray] = []
    for obj in scene.objects:
        rgb, cov_win, (x0, y0, x1, y1) = _draw_object(obj, n)
        canvas[y0:y1, x0:x1][cov_win] = rgb[cov_win]
        cov = np.zeros((n, n), bool)
        cov[y0:y1, x0:x1] = cov_win
        for c in covers:  # later objects hide earlier ones
            c &= ~cov
        covers.append(cov)
    img = Image.fromarray(np.clip(canvas * 255 + 0.5, 0, 255).astype(np.uint8), "RGB").resize((size, size),
                                                                                               Image.BOX)
    masks = [_downsample_mask(c, size) for c in covers]
    full = np.zeros((size, size), bool)
    for m in masks:
        full |= m
    return img, full, masks


def _downsample_mask(m: np.ndarray, size: int) -> np.ndarray:
    f = m.shape[0] // size
    return m.reshape(size, f, size, f).mean(axis=(1, 3)) >= 0.5


# ------------------------------------------------------------------------------------------------- backgrounds
def _rgb(*c: float) -> np.ndarray:
    return np.asarray(c, np.float32)


def _vgrad(n: int, top: np.ndarray, bottom: np.ndarray, y0: float = 0.0, y1: float = 1.0) -> np.ndarray:
    y = (np.arange(n, dtype=np.float32) + 0.5) / n
    t = np.clip((y - y0) / max(y1 - y0, 1e-6), 0, 1)[:, None, None]
    col = (np.asarray(top, np.float32) * (1 - t) + np.asarray(bottom, np.float32) * t).astype(np.float32)
    return np.broadcast_to(col, (n, n, 3)).copy()


def _dots(img: Image.Image, r: np.random.Generator, count: int, box: tuple[float, float, float, float],
          radius: tuple[float, float], colour: tuple[int, int, int]) -> None:
    n = img.size[0]
    d = ImageDraw.Draw(img)
    for _ in range(count):
        x = r.uniform(box[0], box[2]) * n
        y = r.uniform(box[1], box[3]) * n
        rad = r.uniform(*radius) * _SS
        d.ellipse([x - rad, y - rad, x + rad, y + rad], fill=colour)


def _to_img(a: np.ndarray) -> Image.Image:
    return Image.fromarray(np.clip(a * 255 + 0.5, 0, 255).astype(np.uint8), "RGB")


def _from_img(img: Image.Image) -> np.ndarray:
    return np.asarray(img, np.float32) / 255


def _jit(r: np.random.Generator, c: np.ndarray, amount: float = 0.04) -> np.ndarray:
    out = c * (1 + r.uniform(-amount, amount)) + r.uniform(-amount, amount, 3) * 0.5
    return np.clip(out, 0, 1).astype(np.float32)


def _background(context: str, n: int, seed: int) -> np.ndarray:
    r = np.random.default_rng([seed & 0xFFFFFFFF, CONTEXTS.index(context), 7])
    X, Y = _grid(n)
    if context == "plain":
        return _vgrad(n, _jit(r, _rgb(*_PLAIN_RGB), 0.02), _jit(r, _rgb(*_PLAIN_RGB) * 0.96, 0.02))
    if context == "beach":
        h_sky, h_sea = r.uniform(0.10, 0.18), r.uniform(0.30, 0.40)
        sky = _vgrad(n, _jit(r, _rgb(0.55, 0.76, 0.95)), _rgb(0.75, 0.87, 0.97), 0, h_sky)
        sea = _vgrad(n, _jit(r, _rgb(0.10, 0.38, 0.70)), _rgb(0.16, 0.52, 0.78), h_sky, h_sea)
        sand = _vgrad(n, _jit(r, _rgb(0.86, 0.76, 0.52)), _rgb(0.93, 0.84, 0.62), h_sea, 1.0)
        shore = h_sea + 0.015 * np.sin(X * r.uniform(8, 14) + r.uniform(0, 6))
        out = np.where((Y < h_sky)[..., None], sky, np.where((Y < shore)[..., None], sea, sand))
        foam = (Y >= shore - 0.02) & (Y < shore)
        out[foam] = _rgb(0.93, 0.96, 0.98)
        img = _to_img(out)
        d = ImageDraw.Draw(img)
        for _ in range(int(r.integers(5, 9))):  # wave dashes
            y = r.uniform(h_sky + 0.03, h_sea - 0.04) * n
            x = r.uniform(0, 1) * n
            w = r.uniform(4, 10) * _SS
            d.ellipse([x - w, y - 0.7 * _SS, x + w, y + 0.7 * _SS], fill=(170, 210, 240))
        _dots(img, r, 70, (0, h_sea + 0.03, 1, 1), (0.4, 0.8), (190, 160, 105))
        return _from_img(img)
    if context == "snow":
        h = r.uniform(0.22, 0.34)
        sky = _vgrad(n, _jit(r, _rgb(0.55, 0.63, 0.77)), _rgb(0.72, 0.78, 0.87), 0, h)
        ground = _vgrad(n, _rgb(0.97, 0.98, 1.0), _jit(r, _rgb(0.90, 0.93, 0.98), 0.02), h, 1.0)
        hill = h + 0.03 * np.sin(X * r.uniform(4, 8) + r.uniform(0, 6))
        out = np.where((Y < hill)[..., None], sky, ground)
        drift = 0.5 + 0.5 * np.sin(X * r.uniform(5, 9) + Y * r.uniform(10, 16) + r.uniform(0, 6))
        out = np.where((Y >= hill)[..., None], out - 0.05 * drift[..., None] * _rgb(1.0, 0.8, 0.4), out)
        img = _to_img(out)
        _dots(img, r, int(r.integers(45, 70)), (0, 0, 1, 1), (0.7, 1.3), (255, 255, 255))
        _dots(img, r, 30, (0, h + 0.05, 1, 1), (0.5, 0.9), (200, 212, 232))
        return _from_img(img)
    if context == "grass":
        h = r.uniform(0.12, 0.22) if r.uniform() < 0.6 else 0.0
        sky = _vgrad(n, _jit(r, _rgb(0.58, 0.78, 0.95)), _rgb(0.78, 0.88, 0.97), 0, max(h, 1e-3))
        grass = _vgrad(n, _jit(r, _rgb(0.36, 0.64, 0.24)), _jit(r, _rgb(0.24, 0.50, 0.16)), h, 1.0)
        out = np.where((Y < h)[..., None], sky, grass)
        img = _to_img(out)
        d = ImageDraw.Draw(img)
        for _ in range(260):
            x, y = r.uniform(0, 1) * n, r.uniform(h + 0.02, 1.02) * n
            ln, lean = r.uniform(2.0, 4.0) * _SS, r.uniform(-1.2, 1.2) * _SS
            col = (118, 190, 72) if r.uniform() < 0.5 else (34, 92, 26)
            d.line([(x, y), (x + lean, y - ln)], fill=col, width=int(0.8 * _SS))
        return _from_img(img)
    if context == "night":
        gh = r.uniform(0.10, 0.20)
        out = _vgrad(n, _jit(r, _rgb(0.03, 0.05, 0.18)), _jit(r, _rgb(0.10, 0.14, 0.36)), 0, 1 - gh)
        ground = 1 - gh + 0.02 * np.sin(X * r.uniform(4, 9) + r.uniform(0, 6))
        out[Y > ground] = _rgb(0.03, 0.04, 0.09)
        img = _to_img(out)
        _dots(img, r, int(r.integers(25, 45)), (0, 0, 1, 1 - gh - 0.03), (0.5, 1.1), (255, 246, 190))
        return _from_img(img)
    if context == "fabric":
        base = _jit(r, _rgb(0.93, 0.60, 0.73))
        period = r.uniform(1.4, 1.8) * _SS / n  # one thread, in image fractions
        block = period * int(r.integers(3, 5))
        ph = r.uniform(0, 1, 2)
        horiz = ((np.floor(X / block + ph[0]) + np.floor(Y / block + ph[1])) % 2) == 0
        thread = np.where(horiz, np.sin(2 * np.pi * Y / period), np.sin(2 * np.pi * X / period))
        fold = 0.05 * np.sin(2 * np.pi * (X * r.uniform(0.5, 1.5) + Y * r.uniform(0.3, 1.0)) + r.uniform(0, 6))
        k = 1 + 0.09 * thread + fold
        return np.clip(base * k[..., None], 0, 1).astype(np.float32)
    if context == "wood":
        ph = r.uniform(7, 10) * _SS / n
        idx = np.floor(Y / ph + r.uniform(0, 1))
        tones = 1 + r.uniform(-0.12, 0.12, 64)
        base = _jit(r, _rgb(0.58, 0.38, 0.22))
        tone = tones[(idx.astype(int)) % 64]
        grain = np.sin(2 * np.pi * (Y / ph * r.uniform(3, 5) + 0.6 * np.sin(X * r.uniform(6, 12) + idx * 1.7)))
        k = tone * (1 + 0.06 * grain)
        frac = (Y / ph + r.uniform(0, 1)) % 1.0
        seam = (frac < 1.0 * _SS / n / ph)
        joints = r.uniform(0, 1, 64)
        jx = joints[idx.astype(int) % 64]
        seam |= np.abs(((X - jx) % 0.7)) < 1.0 * _SS / n
        out = base * k[..., None]
        out[seam] = _rgb(0.28, 0.17, 0.09)
        return np.clip(out, 0, 1).astype(np.float32)
    if context == "city":
        out = _vgrad(n, _jit(r, _rgb(0.50, 0.70, 0.92)), _rgb(0.86, 0.89, 0.93))
        img = _to_img(out)
        d = ImageDraw.Draw(img)
        for layer, (col, hmin, hmax) in enumerate((((140, 148, 170), 0.30, 0.55), ((70, 76, 98), 0.45, 0.75))):
            x = r.uniform(-0.05, 0.0)
            while x < 1.0:
                w = r.uniform(0.08, 0.18)
                top = 1 - r.uniform(hmin, hmax)
                c = tuple(int(v * r.uniform(0.9, 1.1)) for v in col)
                d.rectangle([x * n, top * n, (x + w) * n, n], fill=c)
                if layer == 1:  # lit windows
                    for wy in np.arange(top + 0.04, 0.9, 0.07):
                        for wx in np.arange(x + 0.025, x + w - 0.03, 0.05):
                            if r.uniform() < 0.45:
                                d.rectangle([wx * n, wy * n, wx * n + 1.3 * _SS, wy * n + 1.3 * _SS],
                                            fill=(250, 226, 140))
                x += w + r.uniform(0.0, 0.03)
        d.rectangle([0, 0.9 * n, n, n], fill=(88, 88, 94))
        return _from_img(img)
    raise ValueError(f"unknown context {context!r}")


# ---------------------------------------------------------------------------------------------------- sampling
def _holdout_specs(holdout: Iterable) -> list[dict[str, str]]:
    """Normalise hold-out combinations: mappings ``{"cls": "kite", "colour": "red"}`` or word tuples
    ``("red", "kite")``/``("kite", "snow")`` (context keys as in ``CONTEXTS``)."""
    specs: list[dict[str, str]] = []
    for h in holdout:
        if isinstance(h, Mapping):
            spec = dict(h)
        else:
            words = (h,) if isinstance(h, str) else tuple(h)
            spec = {}
            for w in words:
                key = ("cls" if w in CLASSES else "colour" if w in COLOURS else "size" if w in SIZES
                       else "context" if w in CONTEXTS else None)
                if key is None:
                    raise ValueError(f"hold-out word {w!r} is not a class, colour, size or context of the world")
                spec[key] = w
        bad = set(spec) - {"cls", "colour", "size", "context"}
        if bad or not spec:
            raise ValueError(f"hold-out combination {h!r} must use the keys cls/colour/size/context")
        specs.append(spec)
    return specs


def _held_out(obj: Obj, context: str, specs: list[dict[str, str]]) -> bool:
    attrs = {"cls": obj.cls, "colour": obj.colour, "size": obj.size, "context": context}
    return any(all(attrs[k] == v for k, v in s.items()) for s in specs)


def _check_subset(name: str, values: Sequence[str] | None, allowed: Sequence[str]) -> tuple[str, ...]:
    if values is None:
        return tuple(allowed)
    values = tuple(values)
    bad = [v for v in values if v not in allowed]
    if bad or not values:
        raise ValueError(f"{name} must be a non-empty subset of {tuple(allowed)}, got {values}")
    return values


def _overlap(a: tuple[float, ...], b: tuple[float, ...], gap: float) -> bool:
    return not (a[2] + gap <= b[0] or b[2] + gap <= a[0] or a[3] + gap <= b[1] or b[3] + gap <= a[1])


def place_object(obj: Obj, context: str, rng: np.random.Generator,
                 occupied: list[tuple[float, float, float, float]] | None = None,
                 tries: int = 20) -> tuple[float, float, float, float] | None:
    """Pick a random position for ``obj`` (sets ``obj.x``/``obj.y``): fully inside the image, standing on the
    ground in contexts with a horizon (kites fly), clear of the boxes in ``occupied``, which the new box is
    appended to. Returns the box, or ``None`` when no free place was found in ``tries`` draws."""
    u0, v0, u1, v1 = (c * obj.extent for c in _prims_bbox(_shape(obj)))
    m = 0.02
    y_lo = -v0 + m
    if context in _GROUND_CONTEXTS and obj.cls != "kite":
        y_lo = max(y_lo, 0.52 - v1)
    x_lo, x_hi, y_hi = -u0 + m, 1 - u1 - m, 1 - v1 - m
    if x_lo > x_hi or y_lo > y_hi:
        return None
    occupied = occupied if occupied is not None else []
    for _ in range(tries):
        x, y = float(rng.uniform(x_lo, x_hi)), float(rng.uniform(y_lo, y_hi))
        box = (x + u0, y + v0, x + u1, y + v1)
        if not any(_overlap(box, b, 0.03) for b in occupied):
            obj.x, obj.y = x, y
            occupied.append(box)
            return box
    return None


def sample_scene(rng: np.random.Generator, *, classes: Sequence[str] | None = None,
                 colours: Sequence[str] | None = None, contexts: Sequence[str] | None = None,
                 sizes: Sequence[str] | None = None, n_objects: int | None = None, p_two: float = 0.35,
                 holdout: Iterable = (), allow_low_contrast: bool = False, max_tries: int = 200) -> Scene:
    """Draw a random base-world scene (flat-coloured objects only, never a personal concept).

    ``classes``/``colours``/``contexts``/``sizes`` restrict the choices; ``n_objects`` fixes the count (0, 1
    or 2; default 1, or 2 with probability ``p_two``); ``holdout`` lists attribute combinations that must never
    appear (see :func:`_holdout_specs`); low-contrast colour/context pairs (``LOW_CONTRAST``) are avoided
    unless ``allow_low_contrast``.
    """
    classes = _check_subset("classes", classes, CLASSES)
    colours = _check_subset("colours", colours, COLOURS)
    contexts = _check_subset("contexts", contexts, CONTEXTS)
    sizes = _check_subset("sizes", sizes, SIZES)
    specs = _holdout_specs(holdout)
    if n_objects is not None and n_objects not in (0, 1, 2):
        raise ValueError(f"n_objects must be 0, 1 or 2, got {n_objects}")
    for _ in range(max_tries):
        context = contexts[int(rng.integers(len(contexts)))]
        count = n_objects if n_objects is not None else (2 if rng.uniform() < p_two else 1)
        objs: list[Obj] = []
        boxes: list[tuple[float, ...]] = []
        ok = True
        for _k in range(count):
            placed = False
            for _t in range(20):
                cls = classes[int(rng.integers(len(classes)))]
                colour = colours[int(rng.integers(len(colours)))]
                size = sizes[int(rng.integers(len(sizes)))]
                if not allow_low_contrast and colour in LOW_CONTRAST.get(context, ()):
                    continue
                if any(o.cls == cls and o.colour == colour for o in objs):
                    continue  # the caption must tell the two apart
                lo, hi = SIZE_SCALE[size]
                obj = Obj(cls, colour, size, scale=float(rng.uniform(lo, hi)),
                          variant=int(rng.integers(2**31)), flip=bool(rng.uniform() < 0.5))
                if _held_out(obj, context, specs):
                    continue
                box = place_object(obj, context, rng, boxes, tries=1)
                if box is None:
                    continue
                objs.append(obj)
                placed = True
                break
            if not placed:
                ok = False
                break
        if ok:
            return Scene(objs, context, int(rng.integers(2**31)))
    raise ValueError(
        f"could not sample a scene in {max_tries} tries: the restrictions (classes={classes}, colours={colours}, "
        f"contexts={contexts}, sizes={sizes}, holdout={specs}) leave (almost) nothing to draw")
