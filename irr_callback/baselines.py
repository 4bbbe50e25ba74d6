"""Comparison baselines used by the IRR paper: DARE, RESTA and Safe LoRA.

All three are written from the papers' descriptions:

* **DARE** -- Yu et al. 2024, "Language Models are Super Mario: Absorbing Abilities from
  Homologous Models as a Free Lunch": drop each entry of a fine-tuning delta with
  probability ``p`` and rescale the survivors by ``1 / (1 - p)`` (unbiased in expectation).
* **RESTA** -- Bhardwaj et al. 2024, "Language Models are Homer Simpson! Safety Re-Alignment of
  Fine-tuned Language Models through Task Arithmetic": add the safety vector
  ``v = W_A - W_U`` to the fine-tuned weights, optionally after DARE on the fine-tuning delta:
  ``W' = W_A + DARE(Delta) + s * v``.
* **Safe LoRA** -- Hsu et al. 2024, "Safe LoRA: the Silver Lining of Reducing Safety Risks when
  Finetuning Large Language Models": per layer, ``C = V V^T / ||V||_F`` with
  ``V = W_A - W_U`` (rows = outputs); the delta is replaced by ``C Delta`` when the cosine
  similarity between ``C Delta`` and ``Delta`` is below a threshold. For LoRA
  (``Delta = scaling * B A``) this is ``B' = C B``.

The tensor functions are pure (they never modify their inputs). The model-level wrappers
(:func:`apply_resta`, :func:`apply_safe_lora`) modify a model in place, all-or-nothing: every
new weight is computed and validated in float32 first, and only then written (cast once to
the parameter's dtype). Errors name the offending parameter.

Orientation: weight matrices are handled as (out, in), like ``nn.Linear.weight``.
``transformers.pytorch_utils.Conv1D`` weights (GPT-2) are stored (in, out) and are transposed
internally; LoRA layers with ``fan_in_fan_out`` likewise.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn
from transformers.utils import logging


logger = logging.get_logger(__name__)

__all__ = [
    "BaselineEntry",
    "BaselineReport",
    "apply_resta",
    "apply_safe_lora",
    "dare",
    "flat_cosine",
    "resta_delta",
    "safe_lora_delta",
    "safe_lora_lora_b",
    "safe_lora_projection",
]

TensorMap = Mapping[str, torch.Tensor]
BaseLike = TensorMap | nn.Module


# --------------------------------------------------------------------------------------
# Pure tensor functions
# --------------------------------------------------------------------------------------


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
    _check_float("safety vector", safety, "RESTA")
    if tuple(delta.shape) != tuple(safety.shape):
        raise ValueError(f"RESTA: delta shape {tuple(delta.shape)} != safety shape {tuple(safety.shape)}")
    if dare_drop_rate is None:
        d = delta.detach().to(torch.float32)
    else:
        d = dare(delta, dare_drop_rate, generator=generator)
    return d + float(scale) * safety.detach().to(device=d.device, dtype=torch.float32)


def safe_lora_projection(safety: torch.Tensor, *, exact: bool = False) -> torch.Tensor:
    """Safe LoRA (Hsu et al. 2024) alignment matrix of one layer, float32, shape (out, out).

    Default (the paper's): ``C = V V^T / ||V||_F`` with ``V = W_A - W_U`` (rows = outputs).
    Note that this ``C`` is symmetric but in general NOT idempotent: its eigenvalues are
    ``sigma_i^2 / ||V||_F``, so it scales with ``V``. ``exact=True`` returns the orthogonal
    projector onto the column space of ``V`` (``V V^+``), which is idempotent; the paper
    describes the first form as a cheaper approximation of the second.
    """
    _check_float("safety vector", safety, "Safe LoRA")
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


# --------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------


@dataclass
class BaselineEntry:
    """One modified parameter: ``change_norm`` is ||W_new - W_old||_F (float32, before the cast)."""

    name: str
    shape: tuple[int, ...]
    change_norm: float
    kind: str = "dense"  # "dense" or "lora" (LoRA B factor projected)
    cosine: float | None = None
    projected: bool | None = None
    dropped: int | None = None  # DARE: entries of the delta dropped

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["shape"] = list(self.shape)
        return d


@dataclass
class BaselineReport:
    """What a baseline did to a model: per-parameter entries, settings and totals."""

    method: str
    settings: dict[str, Any] = field(default_factory=dict)
    entries: list[BaselineEntry] = field(default_factory=list)

    @property
    def num_targets(self) -> int:
        return len(self.entries)

    @property
    def num_projected(self) -> int:
        return sum(1 for e in self.entries if e.projected)

    @property
    def total_numel(self) -> int:
        return sum(math.prod(e.shape) for e in self.entries)

    @property
    def total_change_norm(self) -> float:
        return math.sqrt(sum(e.change_norm**2 for e in self.entries))

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "settings": dict(self.settings),
            "entries": [e.to_dict() for e in self.entries],
            "totals": {
                "num_targets": self.num_targets,
                "num_projected": self.num_projected,
                "total_numel": self.total_numel,
                "total_change_norm": self.total_change_norm,
            },
        }


# --------------------------------------------------------------------------------------
# Model-level helpers
# --------------------------------------------------------------------------------------


def _check_float(what: str, t: torch.Tensor, method: str, name: str | None = None) -> None:
    if torch.is_floating_point(t):
        return
    where = f" for parameter {name!r}" if name else ""
    if what == "safety vector":
        hint = " (a sign-only safety file?)" if t.dtype in (torch.int8, torch.bool) else ""
        raise ValueError(
            f"{method}: {what}{where} has dtype {t.dtype}{hint}; {method} needs the real-valued "
            "safety vector v = W_A - W_U, not only its signs"
        )
    raise ValueError(f"{method}: {what}{where} has non-float dtype {t.dtype}")


def _is_peft_model(model: nn.Module) -> bool:
    try:
        from peft import PeftModel
    except ImportError:  # pragma: no cover - peft is a dependency
        return False
    return isinstance(model, PeftModel)


def _plain_name(live_name: str, is_peft: bool) -> str | None:
    """Map a live parameter name to the plain-model name (None: a PEFT-own parameter)."""
    if not is_peft:
        return live_name
    name = live_name
    if name.startswith("base_model.model."):
        name = name[len("base_model.model.") :]
    parts = name.split(".")
    if any(p.startswith("lora_") or p in ("modules_to_save", "original_module") for p in parts):
        return None
    return ".".join(p for p in parts if p != "base_layer")


def _live_params(model: nn.Module) -> dict[str, tuple[str, nn.Parameter]]:
    """plain name -> (live name, parameter)."""
    is_peft = _is_peft_model(model)
    out: dict[str, tuple[str, nn.Parameter]] = {}
    for live, p in model.named_parameters(remove_duplicate=True):
        plain = _plain_name(live, is_peft)
        if plain is not None and plain not in out:
            out[plain] = (live, p)
    return out


def _owner(model: nn.Module, live_name: str) -> nn.Module:
    mod_name = live_name.rsplit(".", 1)[0] if "." in live_name else ""
    return model.get_submodule(mod_name)


def _is_conv1d(module: nn.Module) -> bool:
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover
        return False
    return isinstance(module, Conv1D)


def _lora_layer_of(model: nn.Module, live_name: str) -> nn.Module | None:
    """The peft LoraLayer whose base weight is ``live_name`` (``...base_layer.weight``), if any."""
    if not live_name.endswith(".base_layer.weight"):
        return None
    try:
        from peft.tuners.lora import LoraLayer
    except ImportError:  # pragma: no cover
        return None
    mod = model.get_submodule(live_name[: -len(".base_layer.weight")])
    return mod if isinstance(mod, LoraLayer) else None


def _base_map(base: BaseLike | None) -> TensorMap | None:
    if base is None or isinstance(base, Mapping):
        return base
    if isinstance(base, nn.Module):
        return _live_plain_tensors(base)
    raise TypeError(f"base must be a mapping name -> tensor or a model, got {type(base).__name__}")


def _live_plain_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: p for k, (_, p) in _live_params(model).items()}


def _resolve_targets(
    live: Mapping[str, tuple[str, nn.Parameter]],
    safety_vector: TensorMap,
    target_names: Iterable[str] | None,
    method: str,
    default_filter=None,
) -> list[str]:
    if target_names is None:
        names = [n for n in live if n in safety_vector]
        if default_filter is not None:
            names = [n for n in names if default_filter(n)]
        if not names:
            raise ValueError(f"{method}: no parameter of the model has an entry in the safety vector")
        return names
    names = list(dict.fromkeys(target_names))
    for n in names:
        if n not in live:
            raise KeyError(f"{method}: target parameter {n!r} is not a parameter of the model")
        if n not in safety_vector:
            raise KeyError(f"{method}: target parameter {n!r} has no entry in the safety vector")
    order = {n: i for i, n in enumerate(live)}
    return sorted(names, key=order.__getitem__)


def _fetch(
    mapping: TensorMap, what: str, name: str, shape: torch.Size, device: torch.device, method: str
) -> torch.Tensor:
    if name not in mapping:
        raise KeyError(f"{method}: {what} has no entry for parameter {name!r}")
    t = mapping[name]
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{method}: {what} entry for {name!r} is not a tensor ({type(t).__name__})")
    _check_float(what, t, method, name)
    if tuple(t.shape) != tuple(shape):
        raise ValueError(
            f"{method}: {what} for parameter {name!r} has shape {tuple(t.shape)}, the model's is {tuple(shape)}"
        )
    t32 = t.detach().to(device=device, dtype=torch.float32)
    if not torch.isfinite(t32).all():
        raise ValueError(f"{method}: {what} for parameter {name!r} contains NaN or Inf")
    return t32


def _check_result(t: torch.Tensor, name: str, method: str, dtype: torch.dtype) -> None:
    if not torch.isfinite(t).all():
        raise ValueError(f"{method}: the new value of parameter {name!r} contains NaN or Inf")
    if dtype.is_floating_point and torch.finfo(dtype).max < float("inf"):
        if t.abs().max().item() > torch.finfo(dtype).max:
            raise ValueError(f"{method}: the new value of parameter {name!r} overflows {dtype}")


@torch.no_grad()
def _write_all(pending: list[tuple[nn.Parameter, torch.Tensor]]) -> None:
    for p, new in pending:
        p.data.copy_(new.to(device=p.device, dtype=p.dtype))


# --------------------------------------------------------------------------------------
# Model-level wrappers
# --------------------------------------------------------------------------------------


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
    is_peft = _is_peft_model(model)
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
    base_map = _base_map(base)
    live = _live_params(model)
    targets = _resolve_targets(live, safety_vector, target_names, method)
    gen = torch.Generator(device="cpu").manual_seed(int(seed)) if dare_drop_rate is not None else None

    pending: list[tuple[nn.Parameter, torch.Tensor]] = []
    entries: list[BaselineEntry] = []
    for name in targets:
        _, p = live[name]
        v = _fetch(safety_vector, "safety vector", name, p.shape, p.device, method)
        w = p.detach().to(torch.float32)
        dropped = None
        if base_map is None:
            new = w + float(scale) * v
        else:
            w_a = _fetch(base_map, "base", name, p.shape, p.device, method)
            delta = w - w_a
            if dare_drop_rate is not None:
                kept = dare(delta, dare_drop_rate, generator=gen)
                dropped = int(((kept == 0) & (delta != 0)).sum().item())
                delta = kept
            new = w_a + resta_delta(delta, v, scale=scale)
        _check_result(new, name, method, p.dtype)
        pending.append((p, new))
        entries.append(
            BaselineEntry(
                name=name,
                shape=tuple(p.shape),
                change_norm=torch.linalg.vector_norm(new - w).item(),
                dropped=dropped,
            )
        )
    _write_all(pending)
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
    base_map = _base_map(base)
    live = _live_params(model)

    def lora_of(plain: str) -> nn.Module | None:
        return _lora_layer_of(model, live[plain][0])

    def default_filter(plain: str) -> bool:
        live_name, p = live[plain]
        if p.dim() != 2:
            return False
        if lora_of(plain) is not None:
            return True
        if _is_peft_model(model):
            return False
        owner = _owner(model, live_name)
        return live_name.endswith(".weight") and (isinstance(owner, nn.Linear) or _is_conv1d(owner))

    targets = _resolve_targets(live, safety_vector, target_names, method, default_filter)

    pending: list[tuple[nn.Parameter, torch.Tensor]] = []
    entries: list[BaselineEntry] = []
    for name in targets:
        live_name, p = live[name]
        if p.dim() != 2:
            raise ValueError(f"{method}: parameter {name!r} has shape {tuple(p.shape)}; Safe LoRA needs 2-D weights")
        v = _fetch(safety_vector, "safety vector", name, p.shape, p.device, method)
        layer = lora_of(name)
        if layer is not None:
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
            _check_result(out_b, name + " (lora_B)", method, b_param.dtype)
            if projected:
                pending.append((b_param, out_b))
            change = torch.linalg.vector_norm(c @ dense_oi - dense_oi).item() if projected else 0.0
            entries.append(
                BaselineEntry(
                    name=name, shape=tuple(p.shape), change_norm=change, kind="lora", cosine=cos, projected=projected
                )
            )
            continue
        if base_map is None:
            raise ValueError(
                f"{method}: parameter {name!r} is not a LoRA layer; pass base= (W_A) to form its dense delta"
            )
        w_a = _fetch(base_map, "base", name, p.shape, p.device, method)
        w = p.detach().to(torch.float32)
        transposed = _is_conv1d(_owner(model, live_name))
        delta = w - w_a
        d_oi, v_oi = (delta.T, v.T) if transposed else (delta, v)
        try:
            new_oi, cos, projected = safe_lora_delta(d_oi, v_oi, threshold=threshold, exact=exact)
        except ValueError as e:
            raise ValueError(f"{method}: parameter {name!r}: {e}") from None
        new = (w_a + (new_oi.T if transposed else new_oi)) if projected else w
        _check_result(new, name, method, p.dtype)
        if projected:
            pending.append((p, new))
        entries.append(
            BaselineEntry(
                name=name,
                shape=tuple(p.shape),
                change_norm=torch.linalg.vector_norm(new - w).item(),
                cosine=cos,
                projected=projected,
            )
        )
    _write_all(pending)
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
