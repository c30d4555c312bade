"""Mix-of-Show's gradient fusion (Gu et al., NeurIPS 2023, §3.3, Eq. 5) in closed form, checked against direct
least squares on the stacked activations, Mix-of-Show's LBFGS solver, and the SVD."""

from __future__ import annotations

import pytest
import torch

from fewshot_personalize.kernels.core.errors import UserInputError
from fewshot_personalize.kernels.multi_concept.fusion import (
    DEFAULT_RIDGE,
    FusionSums,
    GramAccumulator,
    average_of_deltas,
    fuse_layer,
    fuse_layer_lbfgs,
    fusion_objective,
    low_rank_difference,
    sum_of_deltas,
)

OUT, IN = 6, 8
F64 = torch.float64


def _problem(tokens: list[int], seed: int = 0, out: int = OUT, inp: int = IN):
    """Random W0, low-rank ΔW_i and activations X_i [n_i, in] (float64)."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(out, inp, generator=g, dtype=F64)
    deltas = [torch.randn(out, 2, generator=g, dtype=F64) @ torch.randn(2, inp, generator=g, dtype=F64) for _ in tokens]
    inputs = [torch.randn(n, inp, generator=g, dtype=F64) for n in tokens]
    return base, deltas, inputs


def _grams(inputs):
    return [x.T @ x for x in inputs]


def _lstsq_fused(base, deltas, inputs):
    """Eq. 5 solved directly: min ‖X Wᵀ − Y‖ on the stacked X = [X_1; …; X_N], Y = [X_1 A_1ᵀ; …] (min-norm Wᵀ)."""
    x = torch.cat(inputs)
    y = torch.cat([xi @ (base + d).T for xi, d in zip(inputs, deltas)])
    return torch.linalg.lstsq(x, y, driver="gelsd").solution.T


def _raw_objective(weight, base, deltas, inputs):
    return sum(float(((xi @ (base + d).T - xi @ weight.T) ** 2).sum()) for xi, d in zip(inputs, deltas))


def test_closed_form_equals_the_stacked_least_squares_optimum():
    base, deltas, inputs = _problem([20, 15, 25])
    fused = fuse_layer(base, deltas, _grams(inputs), ridge=1e-13)
    expected = _lstsq_fused(base, deltas, inputs)
    torch.testing.assert_close(fused, expected, rtol=1e-8, atol=1e-8)
    # and it differs from W0 and from each target, so the comparison is not vacuous
    assert (fused - base).abs().max() > 1e-2
    assert all((fused - base - d).abs().max() > 1e-2 for d in deltas)


def test_accumulators_are_accepted_as_grams_and_dtype_and_shape_come_back():
    base, deltas, inputs = _problem([20, 15])
    accumulators = []
    for x in inputs:
        acc = GramAccumulator()
        acc.add(x.float())
        accumulators.append(acc)
    fused = fuse_layer(base.float(), [d.float() for d in deltas], accumulators, ridge=1e-12)
    assert fused.dtype == torch.float32 and fused.shape == base.shape
    torch.testing.assert_close(fused.double(), _lstsq_fused(base.float().double(), [d.float().double() for d in deltas],
                                                            [x.float().double() for x in inputs]), rtol=1e-4, atol=1e-4)


def test_streaming_in_chunks_gives_the_gram_of_all_rows():
    g = torch.Generator().manual_seed(1)
    batches = [torch.randn(2, 5, IN, generator=g) for _ in range(3)]  # [B, L, in] chunks, float32
    streamed = GramAccumulator()
    for b in batches:
        streamed.add(b)
    rows = torch.cat([b.reshape(-1, IN) for b in batches]).double()
    at_once = GramAccumulator()
    at_once.add(rows)
    assert streamed.count == at_once.count == rows.shape[0]
    assert streamed.gram.dtype == F64
    torch.testing.assert_close(streamed.gram, rows.T @ rows, rtol=1e-12, atol=1e-10)
    torch.testing.assert_close(streamed.gram, at_once.gram, rtol=1e-12, atol=1e-10)


def test_mask_selects_rows_and_merge_sums():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(3, 7, IN, generator=g, dtype=F64)
    mask = torch.rand(3, 7, generator=g) > 0.4
    masked = GramAccumulator()
    masked.add(x, mask=mask)
    kept = x[mask]
    assert 0 < masked.count == kept.shape[0] < 21
    torch.testing.assert_close(masked.gram, kept.T @ kept)
    numeric = GramAccumulator()
    numeric.add(x, mask=mask.long())  # an attention mask of 0/1 numbers selects the same rows
    torch.testing.assert_close(numeric.gram, masked.gram)
    with pytest.raises(ValueError, match="0 and 1"):
        numeric.add(x, mask=mask.double() * 0.5)
    with pytest.raises(ValueError, match="mask has shape"):
        numeric.add(x, mask=mask[:, :3])

    other = GramAccumulator()
    other.add(x[~mask])
    masked.merge(other)
    assert masked.count == 21
    all_rows = x.reshape(-1, IN)
    torch.testing.assert_close(masked.gram, all_rows.T @ all_rows)
    with pytest.raises(ValueError, match="features"):
        masked.add(torch.zeros(2, IN + 1))


def test_orthogonal_inputs_each_concept_keeps_its_outputs_and_the_baselines_do_not():
    g = torch.Generator().manual_seed(3)
    basis, _ = torch.linalg.qr(torch.randn(IN, IN, generator=g, dtype=F64))
    base = torch.randn(OUT, IN, generator=g, dtype=F64)
    # concept 0 sees only the first 4 basis directions, concept 1 only the last 4
    inputs = [torch.randn(30, 4, generator=g, dtype=F64) @ basis[:, :4].T,
              torch.randn(30, 4, generator=g, dtype=F64) @ basis[:, 4:].T]
    deltas = [torch.randn(OUT, IN, generator=g, dtype=F64) for _ in range(2)]
    fused = fuse_layer(base, deltas, _grams(inputs), ridge=1e-8)  # the solve itself (the default ridge shrinks)
    candidates = {"sum": sum_of_deltas(base, deltas), "average": average_of_deltas(base, deltas)}
    for x, d in zip(inputs, deltas):
        target = x @ (base + d).T
        fused_error = float((x @ fused.T - target).norm() / target.norm())
        assert fused_error < 1e-3
        for name, weight in candidates.items():
            baseline_error = float((x @ weight.T - target).norm() / target.norm())
            assert baseline_error > 100 * fused_error, (name, baseline_error, fused_error)
    torch.testing.assert_close(candidates["sum"], base + deltas[0] + deltas[1])
    torch.testing.assert_close(candidates["average"], base + (deltas[0] + deltas[1]) / 2)


def test_rank_deficient_inputs_stay_finite_near_the_optimum_and_take_the_average_where_unseen():
    base, deltas, inputs = _problem([2, 3], seed=4)  # 5 tokens < 8 features: Σ G_i is singular
    grams = _grams(inputs)
    fused = fuse_layer(base, deltas, grams, ridge=1e-6)
    assert torch.isfinite(fused).all()
    optimum = _lstsq_fused(base, deltas, inputs)
    best = fusion_objective(optimum, base, deltas, grams)
    scale = fusion_objective(base, base, deltas, grams)  # the objective of not fusing at all
    assert best < 1e-3 * scale  # the optimum really is better than W0, so the next check has teeth
    assert fusion_objective(fused, base, deltas, grams) - best < 1e-4 * scale
    # input directions no concept reaches take the ridge's anchor, the weight average (not the min-norm W)
    unseen = torch.linalg.svd(torch.cat(inputs)).Vh[5:]  # [3, in], orthogonal to every recorded row
    average = average_of_deltas(base, deltas)
    torch.testing.assert_close(unseen @ fused.T, unseen @ average.T, rtol=1e-6, atol=1e-6)
    assert (unseen @ optimum.T - unseen @ average.T).abs().max() > 1e-2  # min-norm W would not


def test_objective_from_grams_equals_objective_from_raw_activations():
    base, deltas, inputs = _problem([9, 12, 5], seed=5)
    weight = base + 0.3 * torch.randn(OUT, IN, generator=torch.Generator().manual_seed(6), dtype=F64)
    raw = _raw_objective(weight, base, deltas, inputs)
    assert raw > 1.0
    assert fusion_objective(weight, base, deltas, _grams(inputs)) == pytest.approx(raw, rel=1e-10)


def test_lbfgs_reaches_the_closed_form_objective_and_never_beats_it():
    base, deltas, inputs = _problem([20, 16], seed=7)
    grams = _grams(inputs)
    closed = fuse_layer(base, deltas, grams, ridge=1e-12)
    iterative = fuse_layer_lbfgs(base, deltas, inputs, iterations=100, dtype=F64)
    assert iterative.dtype == F64 and iterative.shape == base.shape
    closed_value = fusion_objective(closed, base, deltas, grams)
    lbfgs_value = fusion_objective(iterative, base, deltas, grams)
    start = fusion_objective(base, base, deltas, grams)
    assert lbfgs_value < 0.5 * start  # it did optimise (the concepts conflict: the optimum is not 0)
    assert lbfgs_value - closed_value < 1e-6 * start
    assert closed_value <= lbfgs_value + 1e-9 * start
    # its loss is the raw sum of squared errors, the same objective as fusion_objective
    assert _raw_objective(iterative, base, deltas, inputs) == pytest.approx(lbfgs_value, rel=1e-9)


def test_one_by_one_conv_weights_are_flattened_and_restored():
    base, deltas, inputs = _problem([20, 15], seed=8)
    fused = fuse_layer(base[:, :, None, None], [d[:, :, None, None] for d in deltas], _grams(inputs))
    assert fused.shape == (OUT, IN, 1, 1)
    torch.testing.assert_close(fused[:, :, 0, 0], fuse_layer(base, deltas, _grams(inputs)))
    down, up = low_rank_difference(fused - base[:, :, None, None], rank=IN)
    assert down.shape == (OUT, IN) and up.shape == (OUT, OUT)  # rank clamped to min(out, in) = 6
    with pytest.raises(ValueError, match="1x1 conv"):
        fuse_layer(torch.zeros(OUT, IN, 3, 3), [torch.zeros(OUT, IN, 3, 3)], [torch.eye(IN)])


def test_low_rank_difference_is_exact_at_the_true_rank_and_eckart_young_below():
    g = torch.Generator().manual_seed(9)
    diff = torch.randn(10, 3, generator=g, dtype=F64) @ torch.randn(3, 12, generator=g, dtype=F64)
    down, up = low_rank_difference(diff, rank=3)
    assert down.shape == (3, 12) and up.shape == (10, 3)
    torch.testing.assert_close(up @ down, diff, rtol=1e-10, atol=1e-10)

    full = torch.randn(10, 12, generator=g, dtype=F64)
    singular = torch.linalg.svdvals(full)
    for rank in (1, 4):
        down, up = low_rank_difference(full, rank)
        error = float((full - up @ down).norm())
        assert error == pytest.approx(float(singular[rank:].pow(2).sum().sqrt()), rel=1e-10)
        # √σ split: both factors carry the same singular values
        torch.testing.assert_close(torch.linalg.svdvals(up), singular[:rank].sqrt())
        torch.testing.assert_close(torch.linalg.svdvals(down), singular[:rank].sqrt())
    with pytest.raises(ValueError, match="rank"):
        low_rank_difference(full, 0)


def test_bad_input_is_refused_with_a_message_naming_the_problem():
    base, deltas, inputs = _problem([5, 6], seed=10)
    grams = _grams(inputs)
    with pytest.raises(UserInputError, match="at least one concept"):
        fuse_layer(base, [], [])
    with pytest.raises(ValueError, match=r"concept 1's LoRA difference has shape \(6, 7\)"):
        fuse_layer(base, [deltas[0], deltas[1][:, :7]], grams)
    with pytest.raises(ValueError, match=r"concept 0's Gram matrix has shape \(7, 7\)"):
        fuse_layer(base, deltas, [grams[0][:7, :7], grams[1]])
    with pytest.raises(ValueError, match="2 LoRA differences but 1 Gram"):
        fuse_layer(base, deltas, grams[:1])
    with pytest.raises(ValueError, match="all zero"):
        fuse_layer(base, deltas, [torch.zeros(IN, IN)] * 2)
    with pytest.raises(ValueError, match="ridge"):
        fuse_layer(base, deltas, grams, ridge=-1.0)
    with pytest.raises(ValueError, match=r"concept 1's activations have shape \(6, 7\)"):
        fuse_layer_lbfgs(base, deltas, [inputs[0], inputs[1][:, :7]], iterations=3)
    with pytest.raises(ValueError, match="at least one concept"):
        sum_of_deltas(base, [])
    with pytest.raises(ValueError, match="LoRA difference has shape"):
        average_of_deltas(base, [deltas[0].T])
    with pytest.raises(ValueError, match="weight has shape"):
        fusion_objective(base.T, base, deltas, grams)


def test_sums_accumulated_concept_by_concept_give_the_same_fused_weight():
    base, deltas, inputs = _problem([20, 12, 30], seed=5)
    sums = FusionSums()
    for d, x in zip(deltas, inputs):
        acc = GramAccumulator()
        acc.add(x.view(2, -1, IN) if len(x) % 2 == 0 else x)
        sums.add(d, acc)  # the concept's Gram can be dropped now
    assert torch.allclose(sums.solve(base, 1e-6), fuse_layer(base, deltas, _grams(inputs), 1e-6), atol=1e-10)
    assert torch.allclose(sums.solve(base, 0.0), _lstsq_fused(base, deltas, inputs), atol=1e-8)
    with pytest.raises(UserInputError, match="at least one concept"):
        FusionSums().solve(base)


def test_recorded_grams_equal_the_inputs_gram_and_hooks_are_removed_however_recording_ends():
    from fewshot_personalize.kernels.multi_concept.fusion import record_grams

    g = torch.Generator().manual_seed(3)
    a, b = torch.nn.Linear(5, 3), torch.nn.Linear(5, 2)
    xs = [torch.randn(2, 7, 5, generator=g) for _ in range(3)]
    seen = []
    grams = record_grams({"a": a, "b": b}, lambda: [a(x) for x in xs] + [b(xs[0])],
                         tap=lambda n, x: seen.append(n))
    rows = torch.cat([x.reshape(-1, 5) for x in xs]).double()
    torch.testing.assert_close(grams["a"].gram.double(), rows.T @ rows)
    assert seen.count("a") == 3 and seen.count("b") == 1
    assert not a._forward_pre_hooks and not b._forward_pre_hooks
    with pytest.raises(UserInputError, match="layer b saw no input while testing"):
        record_grams({"a": a, "b": b}, lambda: a(xs[0]), what="testing")

    def fail():
        a(xs[0])
        raise KeyboardInterrupt  # a cancel in the middle of recording

    with pytest.raises(KeyboardInterrupt):
        record_grams({"a": a}, fail)
    assert not a._forward_pre_hooks


def test_difference_is_the_solution_minus_the_base():
    from fewshot_personalize.kernels.multi_concept.fusion import FusionSums

    g = torch.Generator().manual_seed(4)
    base = torch.randn(3, 6, generator=g)
    sums = FusionSums()
    for _ in range(2):
        x = torch.randn(20, 6, generator=g)
        sums.add(torch.randn(3, 6, generator=g), x.T @ x)
    torch.testing.assert_close(sums.difference(1e-3).float(), sums.solve(base, 1e-3) - base, atol=1e-5, rtol=1e-5)


def _prompts_with_shared_padding(concepts: int, prompts: int, seed: int, width: int = 32, pads: int = 40,
                                 offset: float = 0.02):
    """Text-feature-like inputs, recorded and held out: per prompt the concept's own token row, then many padding
    rows that are one shared vector plus a small prompt-dependent offset (what a causal text encoder gives after
    the last word). Concepts differ only in those offsets, along directions of tiny variance; held-out prompts
    have new offsets."""
    g = torch.Generator().manual_seed(seed)
    pad = torch.randn(width, generator=g, dtype=F64)
    tokens = [torch.randn(width, generator=g, dtype=F64) for _ in range(concepts)]

    def rows(i: int) -> torch.Tensor:
        shifted = pad + offset * torch.randn(width, generator=g, dtype=F64)
        return torch.stack([tokens[i]] + [shifted] * pads)

    return [[torch.cat([rows(i) for _ in range(prompts)]) for i in range(concepts)] for _ in ("recorded", "held out")]


def test_concepts_that_agree_get_their_common_weight_back_whatever_the_ridge():
    base, deltas, inputs = _problem([7, 9, 5], seed=6)
    same = [deltas[0]] * 3
    for ridge in (1e-8, DEFAULT_RIDGE, 10.0):
        torch.testing.assert_close(fuse_layer(base, same, _grams(inputs), ridge=ridge), base + deltas[0])


def test_default_ridge_does_not_extrapolate_along_directions_that_only_tell_the_concepts_apart():
    # The least-squares optimum fits each concept's padding rows exactly by a large weight along the tiny offsets
    # between them, which new prompts' offsets then amplify (on the demo model, 4 fused concepts drew noise).
    # The default ridge keeps the fused difference the size of the concepts' own and reproduces each concept
    # better on prompts it was not fitted to.
    g = torch.Generator().manual_seed(1)
    base = torch.randn(16, 32, generator=g, dtype=F64) / 32 ** 0.5
    deltas = [torch.randn(16, 4, generator=g, dtype=F64) @ torch.randn(4, 32, generator=g, dtype=F64) * 0.05
              for _ in range(4)]
    recorded, held_out = (_grams(x) for x in _prompts_with_shared_padding(4, 2, seed=2))
    largest = max(float(d.norm()) for d in deltas)
    optimum, default = fuse_layer(base, deltas, recorded, ridge=1e-8), fuse_layer(base, deltas, recorded)
    assert fusion_objective(optimum, base, deltas, recorded) < fusion_objective(default, base, deltas, recorded)
    assert float((optimum - base).norm()) > 4 * largest  # the failure is real in this problem
    assert float((default - base).norm()) < largest
    assert fusion_objective(default, base, deltas, held_out) < 0.9 * fusion_objective(optimum, base, deltas, held_out)
