"""A group of matrices sharing one H (q/k/v, gate/up) gives the single-matrix results."""

import pytest
import torch

from irr_callback.core import obs
from irr_callback.core.realign import realign_group, realign_matrix


def _spd(n, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, n + 7, generator=g, dtype=dtype)
    return x @ x.t() / n + 0.05 * torch.eye(n, dtype=dtype)


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


def test_group_given_as_row_blocks_of_one_buffer_is_not_copied_and_gives_the_same_result():
    from irr_callback.core.realign import one_matrix

    g = torch.Generator().manual_seed(11)
    h = _spd(64, seed=12)
    buffer = torch.randn(48, 64, generator=g, dtype=torch.float64)
    views = [buffer[0:32], buffer[32:48]]
    copies = [v.clone() for v in views]
    assert one_matrix(views, torch.float64, "cpu") is buffer
    assert one_matrix(copies, torch.float64, "cpu") is not buffer
    assert one_matrix([buffer[32:48], buffer[0:32]], torch.float64, "cpu").data_ptr() != buffer.data_ptr()
    safeties = [torch.sign(torch.randn(v.shape, generator=g)).to(torch.int8) for v in views]
    from_views = realign_group(views, safeties, [None, None], h, names=["gate", "up"], fallback_to_removal=True)
    from_copies = realign_group(copies, safeties, [None, None], h, names=["gate", "up"], fallback_to_removal=True)
    for (a, sa), (b, sb) in zip(from_views, from_copies):
        assert torch.equal(a, b) and sa.error_removal == sb.error_removal
    assert torch.equal(buffer, torch.cat(copies))  # never written


@pytest.mark.parametrize("remove_ratio", [1.0, 0.5])
def test_group_counts_per_module_match_the_masks(remove_ratio):
    """The per-module counts are taken from row blocks of column-major masks (no int64 widening):
    they must equal plain counts on each module's own tensors."""
    g = torch.Generator().manual_seed(3)
    deltas = [torch.randn(r, 48, generator=g) for r in (20, 36)]
    safeties = [torch.sign(torch.randn(d.shape, generator=g)).to(torch.int8) for d in deltas]
    scores = [torch.rand(d.shape, generator=g) for d in deltas]
    x = torch.randn(300, 48, generator=g)
    h = 2 * x.t() @ x / 300
    results = realign_group(
        deltas,
        safeties,
        scores,
        h,
        names=["a", "b"],
        remove_ratio=remove_ratio,
        blocksize=16,
        fallback_to_removal=False,
    )
    for d, s, (new, stats) in zip(deltas, safeties, results):
        assert stats.conflicts == int((torch.sign(d) != torch.sign(s)).sum())
        assert stats.removed == int(((new == 0) & (d != 0)).sum()) > 0  # removed entries are exactly 0
        assert stats.dead_columns == 0
