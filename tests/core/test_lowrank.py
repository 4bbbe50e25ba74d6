"""`core.lowrank`: the rank-constrained optimum of the recalibration objective against a float64 brute force.

The brute force never uses the completed square ‖Δ′ − Δ̃‖²_H: it writes the objective from the layer's inputs
(squared output errors on the calibration and safety tokens, the ridge and the damping), finds its quadratic
form with autograd, and the best rank-r matrix by eigen-decomposition.
"""

from __future__ import annotations

import pytest
import torch

from irr_callback.core import RealignSettings, realign_group
from irr_callback.core.lowrank import rank_constrained_group, top_triplets
from irr_callback.core.realign import SafetyTerms


OUT, IN, TOKENS, SAFETY_TOKENS, TRAINED = 12, 10, 6, 5, 3


def _world(seed=0):
    g = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    scale = torch.linspace(0.2, 3, IN, dtype=torch.float64)[:, None]
    return {
        "delta": randn(OUT, TRAINED) @ randn(TRAINED, IN) * 0.3,  # a LoRA delta: rank TRAINED
        "base": randn(OUT, IN),
        "x_d": randn(IN, TOKENS) * scale,  # fewer tokens than inputs: ridge and damping matter
        "x_s": randn(IN, SAFETY_TOKENS) * scale,  # the safety stream, through the realigned layers
        "x_a": randn(IN, SAFETY_TOKENS) * scale,  # the same tokens through the aligned model
        "signs": randn(OUT, IN),
    }


def _gram(x, y=None):
    return 2 * x @ (x if y is None else y).T / x.shape[1]


def _inputs(w, term):
    """(H_d, SafetyTerms or None, λ) of a world for a safety term: None (λ = 0), 'delta' or 'aligned'."""
    if term is None:
        return _gram(w["x_d"]), None, 0.0
    h_s = _gram(w["x_s"])
    if term == "delta":
        return _gram(w["x_d"]), SafetyTerms(h_s), 0.7
    return _gram(w["x_d"]), SafetyTerms(h_s, [w["base"]], _gram(w["x_a"], w["x_s"]), _gram(w["x_a"])), 0.7


def _objective(w, term, settings):
    """f(X): the objective the solver minimises, from the inputs (tokens), with its ridge ε and damping δ."""
    h_d = _gram(w["x_d"])
    weight = 0.0 if term is None else settings.safety_weight
    ridge = settings.ridge * float(h_d.diagonal().mean()) if weight else 0.0
    combined = h_d + (weight * _gram(w["x_s"]) if weight else 0) + ridge * torch.eye(IN, dtype=torch.float64)
    damping = settings.percdamp * float(combined.diagonal().mean())
    n_d, n_s = TOKENS, SAFETY_TOKENS

    def f(x):
        task = (
            2 * ((x - w["delta"]) @ w["x_d"]).square().sum() / n_d
            + (ridge + damping) * (x - w["delta"]).square().sum()
        )
        if term is None:
            return task
        if term == "delta":
            safety = 2 * (x @ w["x_s"]).square().sum() / n_s
        else:
            safety = 2 * ((w["base"] + x) @ w["x_s"] - w["base"] @ w["x_a"]).square().sum() / n_s
        return task + weight * safety

    return f


def _brute(f, rank):
    """(Δ̃, the best rank-r X, f at it): f = tr(X H Xᵀ) − 2 tr(X Gᵀ) + c from autograd; X_r = P_r P_rᵀ Δ̃ with
    P_r the top eigenvectors of Δ̃ H Δ̃ᵀ (Eckart-Young in the H^½-whitened space)."""
    zero = torch.zeros(OUT, IN, dtype=torch.float64, requires_grad=True)
    grad0 = torch.autograd.grad(f(zero), zero)[0]  # −2G
    probe = torch.eye(IN, dtype=torch.float64)
    h = torch.stack([torch.autograd.grad(f(zero + torch.outer(torch.eye(OUT, dtype=torch.float64)[0], probe[j])),
                                         zero)[0][0] for j in range(IN)])  # fmt: skip
    h = (h - grad0[0]) / 2  # row j: (2 e_j H)/2
    optimum = torch.linalg.solve(h, (-grad0 / 2).T).T
    _, vecs = torch.linalg.eigh(optimum @ h @ optimum.T)
    p = vecs[:, vecs.shape[1] - rank :] if rank else vecs[:, :0]
    best = p @ p.T @ optimum
    with torch.no_grad():
        return optimum, best, float(f(best))


