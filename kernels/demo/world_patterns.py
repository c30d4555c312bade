"""Patterns in the base world: objects that carry a random two-colour pattern, so that a base model knows what
stripes, checks, dots and two-tone objects are before anyone personalizes it (as real text-to-image models do).

Captions do not name patterns. What no base scene ever shows is the exact class + pattern + colour pair of a
personal concept: the bundled ones (concepts.py) and the held-out striped ball of
tests/benchmarks/heldout_concept.py, so a concept is still something to learn, only its vocabulary is known.
"""

from __future__ import annotations

import numpy as np

from .concepts import CONCEPTS
from .world import COLOURS, TWO_COLOUR_PATTERNS, Scene

#: the renderer's two-colour patterns (world.PATTERNS less the shape-bound "xmark" and "creature")
PATTERNS: tuple[str, ...] = TWO_COLOUR_PATTERNS
#: the shape-bound patterns and the one class each is drawn on (a face and ears on a toy, a painted X on a box)
SHAPE_PATTERNS: dict[str, str] = {"creature": "toy", "xmark": "box"}
ALL_PATTERNS: tuple[str, ...] = PATTERNS + tuple(SHAPE_PATTERNS)


def excluded_combinations() -> set[tuple[str, str | None, frozenset]]:
    """(class, pattern, {colour, colour2}) of every personal concept the project measures: never in a base scene."""
    combos = {(c.cls, c.pattern, frozenset((c.colour, c.colour2))) for c in CONCEPTS.values()}
    combos.add(("ball", "stripes", frozenset(("red", "yellow"))))  # heldout_concept.py's striped ball
    return combos


def add_patterns(scene: Scene, rng: np.random.Generator, share: float,
                 excluded: set[tuple[str, str | None, frozenset]], patterns: tuple[str, ...] = PATTERNS,
                 prefer_shape: float = 0.0) -> int:
    """Give each object of ``scene``, with probability ``share``, a random pattern of ``patterns`` and a random
    second colour (not its own; not an ``excluded`` combination: up to 10 draws, else it stays flat); a
    shape-bound pattern (:data:`SHAPE_PATTERNS`) only on its class and without a second colour, and on an object of
    that class with probability ``prefer_shape`` before any other (more faces and marks to learn from: a toy is
    one class in many). Draws nothing from ``rng`` when ``share`` is 0, so flat-world datasets stay identical;
    nothing more when ``prefer_shape`` is 0. Returns how many were patterned."""
    if share <= 0:
        return 0
    count = 0
    own_shape = {cls: p for p, cls in SHAPE_PATTERNS.items() if p in patterns}
    for obj in scene.objects:
        if rng.uniform() >= share:
            continue
        preferred = prefer_shape > 0 and obj.cls in own_shape and rng.uniform() < prefer_shape
        for attempt in range(10):
            pattern = own_shape[obj.cls] if preferred and attempt == 0 else patterns[int(rng.integers(len(patterns)))]
            colour2 = COLOURS[int(rng.integers(len(COLOURS)))]
            if pattern in SHAPE_PATTERNS:
                if SHAPE_PATTERNS[pattern] != obj.cls:
                    continue
                colour2 = None
            if colour2 != obj.colour and (obj.cls, pattern, frozenset((obj.colour, colour2))) not in excluded:
                obj.pattern, obj.colour2 = pattern, colour2
                count += 1
                break
    return count
