"""A LoRA run's outputs (issue 22): the live PeftModel is the realigned adapter at the trained rank (what
save_model() writes), never a zero adapter on any path, the adapter's own cards with ranks and objective gaps,
and the opt-in merged model written from the realigned frozen weights without a copy of the model."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors.torch import load_file

from irr_callback import IRRConfig, realign
from irr_callback.config import IRRConfigError
from irr_callback.outputs.realigned_model import save_realigned
from irr_callback.peft_utils import REALIGNED_TAG, merged_state_dict
from irr_callback.pipeline.lowrank import AdapterFactors
from tests import callback_world as world
from tests.callback.test_callback import _one_thread, logits, run  # noqa: F401  (_one_thread: a fixture)
from tests.callback.test_callback import unaligned_dir as unaligned_dir_fixture


unaligned_dir = unaligned_dir_fixture


def _peft(r=4, modules=("q_proj", "v_proj", "down_proj")):
    from peft import LoraConfig, get_peft_model

    return get_peft_model(world.aligned_model(), LoraConfig(r=r, lora_alpha=2 * r, target_modules=list(modules)))


def _no_module_deepcopy(monkeypatch) -> list:
    """Record every deep copy of a module (a second model in memory) from here on."""
    copies: list = []
    real = copy.deepcopy

    def spy(obj, *args, **kwargs):
        if isinstance(obj, torch.nn.Module):
            copies.append(type(obj).__name__)
        return real(obj, *args, **kwargs)

    monkeypatch.setattr(copy, "deepcopy", spy)
    return copies


def _lora_b_tensors(directory) -> dict[str, torch.Tensor]:
    return {k: v for k, v in load_file(directory / "adapter_model.safetensors").items() if "lora_B" in k}


def _assert_adapter_is_not_zero(directory) -> None:
    """What a PEFT user loads: an adapter that changes the base model (some B != 0 in every module written)."""
    tensors = _lora_b_tensors(directory)
    assert tensors, f"{directory}: no LoRA B tensor written"
    zero = [k for k, v in tensors.items() if not bool(v.abs().amax() > 0)]
    assert not zero, f"{directory}: zeroed adapter modules written: {zero[:3]}"


def test_save_model_writes_the_realigned_adapter(tmp_path, unaligned_dir, monkeypatch):
    """The standard flow (train, save_model, load on the base with PEFT) gives the realigned model: the live
    PeftModel IS the realigned adapter, at the rank the user trained, and both cards give ranks and gaps."""
    from peft import PeftModel

    model = _peft(r=4)
    copies = _no_module_deepcopy(monkeypatch)
    cfg = IRRConfig(
        unaligned_model=unaligned_dir, num_calibration_samples=16, irr_output_dir=str(tmp_path / "run" / "_irr")
    )
    trainer, cb, probe = run(tmp_path, model, cfg, steps=20, learning_rate=5e-3)
    assert copies == []  # neither the merged output nor the adapter needed a second model
    lora = cb.report.extra["lora_adapter"]
    modules = lora["modules"]
    assert len(modules) == 3 * 2 and lora["ranks"].startswith("2x the rank each module was trained at")
    assert all(m["rank"] == 2 * m["trained_rank"] == 8 for m in modules.values())
    assert not lora["exact"]  # the paper's mask: a truncation, whose gap may be negative (removed entries return)
    live = trainer.model
    trainer.save_model(str(tmp_path / "saved"))
    _assert_adapter_is_not_zero(tmp_path / "saved")
    config = json.loads((tmp_path / "saved" / "adapter_config.json").read_text())
    assert config["r"] == 8 and all(config["rank_pattern"][n.rsplit(".", 1)[0]] == 8 for n in modules)
    loaded = PeftModel.from_pretrained(world.aligned_model(), tmp_path / "saved")
    torch.testing.assert_close(logits(loaded), logits(live), rtol=1e-4, atol=1e-4)
    assert not torch.allclose(logits(loaded), logits(world.aligned_model()), atol=1e-3)  # not the base model
    assert world.refusal_rate(loaded) > probe.refusal  # and realigned, not the fine-tune
    # the exact merged model (opt-in copy) and the adapter differ by the reported gaps only
    out = tmp_path / "run" / "_irr"
    merged = world.aligned_model().__class__.from_pretrained(out)
    assert not torch.equal(logits(merged), logits(live))
    report = json.loads((out / "irr_report.json").read_text())
    assert report["extra"]["lora_adapter"]["max_relative_gap"] == pytest.approx(lora["max_relative_gap"])
    # both cards: the irr output's and the adapter's own (save_model, the Trainer's hub card), module by module
    name = next(iter(modules))
    for card in ((out / "README.md").read_text(), (tmp_path / "saved" / "README.md").read_text()):
        assert "| module | rank | trained rank | objective gap |" in card and f"`{name}` | 8 | 4 |" in card
    card = (tmp_path / "saved" / "README.md").read_text()
    assert "This adapter was safety-realigned with IRR" in card and REALIGNED_TAG in card and "`_irr`" in card
    assert str(tmp_path) not in card  # the merged copy named relative to output_dir
    trainer.save_model()
    trainer.create_model_card(model_name="mine")
    card = (tmp_path / "run" / "README.md").read_text()
    assert "This adapter was safety-realigned with IRR" in card and REALIGNED_TAG in card
    assert card.count("irr-callback: realigned") == 1  # replaced, not appended twice
    assert "mine" in card  # the Trainer's own card, with the note kept


def _fail_realign(monkeypatch):
    import irr_callback.callback as callback_module

    def failing(*args, **kwargs):
        raise RuntimeError("solver failed")

    monkeypatch.setattr(callback_module, "realign", failing)


def _fail_save(monkeypatch):
    import irr_callback.callback as callback_module

    def failing(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(callback_module, "save_realigned", failing)


def _zero_factors(monkeypatch):
    """Every module's realigned delta comes out zero: the plan must refuse, never install a zero adapter."""
    from irr_callback.pipeline import lowrank

    real = lowrank.AdapterFactors.after

    def after(self, groups, settings):
        real(self, groups, settings)
        for f in self.factors.values():
            f.b, f.a = f.b[:, :0], f.a[:0]

    monkeypatch.setattr(lowrank.AdapterFactors, "after", after)