@pytest.mark.parametrize("term", [None, "delta", "aligned"])
@pytest.mark.parametrize("rank", [0, 1, 2, 3, 6, 10])
def test_rank_constrained_is_the_best_rank_r_solution_of_the_objective(term, rank):
    w = _world()
    h_d, safety, weight = _inputs(w, term)
    settings = RealignSettings(mode="none", safety_weight=weight, ridge=0.1, percdamp=0.01)
    f = _objective(w, term, settings)
    [(solved, _)] = realign_group(
        [w["delta"]], [None], [None], h_d, names=["m"], settings=settings, **_solver_terms(safety)
    )
    [found] = rank_constrained_group(
        [w["delta"]], [solved], h_d, settings=settings, names=["m"], ranks=[rank], safety=safety, trained_ranks=[3]
    )
    optimum, best, f_best = _brute(f, rank)
    approx = found.b @ found.a
    assert found.rank == rank and found.exact and found.trained_rank == 3
    assert torch.linalg.matrix_rank(approx) <= rank if rank else torch.count_nonzero(approx) == 0
    f_found, f_opt = float(f(approx)), float(f(optimum))
    assert float(f(solved)) == pytest.approx(f_opt, rel=1e-9, abs=1e-10)  # the solver's Δ′ is f's optimum
    assert f_found == pytest.approx(f_best, rel=1e-9, abs=1e-10)  # the best rank-r solution
    assert found.objective_gap == pytest.approx(f_found - f_opt, rel=1e-7, abs=1e-9)  # the reported gap
    energy = float(f(2 * optimum) - 2 * f(optimum) + f(torch.zeros_like(optimum))) / 2  # ‖Δ̃‖²_H
    assert found.relative_gap == pytest.approx((f_found - f_opt) / energy, rel=1e-7, abs=1e-10)
    if term is None and rank >= TRAINED:  # λ = 0: Δ̃ = Δ has the trained rank, so that rank is exact
        assert found.objective_gap == pytest.approx(0.0, abs=1e-9)
    if term is not None and 0 < rank < IN:  # factoring under H_d alone (the old adapter) is worse under f
        [old] = rank_constrained_group(
            [w["delta"]], [solved], h_d, settings=RealignSettings(mode="none"), names=["m"], ranks=[rank]
        )
        assert f_found <= float(f(old.b @ (old.a))) + 1e-12
        plain_u, plain_s, plain_vh = torch.linalg.svd(optimum)  # nor is the plain SVD of Δ̃
        assert f_found <= float(f((plain_u[:, :rank] * plain_s[:rank]) @ plain_vh[:rank])) + 1e-12


def _solver_terms(safety):
    if safety is None:
        return {}
    if safety.cross is None:
        return {"safety_hessian": safety.hessian}
    return {
        "safety_hessian": safety.hessian,
        "bases": safety.bases,
        "safety_cross": safety.cross,
        "aligned_hessian": safety.aligned_hessian,
    }


@pytest.mark.parametrize("term", [None, "aligned"])
def test_with_a_removal_mask_the_truncation_is_an_approximation_whose_gap_is_measured(term):
    w = _world(seed=1)
    h_d, safety, weight = _inputs(w, term)
    settings = RealignSettings(mode="sign", safety_weight=weight, ridge=0.1, percdamp=0.01)
    f = _objective(w, term, settings)
    [(solved, stats)] = realign_group(
        [w["delta"]], [w["signs"]], [None], h_d, names=["m"], settings=settings, **_solver_terms(safety)
    )
    assert stats.removed > 0
    for rank in (1, 3, 5):
        [found] = rank_constrained_group(
            [w["delta"]], [solved], h_d, settings=settings, names=["m"], ranks=[rank], safety=safety
        )
        approx = found.b @ found.a
        assert not found.exact and found.rank == rank
        assert found.objective_gap == pytest.approx(float(f(approx) - f(solved)), rel=1e-7, abs=1e-9)
        _, _, f_best = _brute(f, rank)  # the unmasked rank-r optimum is a lower bound
        assert float(f(approx)) >= f_best - 1e-9


