"""`core.lowrank`: the H-weighted low-rank factors against float64 brute force."""

from __future__ import annotations

import pytest
import torch

from irr_callback.core.lowrank import damped_cholesky, rank_for_tolerance, weighted_lowrank


def _problem(out=12, inp=10, tokens=6, seed=0):
    """A delta and a rank-deficient H (fewer tokens than inputs: the damping matters)."""
    g = torch.Generator().manual_seed(seed)
    delta = torch.randn(out, inp, generator=g, dtype=torch.float64)
    x = (
        torch.randn(inp, tokens, generator=g, dtype=torch.float64)
        * torch.linspace(0.2, 3, inp, dtype=torch.float64)[:, None]
    )
    return delta, 2 * x @ x.T / tokens


def _damped(hessian, percdamp):
    return hessian + percdamp * hessian.diagonal().mean() * torch.eye(hessian.shape[0], dtype=hessian.dtype)


def _h_error(change, hessian):
    return float(torch.trace(change @ hessian @ change.T))


@pytest.mark.parametrize("k", [0, 1, 3, 7, 10])
def test_error_is_the_weighted_output_error_and_the_optimum(k):
    delta, hessian = _problem()
    f = weighted_lowrank(delta, hessian, percdamp=0.01, rank=k)
    hd = _damped(hessian, 0.01)
    approx = f.b @ f.a
    assert f.rank == k and approx.shape == delta.shape
    # reported error = ‖(Δ − BA)L‖ / ‖ΔL‖, computed directly
    expected = (_h_error(delta - approx, hd) / _h_error(delta, hd)) ** 0.5
    assert f.error == pytest.approx(expected, rel=1e-9, abs=1e-12)
    # the optimum (Eckart-Young in the weighted space): the smallest eigenvalues of Δ H_d Δᵀ
    eig = torch.linalg.eigvalsh(delta @ hd @ delta.T).flip(0).clamp_min(0)
    assert _h_error(delta - approx, hd) == pytest.approx(float(eig[k:].sum()), rel=1e-8, abs=1e-10)
    if 0 < k < 10:  # the plain (Frobenius) SVD at the same rank is no better under H
        u, s, vh = torch.linalg.svd(delta, full_matrices=False)
        plain = (u[:, :k] * s[:k]) @ vh[:k]
        assert _h_error(delta - approx, hd) <= _h_error(delta - plain, hd) * (1 + 1e-9)


def test_rank_for_tolerance_is_the_smallest_rank_within_it():
    delta, hessian = _problem(seed=1)
    for tolerance in (0.0, 0.05, 0.2, 0.5, 0.9):
        f = weighted_lowrank(delta, hessian, percdamp=0.01, tolerance=tolerance)
        errors = [weighted_lowrank(delta, hessian, percdamp=0.01, rank=k).error for k in range(11)]
        brute = next(k for k, e in enumerate(errors) if e <= tolerance + 1e-12)
        assert f.rank == brute and f.error <= tolerance + 1e-12
    assert rank_for_tolerance(torch.tensor([3.0, 4.0]), 0.8) == 1  # tail 4/5 = 0.8: within
    assert rank_for_tolerance(torch.tensor([3.0, 4.0]), 0.79) == 2


def test_zero_delta_fixed_rank_cap_and_output_error():
    delta, hessian = _problem(seed=2)
    zero = weighted_lowrank(torch.zeros_like(delta), hessian, percdamp=0.01, tolerance=0.1)
    assert zero.rank == 0 and zero.error == 0.0
    capped = weighted_lowrank(delta, hessian, percdamp=0.01, rank=99)
    assert capped.rank == 10 and capped.error < 1e-7
    torch.testing.assert_close(capped.b @ capped.a, delta)
    weight = delta + 5 * torch.randn(delta.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    f = weighted_lowrank(delta, hessian, percdamp=0.01, rank=2, weight=weight)
    hd = _damped(hessian, 0.01)
    assert f.output_error == pytest.approx((_h_error(delta - f.b @ f.a, hd) / _h_error(weight, hd)) ** 0.5, rel=1e-9)
    with pytest.raises(ValueError, match="exactly one"):
        weighted_lowrank(delta, hessian, percdamp=0.01)


def test_damped_cholesky_handles_dead_inputs_and_float32():
    _, hessian = _problem(seed=4)
    hessian[3, :] = hessian[:, 3] = 0  # an input never seen
    lower = damped_cholesky(hessian, 0.01)
    diag = hessian.diagonal()
    damping = 0.01 * float(torch.where(diag == 0, torch.ones_like(diag), diag).mean())  # dead inputs count 1
    expected = hessian + damping * torch.eye(10, dtype=torch.float64)
    torch.testing.assert_close(lower @ lower.T, expected, rtol=1e-9, atol=1e-9)
    delta, _ = _problem(seed=4)
    f32 = weighted_lowrank(delta.float(), hessian.float(), percdamp=0.01, rank=4)
    f64 = weighted_lowrank(delta, hessian, percdamp=0.01, rank=4)
    assert f32.b.dtype == torch.float32 and f32.error == pytest.approx(f64.error, rel=1e-3)
