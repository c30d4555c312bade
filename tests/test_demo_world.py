"""The demo world and its personal concepts: determinism, captions that tell the truth, concepts kept apart."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from fewshot_personalize.kernels.demo import concepts as C
from fewshot_personalize.kernels.demo import world as W
from fewshot_personalize.kernels.testing.word_tokenizer import build_vocab

CHROMATIC = [c for c in W.COLOURS if c not in ("white", "black")]


def _dominant_colour(pixels: np.ndarray) -> str:
    """Colour word of a set of RGB pixels, independent of shading: grey-ish pixels are white/black by
    brightness, the others go to the palette colour of nearest chromaticity (shading scales RGB, which
    leaves chromaticity alone)."""
    px = pixels.astype(float)
    sat = px.max(1) - px.min(1)
    neutral = sat < 40
    labels = np.empty(len(px), object)
    labels[neutral] = np.where(px[neutral].mean(1) > 100, "white", "black")
    pal = np.array([W.PALETTE[c] for c in CHROMATIC], float)
    pal /= pal.sum(1, keepdims=True)
    chroma = px[~neutral] / px[~neutral].sum(1, keepdims=True).clip(1)
    labels[~neutral] = np.array(CHROMATIC)[np.argmin(((chroma[:, None] - pal[None]) ** 2).sum(2), 1)]
    words, counts = np.unique(labels.astype(str), return_counts=True)
    return str(words[counts.argmax()])


def _extent_word(cls: str, mask: np.ndarray) -> str:
    ys, xs = np.nonzero(mask)
    h, w = (ys.max() + 1 - ys.min()) / mask.shape[0], (xs.max() + 1 - xs.min()) / mask.shape[1]
    extent = h if cls in ("toy", "kite") else max(h, w)
    for size in ("small", "medium", "big"):
        lo, hi = W.SIZE_SCALE[size]
        if lo - 0.03 <= extent <= hi + 0.03:
            return size
    return f"none ({extent:.3f})"


def _scenes(seed: int, n: int, **kw) -> list[W.Scene]:
    rng = np.random.default_rng(seed)
    return [W.sample_scene(rng, **kw) for _ in range(n)]


def test_same_seed_same_bytes_different_seed_different_bytes():
    a = [W.render(s)[0].tobytes() for s in _scenes(3, 6)]
    b = [W.render(s)[0].tobytes() for s in _scenes(3, 6)]
    c = [W.render(s)[0].tobytes() for s in _scenes(4, 6)]
    assert a == b
    assert all(x != y for x, y in zip(a, c))
    # the scene alone fixes the image (texture and shape seeds live in the scene)
    s = _scenes(5, 1)[0]
    assert W.render(s)[0].tobytes() == W.render(s)[0].tobytes()
    s2 = W.Scene(s.objects, s.context, s.texture_seed + 1)
    if s.context != "plain":
        assert W.render(s2)[0].tobytes() != W.render(s)[0].tobytes()


def test_render_returns_rgb_and_consistent_masks():
    for s in _scenes(6, 20, n_objects=2):
        img, full, masks = W.render(s)
        assert img.mode == "RGB" and img.size == (64, 64)
        assert full.shape == (64, 64) and full.dtype == bool
        assert len(masks) == 2 and all(m.sum() > 0 for m in masks)
        assert np.array_equal(full, masks[0] | masks[1])
        assert not (masks[0] & masks[1]).any()
    img, full, _ = W.render(_scenes(6, 1)[0], size=128)
    assert img.size == (128, 128) and full.shape == (128, 128)


def test_caption_parses_back_to_the_scene():
    for s in _scenes(7, 80):
        parsed = W.parse_prompt(s.caption())
        assert parsed["context"] == s.context
        assert parsed["unknown"] == [] and parsed["subject_index"] is None
        want = [{"cls": o.cls, "colour": o.colour, "size": None if o.size == "medium" else o.size,
                 "pattern": None, "colour2": None} for o in s.objects]
        assert parsed["objects"] == want, s.caption()
    assert W.Scene([W.Obj("ball", "red")], "plain").caption() == "a red ball"
    two = W.Scene([W.Obj("box", "blue", "small"), W.Obj("kite", "green")], "snow")
    assert two.caption() == "a small blue box and a green kite in the snow"
    assert W.Scene([W.Obj("ball", "orange", "big")], "fabric").caption() == "a big orange ball on pink fabric"


def test_named_patterns_parse_back_and_stay_out_of_base_captions():
    """Scene.caption(name_patterns=True) names each two-colour pattern with its second colour; parse_prompt reads
    it back into the object (not as an unknown word, which would mark a personal subject); by default captions
    and shape-bound patterns stay unnamed."""
    from fewshot_personalize.kernels.demo.world_patterns import ALL_PATTERNS, add_patterns

    rng = np.random.default_rng(3)
    named = 0
    for s in _scenes(9, 120, p_two=0.5):
        add_patterns(s, rng, 0.7, set(), ALL_PATTERNS)
        assert s.caption() == W.Scene([W.Obj(o.cls, o.colour, o.size) for o in s.objects], s.context).caption()
        parsed = W.parse_prompt(s.caption(name_patterns=True))
        assert parsed["unknown"] == [] and parsed["subject_index"] is None and parsed["context"] == s.context
        for o, p in zip(s.objects, parsed["objects"], strict=True):
            shown = o.pattern in W.PATTERN_NOUNS
            assert (p["cls"], p["colour"]) == (o.cls, o.colour)
            assert (p["pattern"], p["colour2"]) == ((o.pattern, o.colour2) if shown else (None, None))
            named += shown
    assert named > 50
    ball = W.Obj("ball", "red", "small", pattern="stripes", colour2="yellow")
    assert ball.caption(name_pattern=True) == "a small red ball with yellow stripes"
    assert W.Obj("toy", "blue", pattern="twotone", colour2="white").caption(True) == "a blue toy with a white half"
    assert W.Obj("toy", "blue", pattern="creature").caption(True) == "a blue toy"
    sks = W.parse_prompt("a sks ball with yellow stripes on the grass")
    assert sks["unknown"] == ["sks"] and sks["subject_index"] == 0 and sks["objects"][0]["pattern"] == "stripes"
    assert W.parse_prompt("a red toy with a hat")["unknown"] == ["with", "hat"]  # "with" alone names nothing


def test_rendered_pixels_show_what_the_caption_says():
    """Colour (shading-independent), size (extent on the world's scale) and context (background colour at
    a 4× downsampled, latent-like scale) of each render agree with its scene."""
    scenes = _scenes(8, 60)
    # context centroids from empty scenes of other seeds
    centroids = {ctx: np.mean([np.asarray(W.render(W.Scene([], ctx, k))[0].resize((16, 16), Image.BOX), float)
                               .reshape(-1, 3).mean(0) for k in range(3)], 0) for ctx in W.CONTEXTS}
    for s in scenes:
        img, full, masks = W.render(s)
        a = np.asarray(img)
        for obj, m in zip(s.objects, masks):
            assert _dominant_colour(a[m]) == obj.colour, s.caption()
            assert _extent_word(obj.cls, m) == obj.size, s.caption()
        bg = np.asarray(img.resize((16, 16), Image.BOX), float).reshape(-1, 3)
        keep = ~(np.asarray(Image.fromarray(full).resize((16, 16), Image.BOX)).reshape(-1) > 0)
        mean = bg[keep].mean(0)
        nearest = min(centroids, key=lambda c: ((centroids[c] - mean) ** 2).sum())
        assert nearest == s.context, s.caption()


def test_contexts_distinct_at_latent_scale():
    """Backgrounds stay distinguishable after 4× downsampling (4×4 colour layout, nearest centroid)."""
    def feat(ctx: str, seed: int) -> np.ndarray:
        return np.asarray(W.render(W.Scene([], ctx, seed))[0].resize((4, 4), Image.BOX), float).ravel()

    centroids = {c: np.mean([feat(c, k) for k in range(3)], 0) for c in W.CONTEXTS}
    for c in W.CONTEXTS:
        for k in range(10, 14):
            f = feat(c, k)
            assert min(centroids, key=lambda d: ((centroids[d] - f) ** 2).sum()) == c


def test_objects_are_chunky_at_latent_scale():
    """Even small objects cover several pixels of a 16×16 (4× downsampled) grid."""
    for s in _scenes(9, 80, sizes=["small"]):
        _, _, masks = W.render(s)
        for m in masks:
            assert (m.reshape(16, 4, 16, 4).mean((1, 3)) >= 0.5).sum() >= 3


def test_base_world_never_contains_concepts():
    scenes = _scenes(10, 400) + _scenes(11, 100, n_objects=2, classes=["toy", "ball"])
    for s in scenes:
        for o in s.objects:
            assert o.pattern is None and o.colour2 is None
    # and a flat render never shows a concept's second colour on a same-coloured object of its class
    for concept in C.CONCEPTS.values():
        if concept.colour2 is None:
            continue
        rng = np.random.default_rng(12)
        for _ in range(5):
            s = W.sample_scene(rng, classes=[concept.cls], colours=[concept.colour], contexts=["plain"], n_objects=1)
            img, _, (m,) = W.render(s)
            px = np.asarray(img)[m].astype(float)
            near2 = (np.abs(px - np.array(W.PALETTE[concept.colour2])).max(1) < 40).mean()
            assert near2 < 0.02


def test_concepts_carry_their_distinct_look():
    """Each concept's mask holds a clear share (> 4 %) of its second colour or painted mark."""
    second = {"checker_toy": (246, 246, 246), "twotone_ball": W.PALETTE["yellow"], "marked_box": (250, 250, 250),
              "creature_toy": (250, 250, 250)}
    for name, colour in second.items():
        for img, m in C.reference_images(name):
            px = np.asarray(img)[m].astype(float)
            assert (np.abs(px - np.array(colour)).max(1) < 40).mean() > 0.04, name


