"""Golden tests of the three-stream objective (calibration, safety, retain) against literal float64 solves.

    minimise ‖(Δ′ − Δ)X_d‖²·2/n_d + ρ‖(Δ′ − Δ)X_r‖²·2/n_r + ε‖Δ′ − Δ‖² + λ‖W′X_s − W_A X_A‖²·2/n_s

With an empty mask the reference is `torch.linalg.lstsq` on the explicitly stacked, weighted rows of
every term (no Hessian, no Cholesky factor); with a removal mask it is the column-by-column
constrained least-squares sweep of `test_regularised.py` on the task metric H_d + ρH_r, and with λ = 0
the paper's literal IRR (`test_math.literal_irr`) on that metric.
"""

import pytest
import torch

from irr_callback.core import realign_matrix
from irr_callback.core.realign import FineTunedTerms

from .test_math import literal_irr, make_case
from .test_regularised import literal_regularised


def streams(cols=12, seed=0):
    """Token matrices (tokens, cols) of the calibration, retain, safety and aligned-safety streams, and W_A."""
    g = torch.Generator().manual_seed(500 + seed)
    x_d = torch.randn(40, cols, generator=g, dtype=torch.float64)
    x_d[:, -3:] *= 0.05  # the task barely excites the last inputs: the retain stream does
    x_r = torch.randn(30, cols, generator=g, dtype=torch.float64)
    x_r[:, -3:] *= 4.0
    x_a = torch.randn(24, cols, generator=g, dtype=torch.float64)
    x_s = x_a + 0.3 * torch.randn(24, cols, generator=g, dtype=torch.float64)
    w_a = torch.randn(5, cols, generator=g, dtype=torch.float64)
    return x_d, x_r, x_s, x_a, w_a


def gram(x):
    return 2 * x.t() @ x / x.shape[0]


def stacked_least_squares(delta, x_d, x_r, x_s, x_a, w_a, *, retain, weight, ridge):
    """Every term as explicit weighted rows of one least-squares problem per output row; lstsq solves it."""
    cols = delta.shape[1]
    eps = ridge * float(torch.diag(gram(x_d) + retain * gram(x_r)).mean())
    blocks = [
        (2 / x_d.shape[0]) ** 0.5 * x_d,
        (2 * retain / x_r.shape[0]) ** 0.5 * x_r,
        eps**0.5 * torch.eye(cols, dtype=torch.float64),
    ]
    design = torch.cat([*blocks, (2 * weight / x_s.shape[0]) ** 0.5 * x_s])
    out = []
    for d, a in zip(delta, w_a):
        keep = torch.cat([b @ d for b in blocks])  # the task, retain and ridge terms: stay at Δ
        safe = (2 * weight / x_s.shape[0]) ** 0.5 * (x_a @ a - x_s @ a)  # X_s(a + x) ≈ X_A a
        out.append(torch.linalg.lstsq(design, torch.cat([keep, safe]).unsqueeze(1), driver="gelsd").solution[:, 0])
    return torch.stack(out)


@pytest.mark.parametrize("retain", [0.0, 0.5, 3.0])
@pytest.mark.parametrize("weight", [0.3, 2.0])
def test_empty_mask_equals_stacked_least_squares(retain, weight):
    delta, _, _, _ = make_case(rows=5, cols=12, seed=4)
    x_d, x_r, x_s, x_a, w_a = streams()
    ours, stats = realign_matrix(
        delta,
        None,
        None,
        gram(x_d),
        mode="none",
        percdamp=0.0,
        ridge=0.1,
        safety_weight=weight,
        safety_hessian=gram(x_s),
        base=w_a,
        safety_cross=2 * x_a.t() @ x_s / x_s.shape[0],
        aligned_hessian=gram(x_a),
        retain_weight=retain,
        retain_hessian=gram(x_r),
    )
    ref = stacked_least_squares(delta, x_d, x_r, x_s, x_a, w_a, retain=retain, weight=weight, ridge=0.1)
    torch.testing.assert_close(ours, ref, rtol=1e-6, atol=1e-8)  # lstsq vs Cholesky, cond ~1e4
    change = ref - delta
    task = (2 / x_d.shape[0]) * ((x_d @ change.t()) ** 2).sum() + retain * (2 / x_r.shape[0]) * (
        (x_r @ change.t()) ** 2
    ).sum()
    assert stats.error_recalibrated == pytest.approx(float(task), rel=1e-7)  # the task metric H_d + ρH_r
    if retain:
        assert stats.error_retain == pytest.approx(float((2 / x_r.shape[0]) * ((x_r @ change.t()) ** 2).sum()))
        assert stats.retain_weight == retain
    else:
        assert stats.error_retain is None