def test_tolerance_gives_the_smallest_rank_within_it_and_groups_split_by_rows():
    w = _world(seed=2)
    h_d, safety, weight = _inputs(w, "aligned")
    other = torch.randn(7, IN, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    settings = RealignSettings(mode="none", safety_weight=weight)
    deltas = [w["delta"], other]
    terms = SafetyTerms(safety.hessian, [w["base"], torch.zeros(7, IN, dtype=torch.float64)], safety.cross,
                        safety.aligned_hessian)  # fmt: skip
    for tolerance in (1e-3, 0.05, 0.3, 0.9):
        found = rank_constrained_group(
            deltas,
            deltas,
            h_d,
            settings=settings,
            names=["a", "b"],
            ranks=[None, 2],
            tolerance=tolerance,
            safety=terms,
        )
        assert found[1].rank == 2 and found[0].b.shape[0] == OUT and found[1].b.shape[0] == 7
        gaps = [
            rank_constrained_group(
                deltas, deltas, h_d, settings=settings, names=["a", "b"], ranks=[k, 2], safety=terms
            )[0].relative_gap
            for k in range(IN + 1)
        ]
        smallest = next(k for k, gap in enumerate(gaps) if gap <= tolerance**2)
        assert found[0].rank == smallest


def test_zero_delta_rank_cap_and_float32():
    w = _world(seed=3)
    h_d = _gram(w["x_d"])
    settings = RealignSettings(mode="none")
    zero = torch.zeros(OUT, IN, dtype=torch.float64)
    [z] = rank_constrained_group([zero], [zero], h_d, settings=settings, names=["m"], ranks=[4])
    assert z.rank == 0 and z.objective_gap == 0.0 and z.relative_gap == 0.0
    full = torch.randn(OUT, IN, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    [capped] = rank_constrained_group([full], [full], h_d, settings=settings, names=["m"], ranks=[99])
    assert capped.rank == IN and abs(capped.objective_gap) < 1e-9
    torch.testing.assert_close(capped.b @ capped.a, full)
    [f32] = rank_constrained_group(
        [full.float()], [full.float()], h_d.float(), settings=settings, names=["m"], ranks=[4]
    )
    [f64] = rank_constrained_group([full], [full], h_d, settings=settings, names=["m"], ranks=[4])
    assert f32.b.dtype == torch.float32
    torch.testing.assert_close((f32.b @ f32.a).double(), f64.b @ f64.a, rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("decay", [0.7, 0.97, 1.0])
def test_randomized_top_triplets_match_the_full_svd(decay):
    """The randomized SVD's rank-k truncation loses (almost) no more than the exact one, on spectra from fast
    decay to flat, and leaves the caller's RNG stream alone."""
    g = torch.Generator().manual_seed(0)
    m, n, k = 400, 300, 16
    u, _ = torch.linalg.qr(torch.randn(m, n, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    s = decay ** torch.arange(n, dtype=torch.float64) * (1 + 0.1 * torch.rand(n, generator=g, dtype=torch.float64))
    s = s.sort(descending=True).values
    matrix = (u * s) @ v.T
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    uk, sk, wk = top_triplets(matrix, k)
    assert torch.equal(torch.rand(3), expected_next)  # the caller's RNG stream is untouched
    exact = float(s[k:].square().sum())
    lost = float((matrix - (uk * sk) @ wk.T).square().sum())
    assert uk.shape == (m, k) and wk.shape == (n, k)
    assert lost <= exact * (1 + (1e-9 if decay < 0.9 else 0.05))
    torch.testing.assert_close(sk, s[:k], rtol=1e-9 if decay < 0.9 else 0.05, atol=0)
    again = top_triplets(matrix, k)  # reproducible
    assert torch.equal(again[1], sk)