@pytest.mark.parametrize(
    "path, options, setup",
    [
        ("adapter only", {"lora_output": "adapter"}, None),
        ("merged only", {"lora_output": "merged"}, None),
        ("not saved", {"save_realigned": False}, None),
        ("rank 1", {"lora_refactor_rank": 1}, None),
        ("save fails", {}, _fail_save),
        ("realign fails", {}, _fail_realign),
        ("zero realigned delta", {}, _zero_factors),
    ],
)
def test_no_code_path_writes_or_leaves_a_zero_adapter(tmp_path, unaligned_dir, monkeypatch, path, options, setup):
    """Whatever happens at train end (every output option, a failed save, a failed realignment, a realigned
    delta of zero), what save_model() writes loads on the base as the live model, and is never a zero adapter;
    neither is any adapter the run itself wrote."""
    from peft import PeftModel

    if setup is not None:
        setup(monkeypatch)
    copy_at = {} if path == "not saved" else {"irr_output_dir": str(tmp_path / "run" / "_irr")}
    cfg = IRRConfig(unaligned_model=unaligned_dir, num_calibration_samples=8, on_error="warn", **copy_at, **options)
    trainer, cb, _ = run(tmp_path, _peft(), cfg, steps=5, learning_rate=5e-3)
    live = trainer.model
    trainer.save_model(str(tmp_path / "saved"))
    _assert_adapter_is_not_zero(tmp_path / "saved")
    loaded = PeftModel.from_pretrained(world.aligned_model(), tmp_path / "saved")
    torch.testing.assert_close(logits(loaded), logits(live), rtol=1e-4, atol=1e-4)
    for written in (tmp_path / "run").rglob("adapter_model.safetensors"):
        _assert_adapter_is_not_zero(written.parent)
    realigned = cb.report.status in ("ok", "save_failed")
    assert realigned == (path not in ("realign fails", "zero realigned delta")), cb.report.error
    if not realigned:  # the fine-tuned adapter is kept as trained (the user's fine-tune is never lost)
        assert "lora_adapter" not in cb.report.extra


