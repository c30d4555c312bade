"""The base-model quality measure (issue 3: recognition on held-out caption combinations) judges what it says."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fewshot_personalize.kernels.demo import model_quality as Q
from fewshot_personalize.kernels.demo import world as W
from fewshot_personalize.kernels.demo.evaluator import Evaluator
from fewshot_personalize.kernels.demo.model import HOLDOUT


@pytest.fixture(scope="module")
def ev():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield Evaluator.load()
    torch.set_num_threads(threads)


def _attrs(caption):
    p = W.parse_prompt(caption)
    o = p["objects"][0]
    return {"cls": o["cls"], "colour": o["colour"], "context": p["context"]}


def test_holdout_captions_ask_for_each_held_out_combination_and_seen_ones_never_do():
    held = Q.holdout_captions(3, seed=1)
    assert len(held) == 3 * len(HOLDOUT)
    for k, spec in enumerate(HOLDOUT):
        for caption in held[3 * k:3 * k + 3]:
            assert all(_attrs(caption)[key] == value for key, value in spec.items()), (spec, caption)
    for caption in Q.seen_captions(60, seed=1):
        a = _attrs(caption)
        assert not any(all(a[key] == value for key, value in spec.items()) for spec in HOLDOUT), caption


def test_ideal_renders_score_high_and_mismatched_captions_low(ev):
    captions = Q.holdout_captions(4, seed=3)
    images = Q.ideal_renders(captions, seed=3)
    right = Q.recognition(ev, images, captions)
    assert right["all"] >= 0.85 and min(right[k] for k in Q.ATTRIBUTES) >= 0.9
    # the same images judged against captions that ask for something else: class, colour and context all wrong
    wrong_captions = []
    for c in captions:
        a = _attrs(c)
        cls = next(x for x in W.CLASSES if x != a["cls"])
        colour = next(x for x in W.COLOURS if x != a["colour"])
        context = next(x for x in W.CONTEXTS if x != a["context"])
        wrong_captions.append(W.Scene([W.Obj(cls, colour)], context).caption())
    wrong = Q.recognition(ev, images, wrong_captions)
    assert wrong["all"] == 0.0 and max(wrong[k] for k in Q.ATTRIBUTES) <= 0.15


def test_measure_model_quality_with_a_perfect_and_a_blind_generator(ev):
    from PIL import Image

    def perfect(caption, seed):
        return Q.ideal_renders([caption], seed)[0]

    def blind(caption, seed):
        return Image.new("RGB", (64, 64), (128, 128, 128))

    good = Q.measure_model_quality(ev, perfect, per_combination=2, n_seen=6, n_two=10, seed=5)
    bad = Q.measure_model_quality(ev, blind, per_combination=2, n_seen=6, n_two=10, seed=5)
    assert good["captions"] == {"held_out": 2 * len(HOLDOUT), "seen": 6, "two_objects": 10}
    assert good["held_out"]["all"] >= 0.8 and good["seen"]["all"] >= 0.8
    assert good["two_objects"]["both"] >= 0.7 and good["two_objects_ideal_renders"]["both"] >= 0.7
    assert bad["held_out"]["cls"] == 0.0 and bad["held_out"]["all"] == 0.0
    assert bad["two_objects"]["both"] == 0.0 and bad["two_objects"]["objects"] == 0.0


def test_both_objects_right_needs_each_object_once(ev):
    scenes = Q.two_object_scenes(6, seed=3)
    images = [W.render(s)[0] for s in scenes]
    right = Q.both_objects_right(ev, images, [s.caption() for s in scenes])
    assert right["both"] >= 0.8
    # one object shown alone cannot satisfy a caption that asks for two
    alone = [W.render(W.Scene([s.objects[0]], s.context, s.texture_seed))[0] for s in scenes]
    half = Q.both_objects_right(ev, alone, [s.caption() for s in scenes])
    assert half["both"] <= 0.2 and half["objects"] <= 0.6
    assert len(right["hits"]) == 6 and np.mean(right["hits"]) == right["both"]
    paired = Q.paired_difference(half["hits"], right["hits"])  # both objects shown beats one shown, caption by caption
    assert paired["difference"] == right["both"] - half["both"] > 0 and paired["only_b"] >= 4


def test_paired_difference_counts_only_discordant_captions():
    a = [True, True, False, False, True, False]
    b = [True, False, True, True, True, False]
    d = Q.paired_difference(a, b)
    assert (d["only_a"], d["only_b"], d["captions"]) == (1, 2, 6) and d["difference"] == pytest.approx(1 / 6)
    assert d["sign_test_p"] == pytest.approx(1.0)  # 1 against 2 discordant: no evidence either way
    assert d["standard_error"] == pytest.approx(np.sqrt(3 - 1 / 6) / 6)
    strong = Q.paired_difference([False] * 12, [True] * 10 + [False] * 2)
    assert strong["sign_test_p"] == pytest.approx(2 / 2 ** 10) and strong["difference"] == pytest.approx(10 / 12)
    assert Q.paired_difference(a, a) == {"difference": 0.0, "standard_error": 0.0, "only_a": 0, "only_b": 0,
                                         "sign_test_p": 1.0, "captions": 6}
    with pytest.raises(ValueError, match="same captions"):
        Q.paired_difference(a, b[:3])


def test_two_object_failures_are_told_apart(ev):
    """Each kind of miss is counted as its own: the second object left out (missing), drawn in another colour
    (wrong_colour), or as another class (wrong_class), each far more often than on the right renders (whose misses
    are the evaluator's own)."""
    scenes = [s for s in Q.two_object_scenes(40, seed=5) if s.objects[0].cls != s.objects[1].cls
              and s.objects[0].colour != s.objects[1].colour][:10]
    captions = [s.caption() for s in scenes]

    def with_second(change):
        out = []
        for s in scenes:
            first, second = s.objects
            out.append(W.render(W.Scene([first, *change(s.context, first, second)], s.context, s.texture_seed))[0])
        return out

    def recoloured(context, first, second):
        colour = next(c for c in W.COLOURS if c not in (first.colour, second.colour)
                      and c not in W.LOW_CONTRAST.get(context, ()) and c != "white")
        return [W.Obj(second.cls, colour, second.size, second.x, second.y, variant=second.variant)]

    def reclassed(context, first, second):
        return [W.Obj(first.cls, second.colour, second.size, second.x, second.y, variant=second.variant)]

    right = Q.both_objects_right(ev, [W.render(s)[0] for s in scenes], captions)
    assert right["both"] >= 0.7 and abs(sum(right["failures"].values()) - (1 - right["both"])) < 1e-9
    for change, kind in ((lambda context, a, b: [], "missing"), (recoloured, "wrong_colour"),
                         (reclassed, "wrong_class")):
        r = Q.both_objects_right(ev, with_second(change), captions)
        assert r["failures"][kind] - right["failures"][kind] >= 0.5, (kind, r)
        assert r["failures"][kind] == max(r["failures"].values())
        assert abs(sum(r["failures"].values()) - (1 - r["both"])) < 1e-9


def test_breakdown_finds_the_context_a_model_gets_wrong(ev):
    """A generator that draws every caption right except that 'in the snow' comes out on the grass: the breakdown
    by context shows snow failing and the others passing."""
    captions = [W.Scene([W.Obj(cls, "red")], context).caption()
                for cls in ("ball", "box") for context in ("snow", "grass", "beach") for _ in range(2)]

    def images_for(caption_list):
        out = []
        for k, caption in enumerate(caption_list):
            asked = W.Scene([W.Obj(W.parse_prompt(caption)["objects"][0]["cls"], "red")], "grass").caption() \
                if "snow" in caption else caption
            out.append(Q.ideal_renders([asked], seed=k)[0])
        return out

    by_context = Q.breakdown(ev, images_for(captions), captions, "context")
    assert set(by_context) == {"snow", "grass", "beach"} and all(r["n"] == 4 for r in by_context.values())
    assert by_context["snow"]["context"] == 0.0
    assert by_context["grass"]["context"] >= 0.75 and by_context["beach"]["context"] >= 0.75
    by_class = Q.breakdown(ev, images_for(captions), captions, "cls")
    assert set(by_class) == {"ball", "box"} and all(r["n"] == 6 for r in by_class.values())


def test_paired_with_refuses_a_file_it_cannot_pair(tmp_path, capsys):
    """--paired-with needs a JSON of this command with per-caption hits for as many captions: else exit 2 and one
    line, before any model loads."""
    import json

    for content, message in (("{}", "not a JSON this command wrote"),
                             (json.dumps({"two_objects": {"hits": [True] * 5}}), "no per-caption hits for 80")):
        (tmp_path / "earlier.json").write_text(content)
        with pytest.raises(SystemExit) as e:
            Q.main(["--paired-with", str(tmp_path / "earlier.json")])
        assert e.value.code == 2 and message in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        Q.main(["--paired-with", str(tmp_path / "missing.json")])
    assert e.value.code == 2 and "No such file" in capsys.readouterr().err
