"""`callbacks=[IRRCallback()]` and nothing else (issue 14): offline, the callback takes the shipped
harmful prompts, lets the base write its own answers at train begin (cached under the base
fingerprint), realigns with `IRRConfig.recommended()` at train end, and writes the output and a
report that names the default set. A second run reuses the cached answers.

Needs the safety stream wired into `IRRCallback` (`safety_calibration` passed to `realign`, no
safety vector needed with `identify_mode="none"`): until that is merged the end-to-end test is an
expected failure (strict once the wiring is in)."""

from __future__ import annotations

import json
import os

import pytest
from transformers import DataCollatorForSeq2Seq, Trainer, TrainingArguments

from irr_callback import IRRCallback, IRRConfig, refusals
from irr_callback import safety_prompts as sp
from tests import callback_world as world


pytestmark = pytest.mark.usefixtures("one_thread")


def test_no_argument_callback_uses_the_recommended_preset():
    callback = IRRCallback()
    assert callback.config == IRRConfig.recommended() and callback.config.setting_name == "recommended"
    assert callback.safety_dataset is None and callback.harmful_dataset is None


def train_with_default_callback(output_dir: str) -> tuple[Trainer, IRRCallback]:
    callback = IRRCallback()
    args = TrainingArguments(
        output_dir,
        report_to=[],
        use_cpu=True,
        max_steps=10,
        per_device_train_batch_size=16,
        learning_rate=2e-3,
        save_strategy="no",
        disable_tqdm=True,
        logging_strategy="no",
        seed=0,
    )
    trainer = Trainer(
        model=world.aligned_model(),
        args=args,
        train_dataset=world.attack_dataset(),
        processing_class=world.tokenizer(),
        data_collator=DataCollatorForSeq2Seq(world.tokenizer()),
        callbacks=[callback],
    )
    trainer.train()
    return trainer, callback


def test_trainer_with_no_argument_callback_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("IRR_CACHE", str(tmp_path / "cache"))
    calls = {"n": 0}
    original = refusals.generate_responses

    def counted(*args, **kwargs):
        calls["n"] += 1
        return original(*args, **kwargs)

    monkeypatch.setattr(refusals, "generate_responses", counted)

    trainer, callback = train_with_default_callback(str(tmp_path / "run1"))
    assert calls["n"] > 0  # the base wrote its answers at train begin
    report = json.loads((tmp_path / "run1" / "irr" / "irr_report.json").read_text())
    assert report["status"] == "ok" and callback.output_path == str(tmp_path / "run1" / "irr")
    assert report["config"]["identify_mode"] == "none" and report["config"]["safety_weight"] == "auto"
    data = report["extra"]["safety_inputs"]["safety_data"]
    assert data["set"] == sp.SHIPPED_NAME and data["origin"] == "shipped" and data["license"] == "Apache-2.0"
    assert data["prompts"] == IRRConfig().num_safety_samples and data["generated_responses"]
    assert data["cached"] is False and data["path"].startswith(str(tmp_path / "cache"))
    assert os.path.isfile(data["path"]) and (tmp_path / "run1" / "irr_report.json").is_file()
    assert "safety_data" in (tmp_path / "run1" / "irr" / "README.md").read_text()  # the model card lists it

    generated = calls["n"]
    _, again = train_with_default_callback(str(tmp_path / "run2"))
    assert calls["n"] == generated  # nothing generated: the cached answers were reused
    second = json.loads((tmp_path / "run2" / "irr" / "irr_report.json").read_text())
    assert second["status"] == "ok" and second["extra"]["safety_inputs"]["safety_data"]["cached"] is True
    assert again.sources["safety_data"]["path"] == data["path"]
