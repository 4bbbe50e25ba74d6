"""Safe LoRA (Hsu et al. 2024): project the delta onto the safety subspace C = V Vᵀ / ‖V‖_F where it drifts."""

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
    is_conv1d,
    is_peft_model,
    live_params,
    logger,
    lora_layer_of,
    owner_module,
    resolve_targets,
    write_all,
)


def safe_lora_projection(safety: torch.Tensor, *, exact: bool = False) -> torch.Tensor:
    """Safe LoRA (Hsu et al. 2024) alignment matrix of one layer, float32, shape (out, out).

    Default (the paper's): ``C = V V^T / ||V||_F`` with ``V = W_A - W_U`` (rows = outputs).
    Note that this ``C`` is symmetric but in general NOT idempotent: its eigenvalues are
    ``sigma_i^2 / ||V||_F``, so it scales with ``V``. ``exact=True`` returns the orthogonal
    projector onto the column space of ``V`` (``V V^+``), which is idempotent; the paper
    describes the first form as a cheaper approximation of the second.
    """
    check_float("safety vector", safety, "Safe LoRA")
    if safety.dim() != 2:
        raise ValueError(f"Safe LoRA needs a 2-D weight matrix, got shape {tuple(safety.shape)}")
    v = safety.detach().to(torch.float32)
    norm = torch.linalg.matrix_norm(v, ord="fro")
    if not torch.isfinite(norm) or norm.item() == 0.0:
        raise ValueError("Safe LoRA: the safety vector is all zeros or not finite; projection undefined")
    if not exact:
        return (v @ v.T) / norm
    u, s, _ = torch.linalg.svd(v, full_matrices=False)
    tol = s.max() * max(v.shape) * torch.finfo(torch.float32).eps
    u_r = u[:, s > tol]
    return u_r @ u_r.T


def flat_cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """Cosine similarity of two tensors flattened (float32). Both zero -> 1.0; one zero -> 0.0."""
    a32 = a.detach().reshape(-1).to(torch.float32)
    b32 = b.detach().reshape(-1).to(device=a32.device, dtype=torch.float32)
    na, nb = torch.linalg.vector_norm(a32).item(), torch.linalg.vector_norm(b32).item()
    if na == 0.0 and nb == 0.0:
        return 1.0
    if na == 0.0 or nb == 0.0:
        return 0.0
    c = torch.dot(a32, b32).item() / (na * nb)
    return max(-1.0, min(1.0, c))


def safe_lora_delta(
    delta: torch.Tensor,
    safety: torch.Tensor,
    *,
    threshold: float,
    exact: bool = False,
) -> tuple[torch.Tensor, float, bool]:
    """Safe LoRA (Hsu et al. 2024) on a dense delta of one (out, in) layer.

    ``delta' = C delta`` with ``C = safe_lora_projection(safety)``. If
    ``cosine(delta', delta) < threshold`` the projected delta is used, otherwise ``delta`` is
    kept. Returns ``(new_delta float32, cosine, projected)``.
    """
    if delta.dim() != 2 or tuple(delta.shape) != tuple(safety.shape):
        raise ValueError(
            f"Safe LoRA: delta shape {tuple(delta.shape)} and safety shape {tuple(safety.shape)} "
            "must be equal 2-D (out, in) matrices"
        )
    c = safe_lora_projection(safety, exact=exact).to(delta.device)
    d = delta.detach().to(torch.float32)
    projected_delta = c @ d
    cos = flat_cosine(projected_delta, d)
    if cos < threshold:
        return projected_delta, cos, True
    return d.clone(), cos, False


