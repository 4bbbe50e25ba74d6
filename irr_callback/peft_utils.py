"""PEFT specifics of the callback: what is supported, the realigned adapter, and the merged output.

A LoRA run ends with the realigned adapter live: the pipeline's `AdapterFactors` step computes, per
module, the rank-constrained optimum of the recalibration objective at the rank the user trained at
(`core.lowrank`; exact without a removal mask), `AdapterPlan` records ranks and objective gaps,
`install_factors` / `LoraBackup.restore_bases` turn the PeftModel into that adapter on W_A, so
`trainer.evaluate()`, `save_model()` and `push_to_hub()` all see it. `merged_state_dict` names the
realigned frozen weights as the plain model's for the opt-in exact merged output (read before W_A is put
back). `mark_realigned` makes the adapter's own model card (PEFT's / the Trainer's) say so.
"""

from __future__ import annotations

import re
import types
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn

from .core.lowrank import LowRankFactors
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
class AdapterPlan:
    """The realigned adapter of a LoRA run: per module its rank and the objective gap that rank costs
    (`core.lowrank`: the rank-constrained optimum of the recalibration objective), and the rule that chose it."""

    factors: dict[str, LowRankFactors]
    rule: str  # how the ranks were chosen, for the report and the cards
    adapter_params: int
    dense_params: int

    @classmethod
    def build(cls, targets: list[Target], factors: dict[str, LowRankFactors], *, rule: str) -> AdapterPlan:
        lora = [t for t in targets if t.kind == "lora"]
        missing = [t.name for t in lora if t.name not in factors]
        if missing:
            raise RuntimeError(f"no low-rank factors were computed for {missing[:3]}")
        if lora and all(factors[t.name].rank == 0 for t in lora):
            raise RuntimeError(
                "the realigned delta is zero in every LoRA module (the realignment removed the whole fine-tune): "
                "an all-zero adapter is never written or left live; the fine-tuned adapter is kept"
            )
        shapes = {t.name: t.out_in_shape for t in lora}
        params = sum(_rank(factors[n]) * (o + i) for n, (o, i) in shapes.items())
        dense = sum(o * i for o, i in shapes.values())
        return cls({t.name: factors[t.name] for t in lora}, rule, params, dense)

    @property
    def max_relative_gap(self) -> float:
        return max((f.relative_gap for f in self.factors.values()), default=0.0)

    @property
    def max_rank(self) -> int:
        return max((_rank(f) for f in self.factors.values()), default=0)

    @property
    def exact(self) -> bool:
        """Every module is the exact rank-constrained optimum (no removal mask)."""
        return all(f.exact for f in self.factors.values())

    def to_dict(self) -> dict:
        """`report.extra["lora_adapter"]`: small and readable, one entry per module."""
        return {
            "adapter": "realigned",
            "ranks": self.rule,
            "objective": "the recalibration objective ||D' - D~||^2_H + const, H = H_d + eps*I + lambda*H_s (damped)",
            "objective_gap": "objective(BA) - objective(D'), D' the realigned delta without the rank limit",
            "relative_gap": "objective_gap / ||D'||^2_H (the realigned delta's own output energy)",
            "exact": self.exact,
            "max_rank": self.max_rank,
            "max_relative_gap": self.max_relative_gap,
            "adapter_params": self.adapter_params,
            "dense_delta_params": self.dense_params,
            "modules": {
                name: {
                    "rank": _rank(f),
                    "trained_rank": f.trained_rank,
                    "objective_gap": float(f"{f.objective_gap:.6g}"),
                    "relative_gap": float(f"{f.relative_gap:.6g}"),
                    "exact": f.exact,
                }
                for name, f in self.factors.items()
            },
        }


def _rank(factors: LowRankFactors) -> int:
    """PEFT needs r >= 1: a module whose realigned delta is zero is stored at rank 1 with zero factors."""
    return max(factors.rank, 1)


def install_factors(model: nn.Module, targets: list[Target], plan: AdapterPlan) -> None:
    """In place: each LoRA layer's (A, B) ← the plan's factors (out×in layout, scaling 1), the peft
    config updated (per-module ranks in rank_pattern / alpha_pattern, no rsLoRA) so `save_pretrained`
    writes a loadable adapter. The frozen weights are left alone (`LoraBackup.restore_bases` puts W_A back)."""
    lora = [t for t in targets if t.kind == "lora"]
    adapter = lora[0].adapter
    patterns: dict[str, int] = {}
    with torch.no_grad():
        for t in lora:
            f = plan.factors[t.name]
            r = _rank(f)
            patterns[t.name.rsplit(".", 1)[0]] = r
            module = t.module
            old_a, old_b = module.lora_A[adapter], module.lora_B[adapter]
            out_features, in_features = t.out_in_shape
            new_a = nn.Linear(in_features, r, bias=False).to(device=old_a.weight.device, dtype=old_a.weight.dtype)
            new_b = nn.Linear(r, out_features, bias=False).to(device=old_b.weight.device, dtype=old_b.weight.dtype)
            new_a.weight.zero_()
            new_b.weight.zero_()
            new_a.weight[: f.rank].copy_(f.a)
            new_b.weight[:, : f.rank].copy_(f.b)
            new_a.weight.requires_grad_(old_a.weight.requires_grad)
            new_b.weight.requires_grad_(old_b.weight.requires_grad)
            module.lora_A[adapter], module.lora_B[adapter] = new_a, new_b
            module.r[adapter] = r
            module.lora_alpha[adapter] = r
            module.scaling[adapter] = 1.0
    cfg = model.peft_config[adapter]
    top = plan.max_rank or 1
    cfg.r, cfg.lora_alpha, cfg.use_rslora = top, top, False
    cfg.rank_pattern = dict(patterns)
    cfg.alpha_pattern = dict(patterns)


