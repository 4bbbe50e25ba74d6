"""`callbacks=[IRRCallback()]` and nothing else (issue 14): offline, the callback takes the shipped
harmful prompts, lets the base write its own answers at train begin (cached under the base
fingerprint), realigns with `IRRConfig.recommended()` at train end, and writes the output and a
report that names the default set. A second run reuses the cached answers.

On the toy world: harmful prompts without responses, answered by the toy base at train begin, realign
like the toy's own refusals (same refusal and downstream figures within 0.05)."""

from __future__ import annotations

import json
import os

import pytest
import torch
from transformers import DataCollatorForSeq2Seq, Trainer, TrainingArguments

from irr_callback import IRRCallback, IRRConfig
from irr_callback.inputs import refusals
from irr_callback.inputs import safety_prompts as sp
from irr_callback.pipeline.auto_weight import AUTO_TASK_TOLERANCE
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
    report = json.loads((tmp_path / "run1" / "irr_report.json").read_text())
    assert report["status"] == "ok" and callback.output_path is None  # no copy: the live model is realigned
    assert report["config"]["identify_mode"] == "none" and report["config"]["safety_weight"] == "auto"
    # the retain term is on (ρ = RECOMMENDED_RETAIN_WEIGHT): the shipped general prompts, answered by the base
    assert report["config"]["retain_weight"] == IRRConfig.recommended().retain_weight > 0
    assert report["config"]["safety_tokens"] == "answer" and report["retain_tokens"] > 0
    retain = report["extra"]["safety_inputs"]["retain_data"]
    assert retain["generated_responses"] and retain["examples"] == IRRConfig().num_retain_samples
    data = report["extra"]["safety_inputs"]["safety_data"]
    assert data["set"] == sp.SHIPPED_NAME and data["origin"] == "shipped" and data["license"] == "Apache-2.0"
    assert data["prompts"] == IRRConfig().num_safety_samples and data["generated_responses"]
    # the saved report names the cache file, never its path on this machine; the callback keeps the path
    local = callback.sources["safety_data"]["path"]
    assert data["cached"] is False and local.startswith(str(tmp_path / "cache")) and os.path.isfile(local)
    assert data["path"] == os.path.basename(local) and str(tmp_path) not in json.dumps(report)
    # one description of the safety data: the stream's rows are the default prompts the base answered
    stream = report["extra"]["safety_inputs"]["safety_calibration"]
    assert stream["safety_dataset"] == data["set"] and stream["generated_responses"] is True
    assert stream["source"] == "safety_data"  # the card names the rows by reference, not as a second data set
    card = (tmp_path / "run1" / "README.md").read_text()
    assert "safety_data" in card and "rows of the safety data (`safety_data`)" in card  # the model card lists it

    generated = calls["n"]
    _, again = train_with_default_callback(str(tmp_path / "run2"))
    assert calls["n"] == generated  # nothing generated: the cached answers were reused
    second = json.loads((tmp_path / "run2" / "irr_report.json").read_text())
    assert second["status"] == "ok" and second["extra"]["safety_inputs"]["safety_data"]["cached"] is True
    assert again.sources["safety_data"]["path"] == local


def _toy_run(world, output_dir: str, safety_dataset) -> tuple[Trainer, IRRCallback]:
    """The toy world's downstream fine-tune (the demo's recipe, 120 steps) with the recommended preset."""
    import copy

    from irr_callback.inputs.data import collate

    hp = world.hparams
    callback = IRRCallback(
        IRRConfig.recommended(cache_dir=os.path.join(output_dir, "cache")), safety_dataset=safety_dataset
    )
    args = TrainingArguments(
        output_dir,
        max_steps=120,
        learning_rate=hp["downstream_lr"],
        per_device_train_batch_size=hp["batch_size"],
        lr_scheduler_type="linear",
        warmup_steps=12,
        weight_decay=0.0,
        adam_beta2=0.98,
        max_grad_norm=1.0,
        save_strategy="no",
        logging_strategy="no",
        report_to=[],
        use_cpu=True,
        seed=0,
        disable_tqdm=True,
    )
    pad = world.tokenizer.pad_token_id
    trainer = Trainer(
        model=copy.deepcopy(world.aligned_model),
        args=args,
        train_dataset=world.tokenize_sft(world.downstream_train),
        processing_class=world.tokenizer,
        data_collator=lambda rows: collate(rows, pad),
        callbacks=[callback],
    )
    trainer.train()
    return trainer, callback


def test_toy_prompts_answered_by_the_base_realign_like_the_toys_own_refusals(toy_world, tmp_path):
    """`IRRCallback(safety_dataset=<harmful prompts without responses>)`: the toy base writes the answers
    at train begin; the realigned model scores like the one realigned with the toy's own refusals."""
    world = toy_world
    own, own_cb = _toy_run(world, str(tmp_path / "own"), world.safety_data)
    prompts_only = world.safety_data.remove_columns("response")
    base, base_cb = _toy_run(world, str(tmp_path / "base"), prompts_only)
    assert own_cb.sources["safety_data"]["generated_responses"] is False
    written = base_cb.sources["safety_data"]
    assert written["generated_responses"] and written["prompts"] == len(world.safety_data) and written["looks_aligned"]
    for cb in (own_cb, base_cb):
        assert cb.report.status == "ok" and cb.report.setting == "recommended" and cb.report.totals["removed"] == 0
    scores = {"own": world.evaluate(own.model), "base": world.evaluate(base.model)}
    for metric in ("refusal_attacked", "refusal_unattacked", "downstream_accuracy"):
        assert abs(scores["base"][metric] - scores["own"][metric]) <= 0.05, (metric, scores)
    # and the realignment restored the refusals, or the auto rule found that restoring them costs more of the
    # task than its tolerance and kept the task, saying so (docs/safety-weight.md: the rule chosen on the dev worlds)
    auto = base_cb.report.auto
    chosen = next(c for c in auto["candidates"] if c["safety_weight"] == auto["chosen"])
    kept_task = auto["passing"] is False and chosen["task_accuracy_lost"] <= AUTO_TASK_TOLERANCE
    assert scores["base"]["refusal_attacked"] >= 0.8 or kept_task, auto["reason"]
    answers = base_cb.safety_dataset["response"]  # the base's answers, as the safety stream read them
    if answers == world.safety_data["response"]:  # identical safety data (so on the tiny world): identical weights
        assert base_cb.report.safety_weight == own_cb.report.safety_weight
        for (name, a), (_, b) in zip(own.model.named_parameters(), base.model.named_parameters()):
            torch.testing.assert_close(b, a, rtol=0, atol=0, msg=name)
