"""Hessian accumulation H = 2·XXᵀ/n over calibration tokens, padding excluded.

Keeps the raw sum Σxxᵀ (float32) and the token count so that statistics from several batches or
several processes can be added exactly and normalised once.
"""

from __future__ import annotations

from typing import Optional

import torch


class HessianAccumulator:
    """Running Σ xxᵀ and token count of one layer input."""

    def __init__(self, columns: int, *, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
        self.sum = torch.zeros(columns, columns, device=device, dtype=dtype)
        self.tokens = 0

    def add(self, inputs: torch.Tensor, token_mask: Optional[torch.Tensor] = None) -> None:
        """Add a batch of inputs (..., columns); `token_mask` (same leading shape) selects real tokens."""
        x = inputs.reshape(-1, inputs.shape[-1])
        if token_mask is not None:
            keep = token_mask.reshape(-1).to(device=x.device, dtype=torch.bool)
            if keep.numel() != x.shape[0]:
                raise ValueError(f"token mask has {keep.numel()} positions but the input has {x.shape[0]} tokens")
            x = x[keep]
        if x.shape[0] == 0:
            return
        x = x.to(self.sum.dtype)
        self.sum.addmm_(x.t(), x)
        self.tokens += x.shape[0]

    def merge(self, other: "HessianAccumulator") -> None:
        self.sum += other.sum.to(self.sum.device)
        self.tokens += other.tokens

    def finalize(self) -> torch.Tensor:
        """H = 2·Σxxᵀ / n. Raises if no token was seen (e.g. calibration made only of padding)."""
        if self.tokens == 0:
            raise ValueError("no calibration tokens reached this layer (is the calibration data all padding?)")
        return self.sum * (2.0 / self.tokens)
