"""PEFT specifics of the callback: what is supported, and turning a realigned dense delta back into
an adapter.

IRR's result for a LoRA run is a dense delta Δ' (the removed entries are no longer low rank), so a
realigned adapter can only approximate it: `refactor_lora` replaces each LoRA layer's factors by the
truncated SVD of Δ' at one rank for all layers (scaling folded into the factors, so the adapter's
`lora_alpha == r`) and reports the relative Frobenius error per module.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .targets import Target, TargetError


def is_peft_model(model: nn.Module) -> bool:
    return hasattr(model, "peft_config") and hasattr(model, "get_base_model")


def check_supported(model: nn.Module) -> None:
    """Refuse, before anything is changed, the PEFT setups whose realigned result we cannot represent."""
    if (
        getattr(model, "is_loaded_in_4bit", False)
        or getattr(model, "is_loaded_in_8bit", False)
        or getattr(getattr(model, "get_base_model", lambda: model)(), "is_quantized", False)
    ):
        raise TargetError(
            "QLoRA / quantized base models are not supported: IRR writes W_A + Δ' into the base "
            "weights; load the base in bf16/fp16/fp32"
        )
    if not is_peft_model(model):
        return
    for adapter, cfg in model.peft_config.items():
        if (
            getattr(cfg, "peft_type", None) is not None
            and str(getattr(cfg.peft_type, "value", cfg.peft_type)) != "LORA"
        ):
            raise TargetError(f"adapter '{adapter}' is {cfg.peft_type}; IRRCallback supports LoRA adapters only")
        if getattr(cfg, "use_dora", False):
            raise TargetError(
                f"adapter '{adapter}' uses DoRA (use_dora=True), which IRRCallback does not support; "
                "train plain LoRA, or merge the adapter and realign the merged model with `realign`"
            )
        if getattr(cfg, "lora_bias", False):
            raise TargetError(f"adapter '{adapter}' has lora_bias=True, which IRRCallback does not support")
        if getattr(cfg, "modules_to_save", None):
            raise TargetError(
                f"adapter '{adapter}' trains modules_to_save={list(cfg.modules_to_save)} fully; "
                "IRR has no base snapshot for them. Drop modules_to_save or fine-tune fully"
            )
    if len(model.peft_config) != 1:
        raise TargetError(f"{len(model.peft_config)} adapters are loaded; IRRCallback needs exactly one")


def lora_module_names(targets: list[Target]) -> list[str]:
    """Module names of the LoRA targets: used as explicit target_modules so untouched Linears are skipped."""
    return [t.name.rsplit(".", 1)[0] for t in targets if t.kind == "lora"]


@dataclass
class RefactorResult:
    rank: int
    errors: dict[str, float]  # relative Frobenius error ‖Δ' − B'A'‖ / ‖Δ'‖ per module

    @property
    def max_error(self) -> float:
        return max(self.errors.values(), default=0.0)

    def to_dict(self) -> dict:
        return {"rank": self.rank, "max_relative_error": self.max_error, "relative_errors": self.errors}


def default_refactor_rank(model: nn.Module, rank: int | None) -> int:
    if rank is not None:
        return rank
    cfg = next(iter(model.peft_config.values()))
    return 4 * int(cfg.r)


def refactor_lora(
    model: nn.Module, targets: list[Target], deltas: dict[str, torch.Tensor], bases: dict[str, torch.Tensor], rank: int
) -> RefactorResult:
    """In place: base_layer.weight ← W_A, (A, B) ← truncated SVD of Δ' (stored layout → out×in).

    `deltas[name]` is Δ' in the stored weight layout, `bases[name]` is W_A. Each module gets
    min(rank, its smaller dimension); the peft config is updated (r = lora_alpha = rank, per-module
    exceptions in rank_pattern/alpha_pattern, no rsLoRA) so `save_pretrained` writes a loadable adapter.
    """
    lora = [t for t in targets if t.kind == "lora"]
    errors = {}
    adapter = lora[0].adapter
    patterns: dict[str, int] = {}
    with torch.no_grad():
        for t in lora:
            delta = t.to_out_in(deltas[t.name]).to(torch.float32)
            r = min(rank, *delta.shape)
            if r != rank:
                patterns[t.name.rsplit(".", 1)[0]] = r
            u, s, vh = torch.linalg.svd(delta, full_matrices=False)
            root = s[:r].sqrt()
            b = u[:, :r] * root
            a = root[:, None] * vh[:r]
            norm = float(torch.linalg.norm(delta))
            errors[t.name] = float(torch.linalg.norm(delta - b @ a)) / norm if norm > 0 else 0.0
            module = t.module
            old_a, old_b = module.lora_A[adapter], module.lora_B[adapter]
            new_a = nn.Linear(a.shape[1], r, bias=False).to(device=old_a.weight.device, dtype=old_a.weight.dtype)
            new_b = nn.Linear(r, b.shape[0], bias=False).to(device=old_b.weight.device, dtype=old_b.weight.dtype)
            new_a.weight.copy_(a)
            new_b.weight.copy_(b)
            new_a.weight.requires_grad_(old_a.weight.requires_grad)
            new_b.weight.requires_grad_(old_b.weight.requires_grad)
            module.lora_A[adapter], module.lora_B[adapter] = new_a, new_b
            module.r[adapter] = r
            module.lora_alpha[adapter] = r
            module.scaling[adapter] = 1.0
            t.weight.data.copy_(bases[t.name].to(device=t.weight.device, dtype=t.weight.dtype))
    cfg = model.peft_config[adapter]
    cfg.r, cfg.lora_alpha, cfg.use_rslora = rank, rank, False
    cfg.rank_pattern = dict(patterns)
    cfg.alpha_pattern = dict(patterns)
    return RefactorResult(rank, errors)


class LoraBackup:
    """Everything `refactor_lora` and `realign` change in a PeftModel, to put it back on failure."""

    def __init__(self, model: nn.Module, targets: list[Target]):
        self.model = model
        self.items = []
        for t in targets:
            if t.kind != "lora":
                continue
            m, ad = t.module, t.adapter
            self.items.append(
                (
                    t,
                    m.lora_A[ad],
                    m.lora_B[ad],
                    m.lora_A[ad].weight.detach().clone(),
                    m.lora_B[ad].weight.detach().clone(),
                    t.weight.detach().to("cpu", copy=True),
                    m.r[ad],
                    m.lora_alpha[ad],
                    m.scaling[ad],
                )
            )
        cfg = next(iter(model.peft_config.values()))
        self.cfg = (
            cfg,
            cfg.r,
            cfg.lora_alpha,
            cfg.use_rslora,
            dict(getattr(cfg, "rank_pattern", {}) or {}),
            dict(getattr(cfg, "alpha_pattern", {}) or {}),
        )

    def base_weights(self) -> dict[str, torch.Tensor]:
        """W_A of every LoRA target (the frozen base_layer weights as they were before realign)."""
        return {item[0].name: item[5] for item in self.items}

    def restore(self) -> None:
        with torch.no_grad():
            for t, a_mod, b_mod, a_w, b_w, base_w, r, alpha, scaling in self.items:
                m, ad = t.module, t.adapter
                m.lora_A[ad], m.lora_B[ad] = a_mod, b_mod
                a_mod.weight.data.copy_(a_w)
                b_mod.weight.data.copy_(b_w)
                t.weight.data.copy_(base_w.to(t.weight.device))
                m.r[ad], m.lora_alpha[ad], m.scaling[ad] = r, alpha, scaling
        cfg, r, alpha, rs, rp, ap = self.cfg
        cfg.r, cfg.lora_alpha, cfg.use_rslora = r, alpha, rs
        if hasattr(cfg, "rank_pattern"):
            cfg.rank_pattern = rp
        if hasattr(cfg, "alpha_pattern"):
            cfg.alpha_pattern = ap
