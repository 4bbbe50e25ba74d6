"""The OBS building blocks (factor of H⁻¹, output error, the sweep) against their simple forms."""

import pytest
import torch

from irr_callback.core import obs
from irr_callback.core.identify import removal_mask


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


def _right_looking_sweep(delta, upper, safety, blocksize):
    """The textbook form: explicit U = chol(H⁻¹), every column's error pushed onto all later columns."""
    w = delta.clone()
    removed_all = torch.zeros_like(w, dtype=torch.bool)
    for i1 in range(0, w.shape[1], blocksize):
        i2 = min(i1 + blocksize, w.shape[1])
        removed = removal_mask(w[:, i1:i2], safety[:, i1:i2])
        removed_all[:, i1:i2] = removed
        for c in range(i1, i2):
            e = w[:, c] * removed[:, c - i1] / upper[c, c]
            w[:, c + 1 :] -= torch.outer(e, upper[c, c + 1 :])
        w[:, i1:i2][removed] = 0.0
    return w, removed_all


@pytest.mark.parametrize("blocksize", [1, 16, 128])
def test_left_looking_sweep_with_reversed_cholesky_equals_right_looking_with_inverse(blocksize):
    g = torch.Generator().manual_seed(3)
    delta = torch.randn(40, 300, generator=g, dtype=torch.float64)
    safety = torch.sign(torch.randn(40, 300, generator=g)).to(torch.int8)
    h = _spd(300, seed=4)
    expected, expected_mask = _right_looking_sweep(delta, obs.upper_cholesky_of_inverse(h), safety, blocksize)

    def select(i1, i2, block):
        return removal_mask(block, safety[:, i1:i2])

    before = delta.clone()
    new, err_sq, change_sq, mask = obs.obs_sweep(delta, obs.reversed_cholesky(h), select, blocksize=blocksize)
    torch.testing.assert_close(new, expected, rtol=1e-9, atol=1e-11)
    assert torch.equal(mask, expected_mask) and torch.equal(new[mask], torch.zeros(int(mask.sum()), dtype=new.dtype))
    assert torch.equal(delta, before)  # the input is never modified
    torch.testing.assert_close(change_sq, (new - delta).square().sum(dim=1), rtol=1e-10, atol=1e-14)


def test_reversed_cholesky_and_its_inverse():
    h = _spd(300, seed=8)
    root = obs.reversed_cholesky(h)
    assert torch.equal(root, root.triu())
    torch.testing.assert_close(root @ root.t(), h, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(
        obs.upper_cholesky_of_inverse(h) @ root, torch.eye(300, dtype=h.dtype), rtol=0, atol=1e-9
    )
