"""The fast paths give the same results as the simple ones (no timing here: see benchmarks/)."""

import pytest
import torch

import irr_callback as irr
from irr_callback import IRRConfig, realign
from irr_callback.core import obs
from irr_callback.core.identify import removal_mask
from irr_callback.core.realign import realign_group, realign_matrix
from tests.helpers import calibration, same_state, state, triple


def _spd(n, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, n + 7, generator=g, dtype=dtype)
    return x @ x.t() / n + 0.05 * torch.eye(n, dtype=dtype)


def test_upper_factor_equals_reference_chain():
    h = _spd(300)
    reference = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    torch.testing.assert_close(obs.upper_cholesky_of_inverse(h), reference, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("cols,block", [(700, 512), (64, 512), (300, 128)])
def test_symmetric_output_error_equals_dense(cols, block):
    g = torch.Generator().manual_seed(1)
    change = torch.randn(33, cols, generator=g, dtype=torch.float64)
    h = _spd(cols, seed=2)
    dense = ((change @ h) * change).sum(dim=1)
    torch.testing.assert_close(obs.output_error(change, h, blocksize=block), dense, rtol=1e-10, atol=1e-10)


def test_inplace_sweep_equals_copying_sweep():
    g = torch.Generator().manual_seed(3)
    delta = torch.randn(40, 300, generator=g, dtype=torch.float64)
    safety = torch.sign(torch.randn(40, 300, generator=g)).to(torch.int8)
    upper = obs.upper_cholesky_of_inverse(_spd(300, seed=4))

    def select(i1, i2, block):
        return removal_mask(block, safety[:, i1:i2])

    copy_out = obs.obs_sweep(delta, upper, select)
    work = delta.clone()
    inplace_out = obs.obs_sweep(work, upper, select, inplace=True)
    for a, b in zip(copy_out, inplace_out):
        assert torch.equal(a, b)
    assert inplace_out[0].data_ptr() == work.data_ptr()


def test_group_results_equal_single_matrix_results_and_errors():
    """Stacked sweeps (one factorisation) equal per-module `realign_matrix`, errors included."""
    g = torch.Generator().manual_seed(5)
    h = _spd(96, seed=6)
    deltas = [torch.randn(r, 96, generator=g, dtype=torch.float64) for r in (32, 16, 16)]
    safeties = [torch.sign(torch.randn(d.shape, generator=g)).to(torch.int8) for d in deltas]
    grouped = realign_group(deltas, safeties, [None] * 3, h, names=["q", "k", "v"], fallback_to_removal=True)
    for d, s, (new, stats) in zip(deltas, safeties, grouped):
        single, single_stats = realign_matrix(d, s, None, h, fallback_to_removal=True)
        torch.testing.assert_close(new, single, rtol=1e-10, atol=1e-12)
        assert stats.error_removal == pytest.approx(single_stats.error_removal, rel=1e-9)
        assert stats.error_recalibrated == pytest.approx(single_stats.error_recalibrated, rel=1e-9, abs=1e-12)
        dense_removal = float(obs.output_error(d * (torch.sign(d) != torch.sign(s.double())), h).sum())
        assert stats.error_removal == pytest.approx(dense_removal, rel=1e-9)


@pytest.mark.parametrize("where", ["disk", "cpu"])
def test_backup_restores_every_weight_bit_for_bit(monkeypatch, where):
    import irr_callback.driver as driver

    base, ft, unaligned = triple("llama", dtype=torch.bfloat16)
    v = irr.safety_vector(base, unaligned, sign_only=True)
    before = state(ft)
    original = driver.realign_group
    calls = {"n": 0}

    def failing(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 7:
            raise RuntimeError("boom")
        return original(*args, **kwargs)

    monkeypatch.setattr(driver, "realign_group", failing)
    with pytest.raises(RuntimeError, match="boom"):
        realign(ft, base=base, safety_vector=v, calibration=calibration(), config=IRRConfig(backup=where),
                progress=False)
    assert calls["n"] == 7
    assert same_state(before, state(ft))


def test_backup_field_is_validated():
    with pytest.raises(irr.IRRConfigError, match="backup"):
        IRRConfig(backup="gpu")
