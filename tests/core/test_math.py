"""Golden tests of the pure IRR math against a slow, literal float64 re-implementation."""

import math

import pytest
import torch

from irr_callback.core import (
    HessianAccumulator,
    NumericalError,
    factor_hessian,
    realign_group,
    realign_matrix,
    removal_mask,
    upper_cholesky_of_inverse,
)


# ----------------------------------------------------------------------------------------------
# The literal reference: the method document read line by line, one column at a time, no lazy
# batching, the upper Cholesky factor of H^-1 obtained the reference way.
# ----------------------------------------------------------------------------------------------
def literal_mask(block, safety, importance, remove_ratio, remove_more, mode, gen):
    rows, cols = block.shape
    entries = [(r, c) for r in range(rows) for c in range(cols)]
    conflict = {(r, c): torch.sign(block[r, c]) != torch.sign(safety[r, c]) for r, c in entries}
    if mode == "random":
        scores = torch.rand((rows, cols), generator=gen, dtype=torch.float64)
        eligible = entries
        score = {(r, c): float(scores[r, c]) for r, c in entries}
    elif mode == "no_sign":
        eligible = entries
        score = {(r, c): float(importance[r, c]) if importance is not None else 0.0 for r, c in entries}
    elif remove_more:
        eligible = entries
        score = {
            (r, c): (1 if conflict[(r, c)] else -1) * float(importance[r, c]) if importance is not None else 0.0
            for r, c in entries
        }
    else:
        eligible = [e for e in entries if conflict[e]]
        score = {(r, c): float(importance[r, c]) if importance is not None else 0.0 for r, c in entries}
    n = len(eligible)
    keep = int(math.floor(round(n * (1 - remove_ratio), 6)))
    ranked = sorted(eligible, key=lambda e: score[e])  # Python's sort is stable
    removed = set(ranked[keep:])
    mask = torch.zeros(rows, cols, dtype=torch.bool)
    for e in removed:
        mask[e] = True
    return mask


def literal_irr(
    delta,
    safety,
    importance,
    hessian,
    *,
    remove_ratio,
    remove_more,
    recalibrate,
    blocksize,
    percdamp,
    mode="sign",
    seed=0,
):
    w = delta.clone().double()
    rows, cols = w.shape
    gen = torch.Generator().manual_seed(seed)
    if not recalibrate:
        out = w.clone()
        for i1 in range(0, cols, blocksize):
            i2 = min(i1 + blocksize, cols)
            m = literal_mask(
                w[:, i1:i2],
                safety[:, i1:i2],
                None if importance is None else importance[:, i1:i2],
                remove_ratio,
                remove_more,
                mode,
                gen,
            )
            out[:, i1:i2][m] = 0.0
        return out
    h = hessian.clone().double()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    h += percdamp * torch.mean(torch.diag(h)) * torch.eye(cols, dtype=torch.float64)
    hinv = torch.cholesky_inverse(torch.linalg.cholesky(h))
    u = torch.linalg.cholesky(hinv, upper=True)
    mask = None
    for j in range(cols):
        if j % blocksize == 0:
            i2 = min(j + blocksize, cols)
            mask = literal_mask(
                w[:, j:i2],
                safety[:, j:i2],
                None if importance is None else importance[:, j:i2],
                remove_ratio,
                remove_more,
                mode,
                gen,
            )
            offset = j
        q = w[:, j].clone()
        q[mask[:, j - offset]] = 0.0
        e = (w[:, j] - q) / u[j, j]
        w[:, j + 1 :] -= torch.outer(e, u[j, j + 1 :])
        w[:, j] = q
    return w


def make_case(rows=6, cols=20, seed=0, dtype=torch.float64, tokens=64):
    g = torch.Generator().manual_seed(seed)
    delta = torch.randn(rows, cols, generator=g, dtype=dtype)
    safety = torch.randn(rows, cols, generator=g, dtype=dtype)
    importance = torch.rand(rows, cols, generator=g, dtype=dtype)
    x = torch.randn(tokens, cols, generator=g, dtype=dtype)
    hessian = 2 * x.t() @ x / tokens
    return delta, safety, importance, hessian


