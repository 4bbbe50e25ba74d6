"""Golden tests of the safety-regularised objective against literal float64 least-squares solves.

The reference never uses a Cholesky factor or the OBS recursion: the start point is the solution
of the normal equations of the unconstrained problem, and the masked sweep is written as what it
is, column by column a constrained least-squares solve in which the columns already processed are
fixed (removed ones at zero) and every later column is re-solved.
"""

import pytest
import torch

from irr_callback.core import realign_matrix
from irr_callback.core.identify import removal_mask

from .test_math import literal_irr, make_case


def safety_case(cols=20, seed=0, tokens=48):
    g = torch.Generator().manual_seed(1000 + seed)
    x = torch.randn(tokens, cols, generator=g, dtype=torch.float64)
    x[:, :3] *= 3.0  # harmful inputs excite some directions far more than task inputs do
    return 2 * x.t() @ x / tokens


def literal_objective_matrices(hessian, safety_hessian, weight, ridge, percdamp):
    """(A, H): the task metric H_d + εI (+ damping, dead inputs filled) and H = A + λH_s, literally."""
    cols = hessian.shape[0]
    h_d = hessian.clone().double()
    live = torch.diag(h_d) != 0
    eps = ridge * float(torch.diag(h_d)[live].mean())
    excited = live | (torch.diag(safety_hessian) != 0)
    h_d += torch.diag(torch.where(excited, eps, 0.0).double())
    h = h_d + weight * safety_hessian
    dead = torch.diag(h) == 0
    for c in torch.nonzero(dead).flatten().tolist():
        h[c, c] = 1.0
        h_d[c, c] = 1.0
    damp = percdamp * float(torch.mean(torch.diag(h)))
    eye = torch.eye(cols, dtype=torch.float64)
    return h_d + damp * eye, h + damp * eye, dead


