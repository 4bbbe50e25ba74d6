"""A LoRA run's outputs (issue 15 items 5 and 7): the adapter at the rank the tolerance needs, the merged
fallback when that adapter would not be smaller, the adapter's own cards, and the merged model written
from the realigned frozen weights without a copy of the model."""

from __future__ import annotations

import copy
import json
import logging

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


def test_adapter_rank_follows_the_tolerance_and_its_cards_say_realigned(tmp_path, unaligned_dir, monkeypatch):
    from peft import PeftModel

    model = _peft()
    copies = _no_module_deepcopy(monkeypatch)
    cfg = IRRConfig(
        unaligned_model=unaligned_dir,
        lora_adapter_tolerance=0.3,
        num_calibration_samples=16,
        irr_output_dir=str(tmp_path / "run" / "_irr"),
    )
    trainer, cb, _ = run(tmp_path, model, cfg, steps=20, learning_rate=5e-3)
    assert copies == []  # neither the merged output nor the adapter needed a second model
    lora = cb.report.extra["lora_adapter"]
    assert lora["adapter"] == "realigned" and lora["tolerance"] == 0.3 and lora["fixed_rank"] is None
    assert lora["adapter_params"] < lora["dense_delta_params"]
    modules = lora["modules"]
    assert len(modules) == 3 * 2 and all(0 <= m["error"] <= 0.3 for m in modules.values())
    out = tmp_path / "run" / "_irr"
    live = trainer.model
    # the saved adapter is the live one: per-module ranks in rank_pattern, loadable on the base
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert {config["rank_pattern"][n.rsplit(".", 1)[0]] for n in modules} == {m["rank"] for m in modules.values()}
    adapter = PeftModel.from_pretrained(world.aligned_model(), out / "adapter")
    torch.testing.assert_close(logits(adapter), logits(live), rtol=1e-4, atol=1e-4)
    # the exact merged model differs from the adapter by the reported approximation only
    report = json.loads((out / "irr_report.json").read_text())
    assert report["extra"]["lora_adapter"]["max_error"] == pytest.approx(lora["max_error"])
    assert "lora_adapter_tolerance" in (out / "README.md").read_text()
    # the adapter's own cards: save_model (PEFT's card) and the Trainer's hub card
    trainer.save_model(str(tmp_path / "saved"))
    card = (tmp_path / "saved" / "README.md").read_text()
    assert "This adapter was safety-realigned with IRR" in card and REALIGNED_TAG in card and "`_irr`" in card
    assert str(tmp_path) not in card  # the merged copy named relative to output_dir
    trainer.save_model()
    trainer.create_model_card(model_name="mine")
    card = (tmp_path / "run" / "README.md").read_text()
    assert "This adapter was safety-realigned with IRR" in card and REALIGNED_TAG in card
    assert card.count("irr-callback: realigned") == 1  # replaced, not appended twice
    assert "mine" in card  # the Trainer's own card, with the note kept


def test_adapter_not_smaller_than_the_dense_delta_saves_the_merged_model(tmp_path, unaligned_dir, caplog):
    cfg = IRRConfig(
        unaligned_model=unaligned_dir, lora_adapter_tolerance=0.0, lora_output="adapter", num_calibration_samples=16
    )
    with caplog.at_level(logging.WARNING, logger="irr_callback"):
        trainer, cb, _ = run(tmp_path, _peft(), cfg, steps=20, learning_rate=5e-3)
    lora = cb.report.extra["lora_adapter"]
    assert lora["adapter"].startswith("not kept") and lora["adapter_params"] >= lora["dense_delta_params"]
    assert "NOT the realigned model" in caplog.text and "merge_and_unload" in caplog.text
    out = tmp_path / "run" / "_irr"  # no irr_output_dir: the merged model still goes somewhere (not uploaded)
    assert (out / "config.json").exists() and not (out / "adapter_config.json").exists()  # merged, not an adapter
    assert "merged model was saved instead" in (out / "README.md").read_text()
    # the live PeftModel is the exact realigned model (frozen weights, B = 0): what was saved, exactly
    live = trainer.model
    saved = load_file(out / "model.safetensors")
    exact = copy.deepcopy(live).merge_and_unload().state_dict()
    assert all(torch.equal(saved[k], exact[k]) for k in saved) and set(saved) <= set(exact)
    trainer.save_model(str(tmp_path / "saved"))
    card = (tmp_path / "saved" / "README.md").read_text()
    assert "this adapter is NOT the realigned model" in card and "`_irr`" in card


def test_merged_output_equals_merge_and_unload_exactly_without_a_copy(tmp_path, monkeypatch):
    model = _peft()
    with torch.no_grad():  # a trained adapter: B != 0
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(len(name)))
    calibration = world.attack_dataset().select(range(8))
    factors = AdapterFactors(percdamp=0.01, tolerance=0.1)
    realign(model, safety_vector=None, calibration=calibration, config=IRRConfig(identify_mode="none"),
            progress=False, lowrank=factors)  # fmt: skip
    assert len(factors.factors) == 6 and all(f.error <= 0.1 for f in factors.factors.values())
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


def test_tolerance_is_validated_by_name():
    for bad in (-0.1, 1.0, float("nan"), "0.1", True):
        with pytest.raises(IRRConfigError, match="lora_adapter_tolerance"):
            IRRConfig(lora_adapter_tolerance=bad)


def test_save_failure_still_leaves_the_realigned_adapter_live(tmp_path, unaligned_dir, monkeypatch):
    import irr_callback.callback as callback_module

    def failing(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(callback_module, "save_realigned", failing)
    cfg = IRRConfig(
        unaligned_model=unaligned_dir,
        lora_adapter_tolerance=0.3,
        num_calibration_samples=16,
        on_error="warn",
        irr_output_dir=str(tmp_path / "run" / "_irr"),
    )
    trainer, cb, _ = run(tmp_path, _peft(), cfg, steps=5, learning_rate=5e-3)
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