VARIANTS = [
    dict(remove_ratio=1.0, remove_more=False, recalibrate=True, mode="sign"),
    dict(remove_ratio=0.5, remove_more=False, recalibrate=True, mode="sign"),
    dict(remove_ratio=0.3, remove_more=True, recalibrate=True, mode="sign"),
    dict(remove_ratio=1.0, remove_more=True, recalibrate=True, mode="sign"),
    dict(remove_ratio=0.4, remove_more=False, recalibrate=True, mode="no_sign"),
    dict(remove_ratio=0.25, remove_more=False, recalibrate=True, mode="random"),
    dict(remove_ratio=0.7, remove_more=False, recalibrate=False, mode="sign"),
    dict(remove_ratio=1.0, remove_more=False, recalibrate=False, mode="sign"),
]


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: "-".join(f"{k}={v[k]}" for k in v))
@pytest.mark.parametrize("blocksize", [1, 7, 128])
def test_realign_matrix_matches_literal_loop(variant, blocksize):
    delta, safety, importance, hessian = make_case(rows=6, cols=20, seed=blocksize)
    ours, stats = realign_matrix(
        delta,
        safety,
        importance,
        hessian,
        blocksize=blocksize,
        percdamp=0.01,
        fallback_to_removal=False,
        **{k: v for k, v in variant.items()},
    )
    ref = literal_irr(delta, safety, importance, hessian, blocksize=blocksize, percdamp=0.01, **variant)
    assert ours.dtype == torch.float64
    torch.testing.assert_close(ours, ref, rtol=1e-9, atol=1e-9)
    assert stats.removed == int(((ref == 0) & (delta != 0)).sum())
    if variant["recalibrate"]:
        change = ref - delta
        assert stats.error_recalibrated == pytest.approx(float(((change @ hessian) * change).sum()), rel=1e-7)


def test_sweep_with_subblocks_equals_literal_on_wider_matrix():
    delta, safety, importance, hessian = make_case(rows=5, cols=70, seed=3)
    ours, _ = realign_matrix(delta, safety, importance, hessian, blocksize=32, remove_ratio=0.6)
    ref = literal_irr(
        delta,
        safety,
        importance,
        hessian,
        remove_ratio=0.6,
        remove_more=False,
        recalibrate=True,
        blocksize=32,
        percdamp=0.01,
    )
    torch.testing.assert_close(ours, ref, rtol=1e-9, atol=1e-9)


def test_float32_inputs_compute_in_float32_close_to_float64():
    delta, safety, importance, hessian = make_case(rows=8, cols=40, seed=5)
    ours32, _ = realign_matrix(delta.float(), safety.float(), importance.float(), hessian.float())
    ours64, _ = realign_matrix(delta, safety, importance, hessian)
    assert ours32.dtype == torch.float32
    torch.testing.assert_close(ours32.double(), ours64, rtol=1e-3, atol=1e-4)


def test_removed_entries_are_exact_zeros_and_kept_conflicts_absent():
    delta, safety, _, hessian = make_case(rows=10, cols=30, seed=7)
    # blocksize 1: the mask is taken on each column's final value, so no conflict can survive
    new, stats = realign_matrix(delta, safety, hessian=hessian, blocksize=1)
    assert not ((torch.sign(new) != torch.sign(safety)) & (new != 0)).any()
    assert stats.removed > 0 and stats.conflicts > 0


def test_recalibrate_false_equals_plain_masking():
    delta, safety, _, _ = make_case(rows=6, cols=12, seed=11)
    new, stats = realign_matrix(delta, safety, recalibrate=False)
    expected = torch.where(torch.sign(delta) != torch.sign(safety), torch.zeros_like(delta), delta)
    assert torch.equal(new, expected)
    assert stats.error_recalibrated is None and not stats.recalibrated


def test_recalibration_beats_plain_removal_when_well_conditioned():
    # correlated inputs (as real activations are): the kept deltas can absorb removed ones
    delta, safety, _, _ = make_case(rows=16, cols=24, seed=13)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(400, 8, generator=g, dtype=torch.float64) @ torch.randn(8, 24, generator=g, dtype=torch.float64)
    x += 0.1 * torch.randn(400, 24, generator=g, dtype=torch.float64)
    hessian = 2 * x.t() @ x / 400
    _, stats = realign_matrix(delta, safety, hessian=hessian)
    assert stats.error_recalibrated < 0.8 * stats.error_removal


def test_fallback_to_removal_when_recalibration_is_worse():
    # tiny damping on a rank-deficient H (6 tokens, 12 inputs): the compensation blows up
    delta, safety, _, hessian = make_case(rows=4, cols=12, seed=2, tokens=6)
    plain, _ = realign_matrix(delta, safety, recalibrate=False)
    kwargs = dict(hessian=hessian, percdamp=1e-6, blocksize=1)
    raw, raw_stats = realign_matrix(delta, safety, fallback_to_removal=False, **kwargs)
    assert raw_stats.error_recalibrated > raw_stats.error_removal and not raw_stats.fell_back_to_removal
    new, stats = realign_matrix(delta, safety, fallback_to_removal=True, **kwargs)
    assert stats.fell_back_to_removal and not stats.recalibrated
    assert torch.equal(new, plain)
    assert stats.removed == int((plain != delta).sum())


