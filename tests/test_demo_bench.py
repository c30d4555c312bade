"""The benchmark's summary and table: means and stds per row, the ceilings, the targets' ratios."""

import pytest

from fewshot_personalize.kernels.demo.bench import REFERENCES, THROUGH_VAE, markdown, summarise
from fewshot_personalize.kernels.demo.unet_training import lr_factor, scheduled_factor

BASE, PRIOR, NOPRIOR = ("base model (no personalization)", "DreamBooth-LoRA, prior, UNet + text encoder",
                        "DreamBooth-LoRA, no prior, UNet + text encoder")


def _run(method, sf, pf=0.6, drift=0.4):
    return {"method": method, "subject_fidelity": sf, "prompt_fidelity": pf, "class_prior_drift": drift,
            "diversity": 0.3, "train_seconds": 10.0}


def test_summary_rows_and_target_ratios():
    runs = [_run(BASE, 0.3, drift=0.4), _run(BASE, 0.5, drift=0.4), _run(PRIOR, 0.6, pf=0.5, drift=0.45),
            _run(PRIOR, 0.6, pf=0.7, drift=0.45), _run(NOPRIOR, 0.7, drift=0.6), _run(NOPRIOR, 0.7, drift=0.6)]
    refs = [{"subject_fidelity": 0.9, "prompt_fidelity": 1.0}, {"subject_fidelity": 1.0, "prompt_fidelity": 1.0}]
    vae_refs = [{"subject_fidelity": 0.75, "prompt_fidelity": 0.9}] * 2
    s = summarise(runs, refs, vae_refs)
    assert list(s) == [BASE, PRIOR, NOPRIOR, REFERENCES, THROUGH_VAE]
    assert s[BASE]["subject_fidelity"] == pytest.approx((0.4, 0.1))
    assert s[PRIOR]["prompt_fidelity"] == pytest.approx((0.6, 0.1))
    assert s[REFERENCES]["subject_fidelity"] == pytest.approx((0.95, 0.05))
    table = markdown({"summary": s, "concepts": ["a"], "seeds": 2, "machine": "m", "torch": "t", "date": "d",
                      "seconds": 60})
    assert f"| {THROUGH_VAE} | 0.750 ± 0.000 |" in table
    assert "subject fidelity = 63 % of the references' own score" in table  # 0.6 / 0.95
    assert "80 % of what the references keep through the model's VAE" in table  # 0.6 / 0.75
    assert "prompt fidelity = 100 % of the base model's" in table
    assert "+0.050 with prior vs +0.200 without" in table
    assert THROUGH_VAE not in summarise(runs, refs)  # older records without the VAE ceiling


def test_pattern_fidelity_is_summarised_where_every_run_has_it():
    """Runs recorded before pattern fidelity existed keep a dash in its column; newer ones get mean ± std."""
    runs = [_run(BASE, 0.4), _run(PRIOR, 0.6) | {"pattern_fidelity": 0.2}, _run(PRIOR, 0.6) | {"pattern_fidelity": 0.4}]
    s = summarise(runs, [{"subject_fidelity": 0.95, "prompt_fidelity": 1.0, "pattern_fidelity": 0.9}])
    assert "pattern_fidelity" not in s[BASE] and s[PRIOR]["pattern_fidelity"] == pytest.approx((0.3, 0.1))
    table = markdown({"summary": s, "concepts": ["a"], "seeds": 2, "machine": "m", "torch": "t", "date": "d",
                      "seconds": 60})
    assert f"| {BASE} | 0.400 ± 0.000 | — | 0.600 ± 0.000 |" in table
    assert f"| {PRIOR} | 0.600 ± 0.000 | 0.300 ± 0.100 |" in table
    assert f"| {REFERENCES} | 0.950 ± 0.000 | 0.900 ± 0.000 | 1.000 ± 0.000 |" in table


def test_lr_factor_warms_up_holds_and_cools_down_to_zero():
    assert lr_factor(0, 0.0, warmup=100, cooldown=0.0) == pytest.approx(0.01)
    assert lr_factor(500, 0.9, warmup=100, cooldown=0.0) == 1.0  # no cooldown: constant after warm-up
    assert lr_factor(500, 0.5, warmup=100, cooldown=0.2) == 1.0  # before the cooldown window
    assert lr_factor(500, 0.9, warmup=100, cooldown=0.2) == pytest.approx(0.5)  # half-way through it
    assert lr_factor(500, 1.2, warmup=100, cooldown=0.2) == 0.0  # past the budget
    assert lr_factor(500, 0.25, warmup=100, cooldown=1.0) == pytest.approx(0.75)  # the whole stage decays


def test_the_default_recipe_gets_its_own_target_line():
    from fewshot_personalize.kernels.demo.experiment import DEFAULT_METHOD

    runs = [_run(BASE, 0.4), _run(PRIOR, 0.6), _run(NOPRIOR, 0.7, drift=0.6), _run(DEFAULT_METHOD.name, 0.76, pf=0.3)]
    s = summarise(runs, [{"subject_fidelity": 0.95, "prompt_fidelity": 1.0}], [{"subject_fidelity": 0.8,
                                                                                 "prompt_fidelity": 0.9}])
    table = markdown({"summary": s, "concepts": ["a"], "seeds": 1, "machine": "m", "torch": "t", "date": "d",
                      "seconds": 60})
    assert (f"- the default recipe ({DEFAULT_METHOD.name}): subject fidelity = 80 % of the references' own score; "
            "95 % of what the references keep through the model's VAE; prompt fidelity = 50 % of the base model's"
            ) in table


def test_a_rewarmed_extension_gets_a_schedule_of_its_own():
    """A finished 600 s run extended to 660 s: stretched, the extension starts inside the new cooldown at 45 % of the
    peak; re-warmed at 0.6 it climbs to 0.6 of the peak, holds, and cools down to zero at the new end."""
    assert scheduled_factor(5000, 600, 660, cooldown=0.2) == pytest.approx((1 - 600 / 660) / 0.2)
    rewarm = (600.0, 5000, 0.6)
    assert scheduled_factor(5000, 600, 660, 0.2, rewarm) == pytest.approx(0.6 / 100)  # the first warm-up step
    assert scheduled_factor(5200, 630, 660, 0.2, rewarm) == pytest.approx(0.6)  # warmed up, before the cooldown
    assert scheduled_factor(5400, 654, 660, 0.2, rewarm) == pytest.approx(0.6 * 0.5)  # half-way through it
    assert scheduled_factor(5500, 660, 660, 0.2, rewarm) == 0.0
