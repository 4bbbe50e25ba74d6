"""DARE (Yu et al. 2024): drop each delta entry with probability p, rescale the survivors by 1 / (1 - p)."""

from __future__ import annotations

import math

import torch


def dare(
    delta: torch.Tensor,
    drop_rate: float,
    *,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """DARE drop-and-rescale (Yu et al. 2024).

    Each entry of ``delta`` is set to zero independently with probability ``drop_rate``; the
    surviving entries are multiplied by ``1 / (1 - drop_rate)`` so that the result equals
    ``delta`` in expectation. Returns a new float32 tensor; ``delta`` is not modified.

    The random mask is drawn on ``generator``'s device when a generator is given (so a CPU
    generator gives the same mask whatever device ``delta`` lives on).
    """
    p = float(drop_rate)
    if not math.isfinite(p) or not 0.0 <= p < 1.0:
        raise ValueError(f"DARE drop_rate must be in [0, 1), got {drop_rate!r}")
    delta32 = delta.detach().to(torch.float32)
    if p == 0.0:
        return delta32.clone()
    mask_device = generator.device if generator is not None else delta32.device
    u = torch.rand(delta32.shape, generator=generator, device=mask_device, dtype=torch.float32)
    keep = (u >= p).to(delta32.device)
    return torch.where(keep, delta32 / (1.0 - p), torch.zeros_like(delta32))
