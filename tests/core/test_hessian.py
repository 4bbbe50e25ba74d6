"""The Hessian accumulator (upper block triangle, padding masked) equals the dense formula."""

import pytest
import torch


@pytest.mark.parametrize("cols,block", [(700, 256), (96, 256), (300, 64)])
def test_upper_block_triangle_hessian_equals_dense(cols, block):
    from irr_callback.core import HessianAccumulator

    g = torch.Generator().manual_seed(9)
    x = torch.randn(3, 11, cols, generator=g, dtype=torch.float64)
    mask = (torch.rand(3, 11, generator=g) > 0.2).long()
    acc = HessianAccumulator(cols, dtype=torch.float64, block=block)
    acc.add(x[:2], mask[:2])
    acc.add(x[2:], mask[2:])
    real = x[mask.bool()]
    h = acc.finalize()
    torch.testing.assert_close(h, 2.0 * real.t() @ real / real.shape[0], rtol=1e-12, atol=1e-12)


def test_integer_mask_counts_a_token_as_many_times_as_its_weight():
    """`calibration_answer_weight`: a token of weight k enters H exactly as k copies of it would."""
    from irr_callback.core import HessianAccumulator

    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 5, 16, generator=g, dtype=torch.float64)
    weights = torch.tensor([[1, 3, 0, 1, 2], [0, 1, 1, 4, 1]])
    weighted = HessianAccumulator(16, dtype=torch.float64)
    weighted.add(x, weights)
    copies = HessianAccumulator(16, dtype=torch.float64)
    copies.add(x.reshape(-1, 16).repeat_interleave(weights.reshape(-1), dim=0))
    assert weighted.tokens == copies.tokens == 14
    torch.testing.assert_close(weighted.finalize(), copies.finalize(), rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="non-negative integers"):
        weighted.add(x, weights.double() * 1.5)
