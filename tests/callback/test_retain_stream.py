"""IRRCallback with the retain stream (issue 19): general prompts answered by the base at train begin (the
shipped set offline), cached under the base fingerprint, persisted for a resumed run, and used by `realign`;
or the user's own `retain_dataset`."""

from __future__ import annotations

import glob
import json

import datasets
import pytest
from transformers import TrainerControl, TrainerState, TrainingArguments

from irr_callback import IRRCallback, IRRConfig
from irr_callback.inputs.general_prompts import SHIPPED_NAME
from tests import callback_world as world
from tests.callback.test_callback import LAST, Interrupt, _one_thread, run  # noqa: F401  (one thread: the module fixture)
from tests.callback.test_safety_stream import refusals


def config(tmp_path, **overrides) -> IRRConfig:
    values = dict(
        identify_mode="none",
        safety_weight=0.3,
        retain_weight=1.0,
        num_calibration_samples=16,
        num_retain_samples=8,
        retain_max_new_tokens=4,
        cache_dir=str(tmp_path / "cache"),
    )
    return IRRConfig(**{**values, **overrides})


def test_default_retain_prompts_answered_by_the_base_cached_and_resumed(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg = config(tmp_path)
    kwargs = dict(callback_kwargs={"safety_dataset": refusals()}, save_strategy="steps", save_steps=2)
    with pytest.raises(KeyboardInterrupt):  # stopped after checkpoint-2: `_irr_run/` stays for the resume
        run(tmp_path, world.aligned_model(), cfg, steps=4, name="a", extra_callbacks=[Interrupt(3)], **kwargs)
    first = LAST["callback"]
    info = first.sources["retain_data"]
    assert info["source"] == "default" and info["set"] == SHIPPED_NAME and info["origin"] == "shipped"
    assert info["generated_responses"] and info["examples"] == 8 and "refusal_rate" not in info
    assert glob.glob(str(tmp_path / "cache" / "*" / "answers-*.json"))  # cached under the base fingerprint
    rows = json.loads((tmp_path / "a" / "_irr_run" / "retain_calibration.json").read_text())["rows"]
    assert len(rows) == 8 and all(any(label != -100 for label in r["labels"]) for r in rows)
    _, resumed, _ = run(
        tmp_path, world.aligned_model(), cfg, steps=4, name="a", resume=str(tmp_path / "a" / "checkpoint-2"), **kwargs
    )
    report = resumed.report
    assert resumed.sources["retain_data"]["resumed"] and resumed.sources["retain_data"]["set"] == SHIPPED_NAME
    assert report.status == "ok" and report.retain_sequences == 8 and report.retain_tokens > 0
    assert report.totals["error_retain"] is not None and all(m.retain_weight == 1.0 for m in report.modules)
    saved = json.loads((tmp_path / "a" / "irr_report.json").read_text())  # output_dir: the report
    assert saved["retain_sequences"] == 8 and saved["config"]["retain_weight"] == 1.0
    assert "retain weight ρ=1" in report.setting_line()


def test_own_retain_dataset_takes_precedence_and_no_weight_means_no_stream(tmp_path):
    own = datasets.Dataset.from_dict({"prompt": ["a b", "c d", "e f"], "response": ["x", "y", "z"]})
    args = TrainingArguments(str(tmp_path / "run"), report_to=[], use_cpu=True, save_strategy="no")
    for weight, expected in ((1.0, 3), (0.0, None)):
        cb = IRRCallback(config(tmp_path, retain_weight=weight), safety_dataset=refusals(), retain_dataset=own)
        cb.on_train_begin(
            args, TrainerState(), TrainerControl(), model=world.aligned_model(), processing_class=world.tokenizer()
        )
        rows = cb._retain_calibration
        assert (None if rows is None else len(rows)) == expected
        if expected:
            assert cb.sources["retain_data"]["generated_responses"] is False
            assert cb.sources["retain_data"]["source"] == "retain_dataset"
        else:
            assert "retain_data" not in cb.sources
