"""Hessian accumulation H = 2·XXᵀ/n over calibration tokens, padding excluded.

Keeps the raw sum Σxxᵀ (float32) and the token count so that statistics from several batches or
several processes can be added exactly and normalised once. Σxxᵀ is symmetric, so only its upper
block triangle is accumulated (~40% fewer flops at 1024–4096 columns) and mirrored once at the end.
"""

from __future__ import annotations

import torch


class HessianAccumulator:
    """Running Σ xxᵀ (upper block triangle: blocks below the diagonal stay zero until `finalize`)
    and token count of one layer input."""

    def __init__(
        self, columns: int, *, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32, block: int = 256
    ):
        self.sum = torch.zeros(columns, columns, device=device, dtype=dtype)
        self.tokens = 0
        self.block = block

    def add(self, inputs: torch.Tensor, token_mask: torch.Tensor | None = None) -> None:
        """Add a batch of inputs (..., columns); `token_mask` (same leading shape) selects real tokens. An
        integer mask may count a token k > 1 times (as if it were k tokens: `calibration_answer_weight`)."""
        x = inputs.reshape(-1, inputs.shape[-1])
        count = None
        if token_mask is not None:
            weights = token_mask.reshape(-1).to(device=x.device)
            keep = weights.bool()
            if keep.numel() != x.shape[0]:
                raise ValueError(f"token mask has {keep.numel()} positions but the input has {x.shape[0]} tokens")
            if not bool(keep.all()):  # no copy of the activations when nothing is padding
                x, weights = x[keep], weights[keep]
            if weights.numel() and bool((weights > 1).any()):
                if weights.is_floating_point() or bool((weights < 0).any()):
                    raise ValueError("token mask weights must be non-negative integers")
                count = int(weights.sum())
                x = x.to(self.sum.dtype) * weights.to(self.sum.dtype).sqrt().unsqueeze(1)
        if x.shape[0] == 0:
            return
        x = x.to(self.sum.dtype)
        for b0 in range(0, x.shape[1], self.block):
            b1 = min(b0 + self.block, x.shape[1])
            self.sum[b0:b1, b0:].addmm_(x[:, b0:b1].t(), x[:, b0:])
        self.tokens += x.shape[0] if count is None else count

    def merge(self, other: HessianAccumulator) -> None:
        self.sum += other.sum.to(self.sum.device)
        self.tokens += other.tokens

    def finalize(self) -> torch.Tensor:
        """H = 2·Σxxᵀ / n. Raises if no token was seen (e.g. calibration made only of padding)."""
        if self.tokens == 0:
            raise ValueError("no calibration tokens reached this layer (is the calibration data all padding?)")
        h = self.sum * (2.0 / self.tokens)
        for b0 in range(0, h.shape[0], self.block):  # mirror the upper block triangle
            b1 = min(b0 + self.block, h.shape[0])
            h[b1:, b0:b1] = h[b0:b1, b1:].t()
        return h


class CrossAccumulator:
    """Running Σ a bᵀ over paired tokens of two input streams (a: the aligned model's input of a module,
    b: the realigned model's input at the same token): the cross Gram the safety term needs when it
    targets the aligned model's own outputs. Not symmetric, so the whole matrix is accumulated."""

    def __init__(self, columns: int, *, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
        self.sum = torch.zeros(columns, columns, device=device, dtype=dtype)
        self.tokens = 0

    def add(self, first: torch.Tensor, second: torch.Tensor, token_mask: torch.Tensor | None = None) -> None:
        """Add paired batches (..., columns) of the same token layout; `token_mask` selects real tokens."""
        a = first.reshape(-1, first.shape[-1])
        b = second.reshape(-1, second.shape[-1])
        if a.shape != b.shape:
            raise ValueError(f"paired inputs differ in shape: {tuple(first.shape)} vs {tuple(second.shape)}")
        if token_mask is not None:
            keep = token_mask.reshape(-1).to(device=a.device, dtype=torch.bool)
            if keep.numel() != a.shape[0]:
                raise ValueError(f"token mask has {keep.numel()} positions but the input has {a.shape[0]} tokens")
            if not bool(keep.all()):
                a, b = a[keep], b[keep]
        if a.shape[0] == 0:
            return
        self.sum.addmm_(a.to(self.sum.dtype).t(), b.to(self.sum.dtype))
        self.tokens += a.shape[0]

    def finalize(self) -> torch.Tensor:
        """2·Σabᵀ / n, the same scaling as `HessianAccumulator.finalize`."""
        if self.tokens == 0:
            raise ValueError("no paired tokens reached this layer")
        return self.sum * (2.0 / self.tokens)
