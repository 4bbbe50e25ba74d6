"""What the baselines share: their report, and reading / writing a (PEFT) model's weights by plain name."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn
from transformers.utils import logging

from ..peft_utils import is_peft_model
from ..targets import Conv1D
from ..tensors import canonical_name


TensorMap = Mapping[str, torch.Tensor]


BaseLike = TensorMap | nn.Module


logger = logging.get_logger(__name__)


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


def check_float(what: str, t: torch.Tensor, method: str, name: str | None = None) -> None:
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


def plain_name(live_name: str, is_peft: bool) -> str | None:
    """Map a live parameter name to the plain-model name (None: a PEFT-own parameter)."""
    if not is_peft:
        return live_name
    if any(p.startswith("lora_") or p in ("modules_to_save", "original_module") for p in live_name.split(".")):
        return None
    return canonical_name(live_name)


def live_params(model: nn.Module) -> dict[str, tuple[str, nn.Parameter]]:
    """plain name -> (live name, parameter)."""
    is_peft = is_peft_model(model)
    out: dict[str, tuple[str, nn.Parameter]] = {}
    for live, p in model.named_parameters(remove_duplicate=True):
        plain = plain_name(live, is_peft)
        if plain is not None and plain not in out:
            out[plain] = (live, p)
    return out


def owner_module(model: nn.Module, live_name: str) -> nn.Module:
    mod_name = live_name.rsplit(".", 1)[0] if "." in live_name else ""
    return model.get_submodule(mod_name)


def is_conv1d(module: nn.Module) -> bool:
    return isinstance(module, Conv1D)


def lora_layer_of(model: nn.Module, live_name: str) -> nn.Module | None:
    """The peft LoraLayer whose base weight is ``live_name`` (``...base_layer.weight``), if any."""
    if not live_name.endswith(".base_layer.weight"):
        return None
    try:
        from peft.tuners.lora import LoraLayer
    except ImportError:  # pragma: no cover
        return None
    mod = model.get_submodule(live_name[: -len(".base_layer.weight")])
    return mod if isinstance(mod, LoraLayer) else None


def as_base_map(base: BaseLike | None) -> TensorMap | None:
    if base is None or isinstance(base, Mapping):
        return base
    if isinstance(base, nn.Module):
        return live_plain_tensors(base)
    raise TypeError(f"base must be a mapping name -> tensor or a model, got {type(base).__name__}")


def live_plain_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: p for k, (_, p) in live_params(model).items()}


def resolve_targets(
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


def fetch(
    mapping: TensorMap, what: str, name: str, shape: torch.Size, device: torch.device, method: str
) -> torch.Tensor:
    if name not in mapping:
        raise KeyError(f"{method}: {what} has no entry for parameter {name!r}")
    t = mapping[name]
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{method}: {what} entry for {name!r} is not a tensor ({type(t).__name__})")
    check_float(what, t, method, name)
    if tuple(t.shape) != tuple(shape):
        raise ValueError(
            f"{method}: {what} for parameter {name!r} has shape {tuple(t.shape)}, the model's is {tuple(shape)}"
        )
    t32 = t.detach().to(device=device, dtype=torch.float32)
    if not torch.isfinite(t32).all():
        raise ValueError(f"{method}: {what} for parameter {name!r} contains NaN or Inf")
    return t32


def check_result(t: torch.Tensor, name: str, method: str, dtype: torch.dtype) -> None:
    if not torch.isfinite(t).all():
        raise ValueError(f"{method}: the new value of parameter {name!r} contains NaN or Inf")
    if dtype.is_floating_point and torch.finfo(dtype).max < float("inf"):
        if t.abs().max().item() > torch.finfo(dtype).max:
            raise ValueError(f"{method}: the new value of parameter {name!r} overflows {dtype}")


@torch.no_grad()
def write_all(pending: list[tuple[nn.Parameter, torch.Tensor]]) -> None:
    for p, new in pending:
        p.data.copy_(new.to(device=p.device, dtype=p.dtype))