def literal_regularised(
    delta,
    safety,
    hessian,
    safety_hessian,
    *,
    weight,
    ridge=0.1,
    percdamp=0.01,
    blocksize=128,
    mode="sign",
    fixed_mask=None,
    aligned=None,
):
    """`aligned` = (W_A, X_r, X_A) for the aligned-target safety term (2/n)‖X_r(x + a) − X_A a‖² per row."""
    a, h, dead = literal_objective_matrices(hessian, safety_hessian, weight, ridge, percdamp)
    rhs = a @ delta.double().t()  # normal equations of the explicit objective: (A + λH_s) x = A δ (+ cross part)
    if aligned is not None:
        w_a, x_r, x_a = aligned
        rhs = rhs + weight * (2.0 / x_r.shape[0]) * x_r.t() @ (x_a - x_r) @ w_a.t()
    target = torch.linalg.solve(h, rhs).t()
    x = target.clone()
    x[:, dead] = 0.0
    target[:, dead] = 0.0
    cols = x.shape[1]
    mask = None
    for j in range(cols):
        if fixed_mask is not None:
            x[fixed_mask[:, j], j] = 0.0
        else:
            if j % blocksize == 0:
                i2 = min(j + blocksize, cols)
                mask = removal_mask(x[:, j:i2], safety[:, j:i2], mode=mode)
            x[mask[:, j - j // blocksize * blocksize], j] = 0.0
        fixed, rest = slice(0, j + 1), slice(j + 1, cols)
        if j + 1 < cols:  # later columns: argmin (x − t)ᵀ H (x − t) with columns ≤ j fixed
            gap = (x[:, fixed] - target[:, fixed]).t()
            x[:, rest] = target[:, rest] - torch.linalg.solve(h[rest, rest], h[rest, fixed] @ gap).t()
    x[:, dead] = 0.0
    return x


WEIGHTS = [0.05, 0.5, 3.0]


@pytest.mark.parametrize("weight", WEIGHTS)
@pytest.mark.parametrize("mode", ["none", "sign", "random"])
@pytest.mark.parametrize("blocksize", [1, 7, 128])
def test_regularised_equals_literal_least_squares(weight, mode, blocksize):
    delta, safety, _, hessian = make_case(rows=5, cols=20, seed=blocksize)
    h_s = safety_case(cols=20, seed=blocksize)
    kwargs = dict(remove_ratio=0.3) if mode == "random" else {}
    ours, stats = realign_matrix(
        delta,
        None if mode == "none" else safety,
        None,
        hessian,
        mode=mode,
        blocksize=blocksize,
        safety_hessian=h_s,
        safety_weight=weight,
        ridge=0.1,
        fallback_to_removal=False,
        **kwargs,
    )
    if mode == "random":  # the random mask is not a function of the values: take the sweep's own
        ref = literal_regularised(delta, None, hessian, h_s, weight=weight, fixed_mask=ours == 0)
    else:
        ref = literal_regularised(delta, safety, hessian, h_s, weight=weight, blocksize=blocksize, mode=mode)
    torch.testing.assert_close(ours, ref, rtol=1e-8, atol=1e-9)
    task = ((ref - delta) @ hessian * (ref - delta)).sum()
    assert stats.error_recalibrated == pytest.approx(float(task), rel=1e-7)
    assert stats.error_safety == pytest.approx(float((ref @ h_s * ref).sum()), rel=1e-7)
    assert stats.safety_weight == weight
    if mode == "none":
        assert stats.removed == 0 and stats.conflicts == 0


def test_empty_mask_is_the_closed_form_merge():
    delta, _, _, hessian = make_case(rows=4, cols=12, seed=3)
    h_s = safety_case(cols=12, seed=3)
    ours, _ = realign_matrix(
        delta, None, None, hessian, mode="none", safety_hessian=h_s, safety_weight=0.7, ridge=0.0, percdamp=0.0
    )
    expected = torch.linalg.solve(hessian + 0.7 * h_s, hessian @ delta.t()).t()  # RegMean-style merge
    torch.testing.assert_close(ours, expected, rtol=1e-8, atol=1e-9)


@pytest.mark.parametrize("blocksize", [1, 128])
def test_zero_weight_is_irr_bit_for_bit(blocksize):
    delta, safety, importance, hessian = make_case(rows=6, cols=20, seed=blocksize)
    h_s = safety_case(cols=20)
    plain, plain_stats = realign_matrix(delta, safety, importance, hessian, remove_ratio=0.5, blocksize=blocksize)
    zero, zero_stats = realign_matrix(
        delta,
        safety,
        importance,
        hessian,
        remove_ratio=0.5,
        blocksize=blocksize,
        safety_hessian=h_s,
        safety_weight=0.0,
        ridge=0.3,
    )
    assert torch.equal(plain, zero)
    assert zero_stats.error_recalibrated == plain_stats.error_recalibrated and zero_stats.error_safety is None
    ref = literal_irr(
        delta,
        safety,
        importance,
        hessian,
        remove_ratio=0.5,
        remove_more=False,
        recalibrate=True,
        blocksize=blocksize,
        percdamp=0.01,
    )
    torch.testing.assert_close(zero, ref, rtol=1e-9, atol=1e-9)


def test_larger_weight_moves_the_layer_toward_the_aligned_one_on_safety_inputs():
    delta, _, _, hessian = make_case(rows=6, cols=16, seed=5)
    h_s = safety_case(cols=16, seed=5)
    safety_err, task_err = [], []
    for weight in (0.0001, 0.1, 1.0, 10.0):
        _, stats = realign_matrix(delta, None, None, hessian, mode="none", safety_hessian=h_s, safety_weight=weight)
        safety_err.append(stats.error_safety)
        task_err.append(stats.error_recalibrated)
    assert safety_err == sorted(safety_err, reverse=True) and task_err == sorted(task_err)


def test_dead_inputs_of_both_streams_revert_and_safety_only_inputs_are_solved():
    delta, safety, _, _ = make_case(rows=4, cols=10, seed=23)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(50, 10, generator=g, dtype=torch.float64)
    x[:, 3] = 0.0
    x[:, 5] = 0.0
    xs = torch.randn(40, 10, generator=g, dtype=torch.float64)
    xs[:, 3] = 0.0  # input 3: no stream; input 5: only the safety stream
    h_d, h_s = 2 * x.t() @ x / 50, 2 * xs.t() @ xs / 40
    new, stats = realign_matrix(
        delta, safety, None, h_d, safety_hessian=h_s, safety_weight=0.5, fallback_to_removal=False
    )
    assert stats.dead_columns == 1 and torch.equal(new[:, 3], torch.zeros(4, dtype=torch.float64))
    ref = literal_regularised(delta, safety, h_d, h_s, weight=0.5)
    torch.testing.assert_close(new, ref, rtol=1e-8, atol=1e-9)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(safety_weight=-1.0, safety_hessian=torch.eye(6)), "safety_weight"),
        (dict(safety_weight=float("nan"), safety_hessian=torch.eye(6)), "safety_weight"),
        (dict(safety_weight=0.5), "safety stream's Hessian"),
        (dict(safety_weight=0.5, safety_hessian=torch.eye(5)), "safety Hessian shape"),
        (dict(safety_weight=0.5, safety_hessian=torch.full((6, 6), float("inf"))), "safety Hessian contains"),
        (dict(safety_weight=0.5, safety_hessian=torch.eye(6), recalibrate=False), "recalibrate=True"),
        (dict(safety_weight=0.5, safety_hessian=torch.eye(6), ridge=-0.1), "ridge"),
    ],
)
def test_bad_regularised_input_is_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        realign_matrix(torch.randn(4, 6), torch.randn(4, 6), None, torch.eye(6), **kwargs)