def test_reference_images_deterministic_and_varied():
    for name in C.CONCEPTS:
        refs = C.reference_images(name, n=5, seed=0)
        again = C.reference_images(name, n=5, seed=0)
        other = C.reference_images(name, n=5, seed=1)
        assert len(refs) == 5
        assert [r[0].tobytes() for r in refs] == [r[0].tobytes() for r in again]
        assert all(a[0].tobytes() != b[0].tobytes() for a, b in zip(refs, other))
        boxes = set()
        for img, m in refs:
            assert img.size == (64, 64) and m.shape == (64, 64) and m.sum() > 100
            ys, xs = np.nonzero(m)
            boxes.add((xs.min(), ys.min(), xs.max(), ys.max()))
        assert len(boxes) == 5  # pose / size / position vary


def test_prompt_table_agrees_with_the_parser():
    for name, concept in C.CONCEPTS.items():
        specs = C.prompt_specs(name)
        assert len(specs) >= 10
        assert {s.context for s in specs} == set(W.CONTEXTS)
        for spec in specs:
            parsed = W.parse_prompt(spec.prompt(concept.phrase()))
            exp = spec.expected(concept.cls)
            assert parsed["context"] == exp["context"] and parsed["objects"] == exp["objects"]
            assert parsed["unknown"] == [concept.identifier] and parsed["subject_index"] == 0


