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