def safe_lora_lora_b(
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    safety: torch.Tensor,
    *,
    threshold: float,
    scaling: float = 1.0,
    exact: bool = False,
) -> tuple[torch.Tensor, float, bool]:
    """Safe LoRA (Hsu et al. 2024) in LoRA-factor form: ``Delta = scaling * B A``.

    ``lora_a``: (r, in), ``lora_b``: (out, r), ``safety``: (out, in). Projecting the dense
    delta, ``C (scaling B A) = scaling (C B) A``, equals projecting ``B``, so the adapter stays
    an adapter. The cosine is that of the dense deltas. Returns ``(new_B float32, cosine,
    projected)``; ``new_B`` is ``C B`` if the cosine is below ``threshold``, else ``B``.
    """
    if lora_a.dim() != 2 or lora_b.dim() != 2 or lora_b.shape[1] != lora_a.shape[0]:
        raise ValueError(f"LoRA factor shapes do not match: A {tuple(lora_a.shape)}, B {tuple(lora_b.shape)}")
    if tuple(safety.shape) != (lora_b.shape[0], lora_a.shape[1]):
        raise ValueError(
            f"Safe LoRA: safety shape {tuple(safety.shape)} != delta shape {(lora_b.shape[0], lora_a.shape[1])}"
        )
    c = safe_lora_projection(safety, exact=exact).to(lora_b.device)
    a32 = lora_a.detach().to(device=lora_b.device, dtype=torch.float32)
    b32 = lora_b.detach().to(torch.float32)
    new_b = c @ b32
    cos = flat_cosine(float(scaling) * (new_b @ a32), float(scaling) * (b32 @ a32))
    if cos < threshold:
        return new_b, cos, True
    return b32.clone(), cos, False


def _lora_adapter(layer: nn.Module, name: str) -> str:
    from peft.tuners.lora import Linear as LoraLinear

    method = "Safe LoRA"
    if not isinstance(layer, LoraLinear):
        raise ValueError(
            f"{method}: parameter {name!r} is wrapped by {type(layer).__name__}; only LoRA Linear layers are supported"
        )
    if getattr(layer, "merged", False):
        raise ValueError(f"{method}: the LoRA adapter of {name!r} is merged into the base weight; unmerge it first")
    active = [a for a in layer.active_adapters if a in layer.lora_A]
    if len(active) != 1:
        raise ValueError(
            f"{method}: parameter {name!r} has {len(active)} active LoRA adapters; exactly one is supported"
        )
    adapter = active[0]
    if adapter in getattr(layer, "lora_variant", {}) or getattr(layer, "use_dora", {}).get(adapter, False):
        raise ValueError(f"{method}: parameter {name!r} uses a LoRA variant (e.g. DoRA); only plain LoRA is supported")
    if getattr(layer, "lora_bias", {}).get(adapter, False):
        raise ValueError(f"{method}: parameter {name!r} uses lora_bias; not supported")
    return adapter


@torch.no_grad()
def apply_safe_lora(
    model: nn.Module,
    *,
    base: BaseLike | None = None,
    safety_vector: TensorMap,
    threshold: float = 0.5,
    target_names: Iterable[str] | None = None,
    exact: bool = False,
) -> BaselineReport:
    """Safe LoRA (Hsu et al. 2024) on a model, in place, all-or-nothing.

    Per target layer, project the delta with ``C = V V^T / ||V||_F`` (``V`` = safety vector of
    that layer) when ``cosine(C Delta, Delta) < threshold``.

    * Dense fine-tuned model: ``Delta = W - base``; the projected layer becomes ``W_A + C Delta``.
    * peft LoRA model: for a LoRA-wrapped layer ``Delta = layer.get_delta_weight(adapter)`` and
      ``B`` is replaced by ``C B`` (the adapter stays an adapter; ``base`` is not needed).
      Non-LoRA targets of a PeftModel need ``base``.

    Default targets: 2-D weights present in ``safety_vector`` that belong to ``nn.Linear`` /
    ``Conv1D`` modules (for a PeftModel: only LoRA-wrapped ones). ``exact=True`` uses the
    orthogonal projector instead of the paper's ``C``.
    """
    method = "Safe LoRA"
    base_map = as_base_map(base)
    live = live_params(model)

    def lora_of(plain: str) -> nn.Module | None:
        return lora_layer_of(model, live[plain][0])

    def default_filter(plain: str) -> bool:
        live_name, p = live[plain]
        if p.dim() != 2:
            return False
        if lora_of(plain) is not None:
            return True
        if is_peft_model(model):
            return False
        owner = owner_module(model, live_name)
        return live_name.endswith(".weight") and (isinstance(owner, nn.Linear) or is_conv1d(owner))

    targets = resolve_targets(live, safety_vector, target_names, method, default_filter)

    pending: list[tuple[nn.Parameter, torch.Tensor]] = []
    entries: list[BaselineEntry] = []
    for name in targets:
        live_name, p = live[name]
        if p.dim() != 2:
            raise ValueError(f"{method}: parameter {name!r} has shape {tuple(p.shape)}; Safe LoRA needs 2-D weights")
        v = fetch(safety_vector, "safety vector", name, p.shape, p.device, method)
        layer = lora_of(name)
        if layer is not None:
            entry, update = _project_lora(layer, name, p, v, threshold, exact, method)
        elif base_map is None:
            raise ValueError(
                f"{method}: parameter {name!r} is not a LoRA layer; pass base= (W_A) to form its dense delta"
            )
        else:
            w_a = fetch(base_map, "base", name, p.shape, p.device, method)
            transposed = is_conv1d(owner_module(model, live_name))
            entry, update = _project_dense(name, p, w_a, v, transposed, threshold, exact, method)
        entries.append(entry)
        if update is not None:
            pending.append(update)
    write_all(pending)
    report = BaselineReport(
        method=method, settings={"threshold": float(threshold), "exact": bool(exact)}, entries=entries
    )
    logger.info(
        "Safe LoRA: %d of %d layers projected (threshold=%s)",
        report.num_projected,
        report.num_targets,
        threshold,
    )
    return report