@pytest.mark.parametrize("weight", [0.0, 0.5])
@pytest.mark.parametrize("mode", ["sign", "random"])
@pytest.mark.parametrize("blocksize", [1, 5, 128])
def test_masked_three_stream_sweep_equals_literal(weight, mode, blocksize):
    delta, safety, _, _ = make_case(rows=5, cols=12, seed=blocksize)
    x_d, x_r, x_s, _, _ = streams(seed=blocksize)
    h_d, h_r, h_s = gram(x_d), gram(x_r), gram(x_s)
    kwargs = dict(remove_ratio=0.4) if mode == "random" else {}
    ours, _ = realign_matrix(
        delta,
        safety,
        None,
        h_d,
        mode=mode,
        blocksize=blocksize,
        safety_weight=weight,
        safety_hessian=h_s,
        retain_weight=0.7,
        retain_hessian=h_r,
        fallback_to_removal=False,
        **kwargs,
    )
    metric = h_d + 0.7 * h_r
    if weight == 0:  # the paper's IRR on the task metric H_d + ρH_r
        ref = literal_irr(
            delta,
            safety,
            None,
            metric,
            remove_ratio=kwargs.get("remove_ratio", 1.0),
            remove_more=False,
            recalibrate=True,
            blocksize=blocksize,
            percdamp=0.01,
            mode=mode,
        )
    elif mode == "random":  # the random mask is not a function of the values: take the sweep's own
        ref = literal_regularised(delta, None, metric, h_s, weight=weight, fixed_mask=ours == 0)
    else:
        ref = literal_regularised(delta, safety, metric, h_s, weight=weight, blocksize=blocksize, mode=mode)
    torch.testing.assert_close(ours, ref, rtol=1e-8, atol=1e-9)
    if mode == "sign":
        assert bool((ours == 0).any())  # the mask removed something: the masked path was exercised


@pytest.mark.parametrize("weight", [0.0, 0.5])
def test_zero_retain_weight_is_bit_for_bit_without_the_retain_stream(weight):
    delta, safety, importance, hessian = make_case(rows=6, cols=20, seed=9)
    _, x_r, x_s, _, _ = streams(cols=20)
    common = dict(remove_ratio=0.5, safety_weight=weight, safety_hessian=gram(x_s) if weight else None)
    without, stats = realign_matrix(delta, safety, importance, hessian, **common)
    with_data, with_stats = realign_matrix(
        delta, safety, importance, hessian, retain_weight=0.0, retain_hessian=gram(x_r), **common
    )
    assert torch.equal(without, with_data)
    assert stats.error_recalibrated == with_stats.error_recalibrated and with_stats.error_retain is None


def test_retain_term_keeps_the_fine_tuned_layer_on_retain_inputs():
    """The larger ρ, the less the safety term changes the layer's outputs on the retain tokens."""
    delta, _, _, _ = make_case(rows=5, cols=12, seed=2)
    x_d, x_r, x_s, _, _ = streams(seed=2)
    errors = []
    for retain in (0.0, 0.3, 3.0, 30.0):
        new, _ = realign_matrix(
            delta,
            None,
            None,
            gram(x_d),
            mode="none",
            safety_weight=1.0,
            safety_hessian=gram(x_s),
            retain_weight=retain,
            retain_hessian=gram(x_r),
        )
        errors.append(float(((x_r @ (new - delta).t()) ** 2).sum()))
    assert errors == sorted(errors, reverse=True) and errors[-1] < 0.1 * errors[0]


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(retain_weight=-1.0, retain_hessian=torch.eye(6)), "retain_weight"),
        (dict(retain_weight=float("nan"), retain_hessian=torch.eye(6)), "retain_weight"),
        (dict(retain_weight=0.5), "retain stream's Hessian"),
        (dict(retain_weight=0.5, retain_hessian=torch.eye(5)), "retain Hessian shape"),
        (dict(retain_weight=0.5, retain_hessian=torch.full((6, 6), float("nan"))), "retain Hessian contains"),
        (dict(retain_weight=0.5, retain_hessian=torch.eye(6), recalibrate=False), "recalibrate=True"),
    ],
)
def test_bad_retain_input_is_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        realign_matrix(torch.randn(4, 6), torch.randn(4, 6), None, torch.eye(6), **kwargs)


def fine_tuned_pairs(x_d, x_r, seed=9):
    """Each task-side stream's inputs in the fine-tuned model (drifted from the realigned model's), and the pairs."""
    g = torch.Generator().manual_seed(seed)
    x_fd = x_d + 0.2 * torch.randn(x_d.shape, generator=g, dtype=torch.float64)
    x_fr = x_r + 0.2 * torch.randn(x_r.shape, generator=g, dtype=torch.float64)
    terms = FineTunedTerms(
        2 * x_fd.t() @ x_d / x_d.shape[0], gram(x_fd), 2 * x_fr.t() @ x_r / x_r.shape[0], gram(x_fr)
    )
    return x_fd, x_fr, terms


