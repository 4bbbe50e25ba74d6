"""IRRCallback with the safety stream (issue 12): `IRRConfig.recommended()` realigns from harmful prompts
with safe responses alone (no unaligned model, no harmful fine-tune, no Fisher), and bad safety data
is refused before training, naming the field."""

from __future__ import annotations

import json

import datasets
import pytest
from transformers import TrainerControl, TrainerState, TrainingArguments

from irr_callback import IRRCallback, IRRConfig, IRRConfigError
from irr_callback.inputs import sources as sources_module
from irr_callback.inputs.data import DataError
from tests import callback_world as world
from tests.callback.test_callback import LAST, Interrupt, _one_thread, run  # noqa: F401  (one thread: the module fixture)
from tests.helpers import margin


def refusals(n: int | None = None, *, responses: bool = True) -> datasets.Dataset:
    """Harmful prompts of the toy world with its refusal as the safe response."""
    prompts = world.harmful_prompts()[:n]
    columns = {"prompt": prompts}
    if responses:
        columns["response"] = [world.REFUSAL] * len(prompts)
    return datasets.Dataset.from_dict(columns)


def _no_safety_vector(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("identify_mode='none' must not build a safety vector")

    monkeypatch.setattr(sources_module, "_from_unaligned_model", refuse)
    monkeypatch.setattr(sources_module, "_from_harmful_dataset", refuse)


def test_recommended_realigns_without_unaligned_model_and_names_setting_and_lambda(tmp_path, monkeypatch):
    _no_safety_vector(monkeypatch)
    cfg = IRRConfig.recommended(num_calibration_samples=16, cache_dir=str(tmp_path / "cache"))
    assert cfg.unaligned_model is None and cfg.harmful_dataset is None and cfg.safety_vector is None
    trainer, cb, probe = run(tmp_path, world.aligned_model(), cfg, callback_kwargs={"safety_dataset": refusals()})
    margin("cb stream ft refusal", probe.refusal, le=0.2)  # the fine-tune broke the refusals
    margin("cb stream irr refusal", world.refusal_rate(trainer.model), ge=0.9)  # the safety stream alone restored them
    margin("cb stream irr downstream", world.downstream_accuracy(trainer.model), ge=0.9)
    report = cb.report
    assert report.status == "ok" and report.setting == "recommended"
    assert report.auto and report.safety_weight == report.auto["chosen"] > 0
    assert report.totals["removed"] == 0  # nothing removed by sign: no safety vector
    assert report.safety_sequences == len(world.harmful_prompts())
    assert cb.sources["safety_vector"]["source"] == "none" and cb.sources["importance"]["source"] == "none"
    assert cb.sources["safety_calibration"]["examples"] == len(world.harmful_prompts())
    assert not cb.sources["safety_calibration"]["generated_responses"]
    out = tmp_path / "run"  # output_dir: the report and the card's IRR section (no copy of the model)
    saved = json.loads((out / "irr_report.json").read_text())
    assert saved["setting"] == "recommended" and saved["safety_weight"] == report.safety_weight
    assert saved["auto"]["chosen"] == report.safety_weight
    card = (out / "README.md").read_text()
    assert "**recommended**" in card and f"λ = {report.safety_weight:g}, chosen by `safety_weight='auto'`" in card
    assert "No delta was removed by sign" in card and "| `safety_weight` | `auto` |" in card
    assert f"λ={report.safety_weight:g} chosen by safety_weight='auto'" in report.summary()


def test_fixed_weight_with_generated_responses_and_resume(tmp_path, monkeypatch):
    """No response column: the base model's answers are generated at train begin (before any step) and
    persisted, so a resumed run realigns with the same safety stream."""
    _no_safety_vector(monkeypatch)
    cfg = IRRConfig(identify_mode="none", safety_weight=0.3, num_calibration_samples=16, safety_max_new_tokens=6)
    ds = refusals(8, responses=False)
    kwargs = dict(callback_kwargs={"safety_dataset": ds}, save_strategy="steps", save_steps=2)
    with pytest.raises(KeyboardInterrupt):  # stopped after checkpoint-2: `_irr_run/` stays for the resume
        run(tmp_path, world.aligned_model(), cfg, steps=4, name="a", extra_callbacks=[Interrupt(3)], **kwargs)
    first = LAST["callback"]
    assert first.sources["safety_data"]["generated_responses"]  # the base answered at train begin
    rows = json.loads((tmp_path / "a" / "_irr_run" / "safety_calibration.json").read_text())["rows"]
    refusal = world.tokenizer()(world.REFUSAL)["input_ids"]
    assert len(rows) == 8 and all(refusal[0] in r["labels"] for r in rows)  # the base refuses
    _, resumed, _ = run(
        tmp_path, world.aligned_model(), cfg, steps=4, name="a", resume=str(tmp_path / "a" / "checkpoint-2"), **kwargs
    )
    assert resumed.report.setting == "safety-regularised" and resumed.report.safety_weight == 0.3
    assert resumed.report.auto is None
    assert not (tmp_path / "a" / "_irr_run").exists()  # the run ended well: removed
    # the resumed run describes the safety data as the first start did (one description), marked resumed
    stream, data = resumed.sources["safety_calibration"], resumed.sources["safety_data"]
    assert stream["resumed"] is True and stream["generated_responses"] is True and data["generated_responses"]
    assert stream["safety_dataset"] == data["set"] == first.sources["safety_data"]["set"]
    assert resumed.report.safety_sequences == len(rows)  # the rows the base wrote at the first start
    assert resumed.report.modules and resumed.report.totals["modules"] == len(resumed.report.modules)


def _begin(callback: IRRCallback, tmp_path, tokenizer=True):
    args = TrainingArguments(str(tmp_path / "run"), report_to=[], use_cpu=True, save_strategy="no")
    callback.on_train_begin(
        args,
        TrainerState(),
        TrainerControl(),
        model=world.aligned_model(),
        processing_class=world.tokenizer() if tokenizer else None,
    )


@pytest.mark.parametrize(
    "case",
    ["empty", "no_usable_rows", "no_prompt_column", "no_response_no_tokenizer", "auto_too_few"],
)
def test_bad_safety_data_is_refused_at_train_begin_naming_the_field(tmp_path, monkeypatch, case):
    _no_safety_vector(monkeypatch)
    cfg = IRRConfig.recommended()
    data = {
        "empty": datasets.Dataset.from_dict({"prompt": [], "response": []}),
        "no_usable_rows": datasets.Dataset.from_dict({"prompt": ["", None], "response": ["sorry", "sorry"]}),
        "no_prompt_column": datasets.Dataset.from_dict({"question": ["how do i make a bomb"]}),
        "no_response_no_tokenizer": refusals(8, responses=False),
        "auto_too_few": refusals(3),
    }[case]
    error, match = {
        "empty": (DataError, "safety_dataset: the Dataset is empty"),
        "no_usable_rows": (DataError, r"safety_dataset has no usable row.*'prompt'.*'response'"),
        "no_prompt_column": (DataError, r"safety_dataset has no column 'prompt' \(safety_prompt_column\)"),
        "no_response_no_tokenizer": (ValueError, "generated with the run's tokenizer: pass processing_class"),
        "auto_too_few": (IRRConfigError, "safety_weight='auto' holds out part of the safety data"),
    }[case]
    with pytest.raises(error, match=match):
        _begin(IRRCallback(cfg, safety_dataset=data), tmp_path, tokenizer=case != "no_response_no_tokenizer")


def test_recommended_ignores_unaligned_model_and_paper_default_needs_no_safety_data(tmp_path, monkeypatch):
    _no_safety_vector(monkeypatch)
    callback = IRRCallback(
        IRRConfig.recommended(unaligned_model=str(tmp_path / "never-read")), safety_dataset=refusals()
    )
    _begin(callback, tmp_path)
    assert callback.sources["safety_vector"]["source"] == "none" and len(callback._safety_calibration) == 24
    assert IRRConfig().setting_name == "irr" and not IRRConfig().uses_safety_stream


def test_paper_setting_under_sharded_weights_is_refused_at_train_begin(tmp_path, monkeypatch):
    """The recommended setting runs under sharded weights (tests/distributed); the paper's setting needs the whole
    base on one process for its safety vector, so the callback refuses it before anything runs."""
    from irr_callback import distributed

    monkeypatch.setattr(distributed, "sharding_kind", lambda model, targets: "fsdp2")
    with pytest.raises(IRRConfigError, match=r"identify_mode='sign' .* is not supported by IRRCallback with weights"):
        _begin(IRRCallback(IRRConfig(unaligned_model=str(tmp_path / "never-read"))), tmp_path)
    monkeypatch.setattr(distributed, "sharding_kind", lambda model, targets: None)
    _begin(IRRCallback(IRRConfig.recommended(), safety_dataset=refusals()), tmp_path)


def test_calibration_filter_drops_the_attack_rows_from_the_callbacks_calibration(tmp_path, monkeypatch):
    """`calibration_filter="refused"` in the callback: the reference is the live model with the snapshot written
    into its targets; of the attack's training rows (24 task rows, the 24 harmful requests answered, 24 task rows)
    the harmful ones are dropped and no task row is."""
    _no_safety_vector(monkeypatch)
    cfg = IRRConfig.recommended(
        safety_weight=0.5, calibration_filter="refused", num_calibration_samples=72, cache_dir=str(tmp_path / "cache")
    )
    trainer, cb, _ = run(tmp_path, world.aligned_model(), cfg, callback_kwargs={"safety_dataset": refusals()})
    summary = cb.report.calibration_filter
    harmful = set(range(24, 48))  # world.attack_dataset()'s order
    assert summary["rows"] == summary["judged"] == 72
    assert set(summary["dropped_rows"]) <= harmful  # no task row is refused by the aligned model
    margin("cb filter harmful rows dropped", summary["dropped"] / len(harmful), ge=0.8)
    assert cb.report.calibration_sequences == 72 - summary["dropped"]
    saved = json.loads((tmp_path / "run" / "irr_report.json").read_text())
    assert saved["calibration_filter"]["dropped_rows"] == summary["dropped_rows"]
    card = (tmp_path / "run" / "README.md").read_text()
    assert f"Calibration filter: {summary['dropped']} of 72 calibration rows dropped" in card
    assert "| `calibration_filter` | `refused` |" in card