@pytest.mark.parametrize("mode", ["none", "sign"])
@pytest.mark.parametrize("blocksize", [1, 128])
def test_aligned_target_safety_term_equals_literal_least_squares(mode, blocksize):
    delta, safety, _, hessian = make_case(rows=5, cols=12, seed=7 + blocksize)
    g = torch.Generator().manual_seed(3)
    w_a = torch.randn(5, 12, generator=g, dtype=torch.float64)
    x_a = torch.randn(40, 12, generator=g, dtype=torch.float64)
    x_r = x_a + 0.3 * torch.randn(40, 12, generator=g, dtype=torch.float64)  # drifted inputs
    n = x_r.shape[0]
    h_s, h_a, cross = 2 * x_r.t() @ x_r / n, 2 * x_a.t() @ x_a / n, 2 * x_a.t() @ x_r / n
    ours, stats = realign_matrix(
        delta,
        None if mode == "none" else safety,
        None,
        hessian,
        mode=mode,
        blocksize=blocksize,
        safety_hessian=h_s,
        safety_weight=0.8,
        ridge=0.1,
        base=w_a,
        safety_cross=cross,
        aligned_hessian=h_a,
        fallback_to_removal=False,
    )
    ref = literal_regularised(
        delta, safety, hessian, h_s, weight=0.8, blocksize=blocksize, mode=mode, aligned=(w_a, x_r, x_a)
    )
    torch.testing.assert_close(ours, ref, rtol=1e-8, atol=1e-9)
    explicit = (2 / n) * ((x_r @ (w_a + ref).t() - x_a @ w_a.t()) ** 2).sum()
    assert stats.error_safety == pytest.approx(float(explicit), rel=1e-7)


def test_aligned_target_with_undrifted_inputs_is_the_plain_safety_term():
    delta, _, _, hessian = make_case(rows=4, cols=10, seed=2)
    h_s = safety_case(cols=10, seed=2)
    w_a = torch.randn(4, 10, dtype=torch.float64)
    plain, _ = realign_matrix(delta, None, None, hessian, mode="none", safety_hessian=h_s, safety_weight=0.5)
    cross, _ = realign_matrix(
        delta,
        None,
        None,
        hessian,
        mode="none",
        safety_hessian=h_s,
        safety_weight=0.5,
        base=w_a,
        safety_cross=h_s,
        aligned_hessian=h_s,
    )
    torch.testing.assert_close(cross, plain, rtol=1e-10, atol=1e-12)


def test_cross_inputs_go_together():
    with pytest.raises(ValueError, match="go together"):
        realign_matrix(
            torch.randn(4, 6),
            None,
            None,
            torch.eye(6),
            mode="none",
            safety_hessian=torch.eye(6),
            safety_weight=0.5,
            safety_cross=torch.eye(6),
        )