def test_merged_output_equals_merge_and_unload_exactly_without_a_copy(tmp_path, monkeypatch):
    model = _peft()
    with torch.no_grad():  # a trained adapter: B != 0
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(len(name)))
    calibration = world.attack_dataset().select(range(8))
    factors = AdapterFactors(tolerance=0.1)
    realign(model, safety_vector=None, calibration=calibration, config=IRRConfig(identify_mode="none"),
            progress=False, lowrank=factors)  # fmt: skip
    assert len(factors.factors) == 6 and all(f.relative_gap <= 0.1**2 + 1e-9 for f in factors.factors.values())
    copies = _no_module_deepcopy(monkeypatch)
    save_realigned(model, str(tmp_path / "merged"), rename=merged_state_dict)
    assert copies == []
    monkeypatch.undo()
    saved = load_file(tmp_path / "merged" / "model.safetensors")
    exact = copy.deepcopy(model).merge_and_unload().state_dict()
    assert set(saved) <= set(exact) and not any("lora" in k or "base_layer" in k for k in saved)
    assert all(torch.equal(saved[k], exact[k]) for k in saved)
    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    torch.testing.assert_close(logits(reloaded), logits(model), rtol=0, atol=0)


def test_rank_options_are_validated_by_name():
    for bad in (-0.1, 1.0, float("nan"), "0.1", True):
        with pytest.raises(IRRConfigError, match="lora_adapter_tolerance"):
            IRRConfig(lora_adapter_tolerance=bad)
    for bad in (0, 1.5, "2", True):
        with pytest.raises(IRRConfigError, match="lora_rank_multiple"):
            IRRConfig(lora_rank_multiple=bad)
    assert IRRConfig().lora_adapter_tolerance is None and IRRConfig().lora_rank_multiple == 2


def test_save_failure_still_leaves_the_realigned_adapter_live(tmp_path, unaligned_dir, monkeypatch):
    import irr_callback.callback as callback_module

    def failing(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(callback_module, "save_realigned", failing)
    cfg = IRRConfig(
        unaligned_model=unaligned_dir,
        lora_rank_multiple=3,
        num_calibration_samples=16,
        on_error="warn",
        irr_output_dir=str(tmp_path / "run" / "_irr"),
    )
    trainer, cb, _ = run(tmp_path, _peft(), cfg, steps=5, learning_rate=5e-3)
    assert {m["rank"] for m in cb.report.extra["lora_adapter"]["modules"].values()} == {12}  # 3 x the trained 4
    assert cb.report.status == "save_failed" and not (tmp_path / "run" / "_irr").exists()
    live = trainer.model
    aligned = dict(world.aligned_model().named_parameters())
    for name, module in live.named_modules():
        if hasattr(module, "base_layer") and hasattr(module, "lora_A"):
            plain = name.removeprefix("base_model.model.") + ".weight"
            assert torch.equal(module.base_layer.weight, aligned[plain])  # W_A back under the realigned factors
    ranks = {n.rsplit(".", 1)[0]: m["rank"] for n, m in cb.report.extra["lora_adapter"]["modules"].items()}
    assert next(iter(live.peft_config.values())).rank_pattern == ranks
    trainer.save_model(str(tmp_path / "saved"))
    assert "not saved by the run" in (tmp_path / "saved" / "README.md").read_text()


@pytest.mark.parametrize("where", ["disk", "cpu"])
def test_lora_backup_keeps_the_frozen_weights_where_the_config_says_and_restores_them(where):
    """W_A of every LoRA target is most of the model: with IRRConfig.backup='disk' (the default) the
    callback's LoRA backup keeps it in a temp file, not as a second copy in RAM, and still restores it
    exactly (and the adapter's modules and config) after the weights were overwritten."""
    from irr_callback.peft_utils import LoraBackup
    from irr_callback.pipeline.writing import DiskBackup
    from irr_callback.targets import find_targets

    model = _peft()
    _, _, targets = find_targets(model, None)
    targets = [t for t in targets if t.kind == "lora"]
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    cfg = next(iter(model.peft_config.values()))
    backup = LoraBackup(model, targets, where)
    assert isinstance(backup.weights, DiskBackup) == (where == "disk")
    if where == "disk":  # nothing of W_A stays in RAM once written
        originals = list(backup.weights.originals())
        assert len(originals) == len(targets) and all(e[5] is None for e in backup.weights._entries)
    with torch.no_grad():
        for t in targets:
            t.weight.add_(1.0)
            t.module.lora_B[t.adapter].weight.add_(1.0)
    cfg.r = 99
    backup.restore()
    assert cfg.r == 4
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())