def test_no_fallback_when_recalibration_helps():
    delta, safety, _, hessian = make_case(rows=8, cols=16, seed=19, tokens=8)
    new, stats = realign_matrix(delta, safety, hessian=hessian, fallback_to_removal=True)
    plain, _ = realign_matrix(delta, safety, recalibrate=False)
    assert stats.error_recalibrated < stats.error_removal
    assert not stats.fell_back_to_removal and not torch.equal(new, plain)


def test_dead_input_columns_are_reverted_and_counted():
    delta, safety, _, _ = make_case(rows=4, cols=10, seed=23)
    x = torch.randn(50, 10, dtype=torch.float64)
    x[:, 3] = 0.0
    hessian = 2 * x.t() @ x / 50
    new, stats = realign_matrix(delta, safety, hessian=hessian)
    assert stats.dead_columns == 1
    assert torch.equal(new[:, 3], torch.zeros(4, dtype=torch.float64))


def test_group_equals_separate_matrices():
    d1, s1, f1, h = make_case(rows=5, cols=16, seed=29)
    d2, s2, f2, _ = make_case(rows=3, cols=16, seed=31)
    (g1, st1), (g2, st2) = realign_group(
        [d1, d2], [s1, s2], [f1, f2], h, names=["a", "b"], remove_ratio=0.5, blocksize=8
    )
    m1, _ = realign_matrix(d1, s1, f1, h, remove_ratio=0.5, blocksize=8)
    m2, _ = realign_matrix(d2, s2, f2, h, remove_ratio=0.5, blocksize=8)
    torch.testing.assert_close(g1, m1, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(g2, m2, rtol=1e-10, atol=1e-10)
    assert (st1.name, st2.name) == ("a", "b")


def test_int8_sign_safety_vector_gives_same_result():
    delta, safety, importance, hessian = make_case(rows=6, cols=20, seed=37)
    full, _ = realign_matrix(delta, safety, importance, hessian, remove_ratio=0.5)
    signs, _ = realign_matrix(delta, torch.sign(safety).to(torch.int8), importance, hessian, remove_ratio=0.5)
    assert torch.equal(full, signs)


def test_upper_cholesky_of_inverse_matches_reference_route():
    _, _, _, h = make_case(cols=30, seed=41)
    h += 0.01 * torch.eye(30, dtype=torch.float64)
    ref = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    torch.testing.assert_close(upper_cholesky_of_inverse(h), ref, rtol=1e-8, atol=1e-10)


def test_cholesky_retries_with_more_damping_then_reports():
    h = torch.tensor([[1.0, 2.0], [2.0, 1.0]], dtype=torch.float64)  # indefinite
    factor = factor_hessian(h, percdamp=0.01, max_retries=6, name="layers.0.q_proj")
    assert factor.retries > 0 and factor.damping > 0.01
    with pytest.raises(NumericalError, match="layers.0.q_proj"):
        factor_hessian(h, percdamp=0.01, max_retries=1, name="layers.0.q_proj")


def test_removal_mask_ranking_keeps_lowest_importance():
    delta = torch.tensor([[1.0, 1.0, 1.0, 1.0]])
    safety = -torch.ones(1, 4)  # all conflict
    importance = torch.tensor([[0.4, 0.1, 0.3, 0.2]])
    mask = removal_mask(delta, safety, importance, remove_ratio=0.5)
    assert mask.tolist() == [[True, False, True, False]]
    with pytest.raises(ValueError, match="importance"):
        removal_mask(delta, safety, None, remove_ratio=0.5)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(safety=torch.zeros(3, 5)), "safety vector shape"),
        (dict(importance=torch.zeros(3, 5), remove_ratio=0.5), "importance shape"),
        (dict(hessian=torch.eye(3)), "Hessian shape"),
        (dict(hessian=None), "needs a Hessian"),
        (dict(remove_ratio=0.5), "no importance"),
        (dict(delta=torch.full((4, 6), float("nan"))), "NaN or Inf"),
    ],
)
def test_bad_input_is_named(kwargs, match):
    args = dict(delta=torch.randn(4, 6), safety=torch.randn(4, 6), importance=None, hessian=torch.eye(6))
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        realign_matrix(args.pop("delta"), args.pop("safety"), args.pop("importance"), args.pop("hessian"), **args)


def test_hessian_accumulator_masks_padding_and_merges():
    x = torch.randn(2, 5, 3)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    acc = HessianAccumulator(3)
    acc.add(x, mask)
    real = torch.cat([x[0, :3], x[1]])
    torch.testing.assert_close(acc.finalize(), 2 * real.t() @ real / 8)
    half1, half2 = HessianAccumulator(3), HessianAccumulator(3)
    half1.add(x[:1], mask[:1])
    half2.add(x[1:], mask[1:])
    half1.merge(half2)
    torch.testing.assert_close(half1.finalize(), acc.finalize())
    with pytest.raises(ValueError, match="no calibration tokens"):
        HessianAccumulator(3).finalize()