def merged_state_dict(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The plain model's state dict from a LoRA-injected model's (`get_base_model().state_dict()`):
    the same tensors (no copy), `x.base_layer.w` named `x.w`, the adapter's own tensors left out.
    After `realign` the frozen weights hold W_A + Δ′ and B = 0, so this IS `merge_and_unload()`'s
    state dict, without a second model."""
    out = {}
    for name, tensor in state.items():
        if _LORA_PART.search(name):
            continue
        out[name.replace(".base_layer.", ".")] = tensor
    return out


_LORA_PART = re.compile(r"\.lora_(A|B|embedding_A|embedding_B|magnitude_vector)\.")


class LoraBackup:
    """Everything `install_factors` and `realign` change in a PeftModel, to put it back on failure.

    The frozen weights W_A (most of the model at 7B-70B) go to `pipeline.writing.make_backup(where)`:
    by default a temp file (`IRRConfig.backup="disk"`), not a second copy of the targets in RAM; the
    adapter's own factors and settings are small and kept in memory."""

    def __init__(self, model: nn.Module, targets: list[Target], where: str = "disk"):
        from .pipeline.writing import make_backup

        self.model = model
        self.items = []
        self.weights = make_backup(where)
        for t in targets:
            if t.kind != "lora":
                continue
            m, ad = t.module, t.adapter
            self.weights.save(t.weight)
            self.items.append(
                (
                    t,
                    m.lora_A[ad],
                    m.lora_B[ad],
                    m.lora_A[ad].weight.detach().clone(),
                    m.lora_B[ad].weight.detach().clone(),
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

    def restore_bases(self) -> None:
        """base_layer.weight ← W_A for every LoRA target (with installed factors the PeftModel is then the
        realigned adapter), read back from the backup one tensor at a time; the backup is then released."""
        with torch.no_grad():
            for param, original in self.weights.originals():
                param.data.copy_(original.to(device=param.device, dtype=param.dtype))
        self.weights.close()

    def restore(self) -> None:
        """Everything as it was before `realign`: the frozen weights, the adapter's modules, factors and config."""
        self.restore_bases()
        with torch.no_grad():
            for t, a_mod, b_mod, a_w, b_w, r, alpha, scaling in self.items:
                m, ad = t.module, t.adapter
                m.lora_A[ad], m.lora_B[ad] = a_mod, b_mod
                a_mod.weight.data.copy_(a_w)
                b_mod.weight.data.copy_(b_w)
                m.r[ad], m.lora_alpha[ad], m.scaling[ad] = r, alpha, scaling
        cfg, r, alpha, rs, rp, ap = self.cfg
        cfg.r, cfg.lora_alpha, cfg.use_rslora = r, alpha, rs
        if hasattr(cfg, "rank_pattern"):
            cfg.rank_pattern = rp
        if hasattr(cfg, "alpha_pattern"):
            cfg.alpha_pattern = ap

    def close(self) -> None:
        """The run ended well: the backup's temp file (or RAM) is released."""
        self.weights.close()


REALIGNED_TAG = "irr-realigned"
#: The block IRR adds to a card someone else writes (PEFT's, the Trainer's, TRL's): replaced, never repeated.
_NOTE_START, _NOTE_END = "<!-- irr-callback: realigned -->", "<!-- /irr-callback -->"


def mark_realigned(model: nn.Module, note: str) -> None:
    """Make the PeftModel's own cards say what `note` says: `save_pretrained` (hence
    `trainer.save_model()`) and `Trainer.create_model_card` / `push_to_hub` both end in PEFT's
    `create_or_update_model_card`, which keeps an existing README's text; this instance's is wrapped to
    append (or replace) the note there. The `irr-realigned` tag goes to the base model's `model_tags`,
    which PEFT's card and the Trainer's hub card both read."""
    inner = model.get_base_model()
    if hasattr(inner, "add_model_tags"):
        inner.add_model_tags([REALIGNED_TAG])
    model._irr_card_note = note
    model.create_or_update_model_card = types.MethodType(_card_with_note, model)


def _card_with_note(self, output_dir: str) -> None:
    import os

    type(self).create_or_update_model_card(self, output_dir)
    append_note(os.path.join(output_dir, "README.md"), self._irr_card_note)


def append_note(path: str, note: str) -> None:
    """Add `note` to the card at `path` (a README.md) inside IRR's marker block, replacing the block an
    earlier call left there; a missing card becomes the note alone. (The adapter's card here, the
    Trainer's card of a full fine-tune in the callback.)"""
    import os

    text = ""
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as fh:
            text = fh.read()
    block = f"{_NOTE_START}\n{note.rstrip()}\n{_NOTE_END}"
    if _NOTE_START in text and _NOTE_END in text:
        head, rest = text.split(_NOTE_START, 1)
        text = head + block + rest.split(_NOTE_END, 1)[1]
    else:
        text = (text.rstrip("\n") + "\n\n" if text.strip() else "") + block + "\n"
    with open(path, "w", encoding="utf-8") as fh:
        fh.write(text)