@pytest.mark.parametrize("retain", [0.0, 0.7])
@pytest.mark.parametrize("weight", [0.3, 2.0])
def test_fine_tuned_target_equals_stacked_least_squares(retain, weight):
    """`task_term="fine-tuned"`: ‖W′X_d − W_F X_F‖² (+ ρ‖W′X_r − W_F X_Fr‖²) against lstsq on the stacked rows, and
    the reported task term is that literal value (not ‖Δ′ − Δ‖²_H)."""
    delta, _, _, _ = make_case(rows=5, cols=12, seed=4)
    x_d, x_r, x_s, x_a, w_a = streams()
    x_fd, x_fr, terms = fine_tuned_pairs(x_d, x_r)
    ours, stats = realign_matrix(
        delta, None, None, gram(x_d), mode="none", percdamp=0.0, ridge=0.1, safety_weight=weight,
        safety_hessian=gram(x_s), base=w_a, safety_cross=2 * x_a.t() @ x_s / x_s.shape[0], aligned_hessian=gram(x_a),
        retain_weight=retain, retain_hessian=gram(x_r), fine_tuned=terms,
    )  # fmt: skip
    eps = 0.1 * float(torch.diag(gram(x_d) + retain * gram(x_r)).mean())
    c_d, c_r, c_s = (2 / x_d.shape[0]) ** 0.5, (2 * retain / x_r.shape[0]) ** 0.5, (2 * weight / x_s.shape[0]) ** 0.5
    design = torch.cat([c_d * x_d, c_r * x_r, eps**0.5 * torch.eye(12, dtype=torch.float64), c_s * x_s])
    rows = []
    for d, a in zip(delta, w_a):  # unknown: the row's Δ′ = x, W′ = a + x; W_F = a + d
        f = a + d
        target = torch.cat(
            [c_d * (x_fd @ f - x_d @ a), c_r * (x_fr @ f - x_r @ a), eps**0.5 * d, c_s * (x_a @ a - x_s @ a)]
        )
        rows.append(torch.linalg.lstsq(design, target.unsqueeze(1), driver="gelsd").solution[:, 0])
    ref = torch.stack(rows)
    torch.testing.assert_close(ours, ref, rtol=1e-6, atol=1e-8)
    new, fine = w_a + ref, w_a + delta
    task = (
        c_d**2 * ((x_d @ new.t() - x_fd @ fine.t()) ** 2).sum()
        + c_r**2 * ((x_r @ new.t() - x_fr @ fine.t()) ** 2).sum()
    )
    assert stats.error_recalibrated == pytest.approx(float(task), rel=1e-7)


def test_fine_tuned_target_without_drift_is_the_delta_task_term():
    """When the realigned model's inputs are still the fine-tuned model's (C_d = H_d = H_F), the term is
    ‖(Δ′ − Δ)X_d‖²: the same solve as without it."""
    delta, _, _, _ = make_case(rows=5, cols=12, seed=4)
    x_d, x_r, x_s, x_a, w_a = streams()
    common = dict(
        mode="none", percdamp=0.01, ridge=0.1, safety_weight=0.5, safety_hessian=gram(x_s), base=w_a,
        safety_cross=2 * x_a.t() @ x_s / x_s.shape[0], aligned_hessian=gram(x_a), retain_weight=0.7,
        retain_hessian=gram(x_r),
    )  # fmt: skip
    plain, _ = realign_matrix(delta, None, None, gram(x_d), **common)
    same = FineTunedTerms(gram(x_d), gram(x_d), gram(x_r), gram(x_r))
    paired, _ = realign_matrix(delta, None, None, gram(x_d), fine_tuned=same, **common)
    torch.testing.assert_close(paired, plain, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("mode", ["sign", "random"])
def test_fine_tuned_target_with_a_mask_is_the_masked_sweep_from_its_optimum(mode):
    """With a removal mask the sweep starts from the fine-tuned target's unconstrained optimum Δ̃ under the same H:
    it keeps Δ′ = 0 on the mask, and with nothing drifted it is the delta term's masked solve."""
    delta, safety, _, _ = make_case(rows=5, cols=12, seed=6)
    x_d, x_r, x_s, x_a, w_a = streams(seed=6)
    _, _, drifted = fine_tuned_pairs(x_d, x_r)
    kwargs = dict(
        mode=mode, safety_weight=0.5, safety_hessian=gram(x_s), base=w_a, safety_cross=2 * x_a.t() @ x_s / x_s.shape[0],
        aligned_hessian=gram(x_a), retain_weight=0.7, retain_hessian=gram(x_r), fallback_to_removal=False,
        **(dict(remove_ratio=0.4) if mode == "random" else {}),
    )  # fmt: skip
    plain, plain_stats = realign_matrix(delta, safety, None, gram(x_d), **kwargs)
    same = FineTunedTerms(gram(x_d), gram(x_d), gram(x_r), gram(x_r))
    undrifted, _ = realign_matrix(delta, safety, None, gram(x_d), fine_tuned=same, **kwargs)
    torch.testing.assert_close(undrifted, plain, rtol=1e-7, atol=1e-9)
    moved, stats = realign_matrix(delta, safety, None, gram(x_d), fine_tuned=drifted, **kwargs)
    assert stats.removed > 0 and plain_stats.removed > 0  # the sign mask follows the sweep: counts may differ
    assert not torch.allclose(moved, plain)
    removed = (moved == 0) & (delta != 0)
    assert int(removed.sum()) >= stats.removed
