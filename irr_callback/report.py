"""What IRR did, per module and in total: the audit trail users keep next to the model."""

from __future__ import annotations

import json
import os
import platform
from dataclasses import asdict, dataclass, field
from typing import Any, Optional


@dataclass
class ModuleStats:
    """Statistics of one realigned weight matrix.

    Errors are tr((Δ'−Δ) H (Δ'−Δ)ᵀ) with the undamped calibration Hessian H = 2XXᵀ/n, i.e. the
    mean squared change of the layer output on calibration tokens (times 2).
    """

    name: str
    shape: tuple[int, ...]
    entries: int
    conflicts: int
    removed: int
    dead_columns: int = 0
    error_recalibrated: Optional[float] = None
    error_removal: Optional[float] = None
    damping: Optional[float] = None
    damping_retries: int = 0
    recalibrated: bool = False
    fell_back_to_removal: bool = False
    layer: Optional[int] = None
    hessian_tokens: Optional[int] = None
    seconds: float = 0.0

    @property
    def removed_fraction(self) -> float:
        return self.removed / self.entries if self.entries else 0.0

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["shape"] = list(self.shape)
        out["removed_fraction"] = self.removed_fraction
        return out


@dataclass
class IRRReport:
    """Per-module statistics plus totals; JSON-serialisable with `to_dict` / `save`."""

    modules: list[ModuleStats] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)
    status: str = "ok"
    error: Optional[str] = None
    num_layers: int = 0
    calibration_sequences: int = 0
    calibration_tokens: int = 0
    seconds: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def totals(self) -> dict[str, Any]:
        entries = sum(m.entries for m in self.modules)
        removed = sum(m.removed for m in self.modules)
        conflicts = sum(m.conflicts for m in self.modules)
        return {
            "modules": len(self.modules),
            "entries": entries,
            "conflicts": conflicts,
            "removed": removed,
            "removed_fraction": removed / entries if entries else 0.0,
            "conflict_fraction": conflicts / entries if entries else 0.0,
            "recalibrated_modules": sum(m.recalibrated for m in self.modules),
            "fell_back_to_removal": [m.name for m in self.modules if m.fell_back_to_removal],
            "damping_retries": sum(m.damping_retries for m in self.modules),
            "dead_columns": sum(m.dead_columns for m in self.modules),
            "error_recalibrated": _sum_or_none(m.error_recalibrated for m in self.modules),
            "error_removal": _sum_or_none(m.error_removal for m in self.modules),
        }

    def per_layer(self) -> dict[int, dict[str, Any]]:
        """Removal statistics grouped by decoder layer index (the per-layer audit)."""
        layers: dict[int, dict[str, Any]] = {}
        for m in self.modules:
            entry = layers.setdefault(m.layer if m.layer is not None else -1,
                                      {"entries": 0, "removed": 0, "conflicts": 0, "modules": 0})
            entry["entries"] += m.entries
            entry["removed"] += m.removed
            entry["conflicts"] += m.conflicts
            entry["modules"] += 1
        for entry in layers.values():
            entry["removed_fraction"] = entry["removed"] / entry["entries"] if entry["entries"] else 0.0
        return layers

    def to_dict(self) -> dict[str, Any]:
        from . import __version__

        return {
            "irr_callback_version": __version__,
            "status": self.status,
            "error": self.error,
            "config": self.config,
            "num_layers": self.num_layers,
            "calibration_sequences": self.calibration_sequences,
            "calibration_tokens": self.calibration_tokens,
            "seconds": self.seconds,
            "totals": self.totals,
            "per_layer": {str(k): v for k, v in sorted(self.per_layer().items())},
            "modules": [m.to_dict() for m in self.modules],
            "environment": {"python": platform.python_version(), **_versions()},
            **({"extra": self.extra} if self.extra else {}),
        }

    def to_json(self, indent: int = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    def save(self, path: str) -> None:
        """Write atomically: a reader never sees a half-written report."""
        tmp = f"{path}.tmp-{os.getpid()}"
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(self.to_json())
            fh.flush()
            os.fsync(fh.fileno())  # on disk before the rename: never an empty report after a power loss
        os.replace(tmp, path)

    def summary(self) -> str:
        t = self.totals
        return (f"IRR {self.status}: {t['modules']} modules, removed {t['removed']:,} of {t['entries']:,} "
                f"entries ({100 * t['removed_fraction']:.2f}%), sign conflicts {100 * t['conflict_fraction']:.2f}%, "
                f"{len(t['fell_back_to_removal'])} fell back to plain removal, {self.seconds:.1f}s")


def _sum_or_none(values) -> Optional[float]:
    vals = [v for v in values if v is not None]
    return float(sum(vals)) if vals else None


def _versions() -> dict[str, str]:
    out = {}
    for pkg in ("torch", "transformers", "accelerate", "peft"):
        try:
            out[pkg] = __import__(pkg).__version__
        except Exception:  # pragma: no cover - optional in odd environments
            pass
    return out
