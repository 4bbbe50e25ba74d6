"""What IRR did, per module and in total: the audit trail users keep next to the model."""

from __future__ import annotations

import json
import os
import platform
from dataclasses import dataclass, field
from typing import Any

from ._version import __version__
from .core.stats import ModuleStats
from .paths import portable_paths
from .saving import atomic_file


__all__ = ["IRRReport", "ModuleStats"]


@dataclass
class IRRReport:
    """Per-module statistics plus totals; JSON-serialisable with `to_dict` / `save`."""

    modules: list[ModuleStats] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)
    status: str = "ok"
    error: str | None = None
    num_layers: int = 0
    calibration_sequences: int = 0
    calibration_tokens: int = 0
    safety_sequences: int = 0
    safety_tokens: int = 0
    retain_sequences: int = 0
    retain_tokens: int = 0
    setting: str = "irr"  # IRRConfig.setting_name: 'irr' (the paper's), 'safety-regularised', 'recommended'
    safety_weight: float | None = None  # λ used (the one chosen when config.safety_weight == 'auto')
    auto: dict[str, Any] | None = None  # safety_weight='auto': candidates, criterion values, choice
    calibration_filter: dict[str, Any] | None = None  # calibration_filter: rows judged, dropped (which), refusals
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
            "error_safety": _sum_or_none(m.error_safety for m in self.modules),
            "error_retain": _sum_or_none(m.error_retain for m in self.modules),
        }

    def per_layer(self) -> dict[int, dict[str, Any]]:
        """Removal statistics grouped by decoder layer index (the per-layer audit)."""
        layers: dict[int, dict[str, Any]] = {}
        for m in self.modules:
            entry = layers.setdefault(
                m.layer if m.layer is not None else -1, {"entries": 0, "removed": 0, "conflicts": 0, "modules": 0}
            )
            entry["entries"] += m.entries
            entry["removed"] += m.removed
            entry["conflicts"] += m.conflicts
            entry["modules"] += 1
        for entry in layers.values():
            entry["removed_fraction"] = entry["removed"] / entry["entries"] if entry["entries"] else 0.0
        return layers

    def to_dict(self) -> dict[str, Any]:
        return {
            "irr_callback_version": __version__,
            "status": self.status,
            "error": self.error,
            "config": self.config,
            "num_layers": self.num_layers,
            "calibration_sequences": self.calibration_sequences,
            "calibration_tokens": self.calibration_tokens,
            "setting": self.setting,
            "safety_weight": self.safety_weight,
            "safety_sequences": self.safety_sequences,
            "safety_tokens": self.safety_tokens,
            **(
                {"retain_sequences": self.retain_sequences, "retain_tokens": self.retain_tokens}
                if self.retain_tokens
                else {}
            ),
            **({"auto": self.auto} if self.auto else {}),
            **({"calibration_filter": self.calibration_filter} if self.calibration_filter else {}),
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
        """Write atomically: a reader never sees a half-written report. Local paths in it (cache files,
        safety inputs, output directories) are written relative to the report's directory, or by their
        last component when outside it (`portable_paths`): an output carries no path of this machine."""
        text = json.dumps(portable_paths(self.to_dict(), os.path.dirname(os.path.abspath(path))), indent=2)
        with atomic_file(path, suffix=".json.tmp") as tmp, open(tmp, "w", encoding="utf-8") as fh:
            fh.write(text)

    def summary(self) -> str:
        t = self.totals
        return (
            f"IRR {self.status}: {t['modules']} modules, removed {t['removed']:,} of {t['entries']:,} "
            f"entries ({100 * t['removed_fraction']:.2f}%), sign conflicts {100 * t['conflict_fraction']:.2f}%, "
            f"{len(t['fell_back_to_removal'])} fell back to plain removal, {self.seconds:.1f}s"
            + self.setting_summary()
        )

    def setting_summary(self) -> str:
        """'' for the paper's IRR; else the setting and λ (and that 'auto' chose it), and the retain weight."""
        if self.setting == "irr" and not self.safety_weight and not self._retain_weight:
            return ""
        return "; " + self.setting_line()

    def setting_line(self) -> str:
        """The setting in words, for log lines and the model card: 'setting irr (the paper's IRR)' or
        e.g. "setting recommended, safety weight λ=0.2 chosen by safety_weight='auto', retain weight ρ=1"."""
        retain = f", retain weight ρ={self._retain_weight:g}" if self._retain_weight else ""
        if self.calibration_filter:
            f = self.calibration_filter
            retain += f", calibration filter dropped {f['dropped']} of {f['rows']} rows"
        if self.setting == "irr" and not self.safety_weight:
            return "setting irr (the paper's IRR)" if not retain else "setting irr" + retain
        weight = "not chosen" if self.safety_weight is None else f"{self.safety_weight:g}"
        chosen = " chosen by safety_weight='auto'" if self.auto else ""
        return f"setting {self.setting}, safety weight λ={weight}{chosen}{retain}"

    @property
    def _retain_weight(self) -> float:
        return float(self.config.get("retain_weight") or 0.0) if self.config else 0.0


def _sum_or_none(values) -> float | None:
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
