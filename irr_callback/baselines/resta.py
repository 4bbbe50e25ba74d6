"""RESTA (Bhardwaj et al. 2024): W' = W_A + DARE(Δ) + s·v, the safety vector added back."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from .common import (
    BaseLike,
    BaselineEntry,
    BaselineReport,
    TensorMap,
    as_base_map,
    check_float,
    check_result,
    fetch,
    is_peft_model,
    live_params,
    logger,
    resolve_targets,
    write_all,
)
from .dare import dare


def resta_delta(
    delta: torch.Tensor,
    safety: torch.Tensor,
    *,
    scale: float = 1.0,
    dare_drop_rate: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """RESTA (Bhardwaj et al. 2024): the new delta ``DARE(delta) + scale * safety``.

    ``delta = W_SFT - W_A`` and ``safety = v = W_A - W_U``; the re-aligned weight is
    ``W_A + returned``. With ``dare_drop_rate=None`` no DARE is applied (``W_SFT + s v``).
    Computed in float32; inputs are not modified.
    """
    check_float("safety vector", safety, "RESTA")
    if tuple(delta.shape) != tuple(safety.shape):
        raise ValueError(f"RESTA: delta shape {tuple(delta.shape)} != safety shape {tuple(safety.shape)}")
    if dare_drop_rate is None:
        d = delta.detach().to(torch.float32)
    else:
        d = dare(delta, dare_drop_rate, generator=generator)
    return d + float(scale) * safety.detach().to(device=d.device, dtype=torch.float32)


@torch.no_grad()
def apply_resta(
    model: nn.Module,
    *,
    base: BaseLike | None,
    safety_vector: TensorMap,
    scale: float = 1.0,
    dare_drop_rate: float | None = None,
    seed: int = 0,
    target_names: Iterable[str] | None = None,
) -> BaselineReport:
    """RESTA (Bhardwaj et al. 2024) on a fine-tuned model, in place, all-or-nothing.

    For every target ``W' = W_A + DARE(W - W_A) + scale * v``; without DARE
    (``dare_drop_rate=None``) ``base`` may be ``None`` and ``W' = W + scale * v``. DARE masks
    come from one CPU generator seeded with ``seed``, drawn in the model's parameter order.
    A PeftModel is accepted only without DARE (``v`` is added to the frozen base weights);
    merge the adapter first to DARE a LoRA delta.
    """
    method = "RESTA"
    is_peft = is_peft_model(model)
    if dare_drop_rate is not None:
        if not 0.0 <= float(dare_drop_rate) < 1.0:
            raise ValueError(f"{method}: dare_drop_rate must be in [0, 1), got {dare_drop_rate!r}")
        if base is None:
            raise ValueError(f"{method}: DARE needs the base model (W_A) to form the delta; pass base=")
        if is_peft:
            raise ValueError(
                f"{method}: DARE on a PeftModel's LoRA delta is not supported; merge the adapter first "
                "(model.merge_and_unload()) and pass the base weights"
            )
    base_map = as_base_map(base)
    live = live_params(model)
    targets = resolve_targets(live, safety_vector, target_names, method)
    gen = torch.Generator(device="cpu").manual_seed(int(seed)) if dare_drop_rate is not None else None

    pending: list[tuple[nn.Parameter, torch.Tensor]] = []
    entries: list[BaselineEntry] = []
    for name in targets:
        _, p = live[name]
        v = fetch(safety_vector, "safety vector", name, p.shape, p.device, method)
        w = p.detach().to(torch.float32)
        dropped = None
        if base_map is None:
            new = w + float(scale) * v
        else:
            w_a = fetch(base_map, "base", name, p.shape, p.device, method)
            delta = w - w_a
            if dare_drop_rate is not None:
                kept = dare(delta, dare_drop_rate, generator=gen)
                dropped = int(((kept == 0) & (delta != 0)).sum().item())
                delta = kept
            new = w_a + resta_delta(delta, v, scale=scale)
        check_result(new, name, method, p.dtype)
        pending.append((p, new))
        entries.append(
            BaselineEntry(
                name=name,
                shape=tuple(p.shape),
                change_norm=torch.linalg.vector_norm(new - w).item(),
                dropped=dropped,
            )
        )
    write_all(pending)
    report = BaselineReport(
        method=method,
        settings={"scale": float(scale), "dare_drop_rate": dare_drop_rate, "seed": int(seed)},
        entries=entries,
    )
    logger.info(
        "RESTA: %d parameters updated (scale=%s, dare_drop_rate=%s), total change norm %.4g",
        report.num_targets,
        scale,
        dare_drop_rate,
        report.total_change_norm,
    )
    return report