def _project_lora(layer, name, p, v, threshold, exact, method):
    """(entry, (lora_B, C B) or None) for a LoRA layer: B is replaced by C B when projected."""
    adapter = _lora_adapter(layer, name)
    transposed = bool(getattr(layer, "fan_in_fan_out", False))
    v_oi = v.T if transposed else v
    b_param = layer.lora_B[adapter].weight
    a_w = layer.lora_A[adapter].weight
    b32 = b_param.detach().to(torch.float32)
    if not torch.isfinite(b32).all() or not torch.isfinite(a_w).all():
        raise ValueError(f"{method}: LoRA factors of parameter {name!r} contain NaN or Inf")
    dense = layer.get_delta_weight(adapter).detach().to(torch.float32)
    dense_oi = dense.T if transposed else dense
    if tuple(dense_oi.shape) != tuple(v_oi.shape):
        raise ValueError(
            f"{method}: LoRA delta of {name!r} has shape {tuple(dense.shape)}, safety vector {tuple(v.shape)}"
        )
    try:
        c = safe_lora_projection(v_oi, exact=exact)
    except ValueError as e:
        raise ValueError(f"{method}: parameter {name!r}: {e}") from None
    new_b = c @ b32
    cos = flat_cosine(c @ dense_oi, dense_oi)
    projected = cos < threshold
    out_b = new_b if projected else b32
    check_result(out_b, name + " (lora_B)", method, b_param.dtype)
    change = torch.linalg.vector_norm(c @ dense_oi - dense_oi).item() if projected else 0.0
    entry = BaselineEntry(
        name=name, shape=tuple(p.shape), change_norm=change, kind="lora", cosine=cos, projected=projected
    )
    return entry, ((b_param, out_b) if projected else None)


def _project_dense(name, p, w_a, v, transposed, threshold, exact, method):
    """(entry, (weight, W_A + C Δ) or None) for a dense layer."""
    w = p.detach().to(torch.float32)
    delta = w - w_a
    d_oi, v_oi = (delta.T, v.T) if transposed else (delta, v)
    try:
        new_oi, cos, projected = safe_lora_delta(d_oi, v_oi, threshold=threshold, exact=exact)
    except ValueError as e:
        raise ValueError(f"{method}: parameter {name!r}: {e}") from None
    new = (w_a + (new_oi.T if transposed else new_oi)) if projected else w
    check_result(new, name, method, p.dtype)
    entry = BaselineEntry(
        name=name,
        shape=tuple(p.shape),
        change_norm=torch.linalg.vector_norm(new - w).item(),
        cosine=cos,
        projected=projected,
    )
    return entry, ((p, new) if projected else None)