def test_render_prompt_puts_the_concept_in_the_asked_context():
    spec = next(s for s in C.PROMPTS if s.others)
    img, m = C.render_prompt("creature_toy", spec, seed=3)
    img2, m2 = C.render_prompt("creature_toy", spec, seed=3)
    assert img.tobytes() == img2.tobytes() and np.array_equal(m, m2)
    scene = C.concept_scene("creature_toy", spec.context, spec.size, np.random.default_rng(0), spec.others)
    assert scene.context == spec.context and scene.objects[0].pattern == "creature"
    assert [(o.cls, o.colour) for o in scene.objects[1:]] == list(spec.others)
    big = C.render_concept("twotone_ball", "grass", "big", seed=1)[1]
    small = C.render_concept("twotone_ball", "grass", "small", seed=1)[1]
    assert big.sum() > 2.5 * small.sum()


def test_vocabulary_covers_every_caption_and_prompt(tmp_path):
    words = W.all_words()
    assert len(words) == len(set(words)) and len(words) <= 60
    for ident in ("sks", "xyz", "zwx", "qrt"):
        assert ident in words
    used = {w for s in _scenes(13, 300) for w in s.caption().split()}
    used |= set(W.Obj("ball", "red", pattern="twotone", colour2="blue").caption(True).split())
    used |= {noun for noun in W.PATTERN_NOUNS.values()}
    for concept in C.CONCEPTS.values():
        for spec in C.PROMPTS:
            used |= set(spec.prompt(concept.phrase()).split())
    assert used <= set(words), used - set(words)
    vocab, _ = build_vocab(words)
    assert all(w + "</w>" in vocab for w in words)
    # BPE applies merges by rank, so a word whose letters hold an earlier word's first merges splits up: the
    # shipped tokenizers read "orange" as or|an|g|e and "background" in six pieces (the text encoder learns them
    # as sequences); every other word, the pattern nouns among them, is one token
    from transformers import CLIPTokenizer

    from fewshot_personalize.kernels.testing.word_tokenizer import write_clip_tokenizer

    write_clip_tokenizer(words, tmp_path)
    tokenizer = CLIPTokenizer.from_pretrained(str(tmp_path))
    split = {w for w in words if tokenizer.tokenize(w) != [w + "</w>"]}
    assert split == {"orange", "background"}


def test_holdout_restrictions_and_contrast_rules():
    held = [("red", "kite"), {"cls": "ball", "context": "snow"}]
    for s in _scenes(14, 300, holdout=held):
        for o in s.objects:
            assert not (o.colour == "red" and o.cls == "kite")
            assert not (o.cls == "ball" and s.context == "snow")
            assert o.colour not in W.LOW_CONTRAST.get(s.context, ())
    for s in _scenes(15, 50, classes=["kite"], contexts=["night", "city"], colours=["blue", "white"]):
        assert s.context in ("night", "city") and all(o.cls == "kite" and o.colour in ("blue", "white")
                                                      for o in s.objects)


def test_bad_input_raises_clear_errors():
    with pytest.raises(ValueError, match="class"):
        W.Obj("dog", "red")
    with pytest.raises(ValueError, match="colour"):
        W.Obj("ball", "teal")
    with pytest.raises(ValueError, match="context"):
        W.Scene([], "moon")
    with pytest.raises(ValueError, match="classes"):
        W.sample_scene(np.random.default_rng(0), classes=["dog"])
    with pytest.raises(ValueError, match="hold-out"):
        W.sample_scene(np.random.default_rng(0), holdout=[("sparkly",)])
    with pytest.raises(ValueError, match="could not sample"):
        W.sample_scene(np.random.default_rng(0), classes=["ball"], holdout=[("ball",)], max_tries=5)
    with pytest.raises(ValueError, match="second colour"):
        W.Obj("toy", "red", pattern="checker")
    with pytest.raises(ValueError, match="unknown concept"):
        C.reference_images("unicorn")
