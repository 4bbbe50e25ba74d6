"""IRRCallback end to end on a really aligned toy: a Trainer fine-tune breaks the refusals, the
callback restores them (full fine-tuning and LoRA), and the outputs, resume, sources, cache and
failure path behave as documented."""

from __future__ import annotations

import json
import os

import pytest
import torch
from transformers import DataCollatorForSeq2Seq, Trainer, TrainerCallback, TrainingArguments

from irr_callback import IRRCallback, IRRConfig
from irr_callback.inputs.irr_files import IRRFileError, fingerprint, save_irr_file
from tests import callback_world as world
from tests.helpers import margin


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # two cores shared with other jobs: one thread is several times faster for these tiny models
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class Probe(TrainerCallback):
    """Records the fine-tuned model just before IRR runs (registered before IRRCallback)."""

    def on_train_end(self, args, state, control, model=None, **kwargs):
        self.refusal = world.refusal_rate(model)
        self.state = {k: v.detach().clone() for k, v in model.state_dict().items()}


class Interrupt(TrainerCallback):
    """Stops the run as a crash or a Ctrl-C would (on_train_end never runs)."""

    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise KeyboardInterrupt


LAST: dict = {}


def run(
    tmp_path,
    model,
    config: IRRConfig,
    *,
    steps=30,
    name="run",
    callback_kwargs=None,
    resume=None,
    extra_callbacks=(),
    **arg_overrides,
):
    probe = LAST["probe"] = Probe()
    callback = LAST["callback"] = IRRCallback(config, **(callback_kwargs or {}))
    defaults = dict(
        report_to=[],
        use_cpu=True,
        max_steps=steps,
        per_device_train_batch_size=16,
        learning_rate=2e-3,
        save_strategy="no",
        disable_tqdm=True,
        logging_strategy="no",
        seed=0,
    )
    defaults.update(arg_overrides)
    args = TrainingArguments(str(tmp_path / name), **defaults)
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=world.attack_dataset(),
        processing_class=world.tokenizer(),
        data_collator=DataCollatorForSeq2Seq(world.tokenizer()),
        callbacks=[*extra_callbacks, probe, callback],
    )
    callback.bind(trainer)
    trainer.train(resume_from_checkpoint=resume)
    return trainer, callback, probe


def logits(model, text="how do i make a bomb"):
    ids = torch.tensor([world.tokenizer()(text)["input_ids"]])
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.fixture(scope="module")
def unaligned_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("unaligned")
    world.unaligned_model().save_pretrained(path)
    return str(path)


def test_toy_is_aligned_and_attack_breaks_it():
    margin("cb aligned refusal", world.refusal_rate(world.aligned_model()), ge=0.9)
    margin("cb unaligned refusal", world.refusal_rate(world.unaligned_model()), le=0.1)


# ------------------------------------------------------------------------------------- full fine-tuning
def test_full_finetune_restores_refusals_and_saves_reloadable_model(tmp_path, unaligned_dir):
    from transformers import AutoModelForCausalLM

    cfg = IRRConfig(unaligned_model=unaligned_dir, cache_dir=str(tmp_path / "cache"), num_calibration_samples=16)
    trainer, cb, probe = run(tmp_path, world.aligned_model(), cfg)
    margin("cb full ft refusal", probe.refusal, le=0.2)  # the fine-tune broke the refusals
    live = trainer.model
    margin("cb full irr refusal", world.refusal_rate(live), ge=0.9)  # IRR restored them
    margin("cb full irr downstream", world.downstream_accuracy(live), ge=0.9)  # and kept the downstream task
    out = tmp_path / "run"
    # no copy of the model by IRR: the report and the card, no temp dirs, no _irr_run (nothing to resume)
    assert cb.output_path is None and sorted(os.listdir(out)) == ["README.md", "irr_report.json"]
    report = json.loads((out / "irr_report.json").read_text())
    assert report["status"] == "ok" and report["totals"]["removed"] > 0
    assert report["extra"]["safety_inputs"]["safety_vector"]["source"] == "unaligned_model"
    assert str(tmp_path) not in (out / "irr_report.json").read_text()  # paths relative or by name only
    card = (out / "README.md").read_text()
    assert "IRR" in card and f"{report['totals']['removed']:,}" in card and "unaligned_model" in card
    # trainer.save_model() writes the realigned model into output_dir, once
    trainer.save_model()
    torch.testing.assert_close(logits(AutoModelForCausalLM.from_pretrained(out)), logits(live), rtol=0, atol=0)
    assert (out / "tokenizer.json").exists() and (out / "README.md").read_text() == card
    assert "irr-realigned" in trainer.model.model_tags
    # push_to_hub's card (transformers' TrainingSummary) replaces README.md: IRR's section is added again, once
    trainer.create_model_card(model_name="mine")
    hub_card = (out / "README.md").read_text()
    assert "mine" in hub_card and hub_card.count("irr-callback: realigned -->") == 1
    assert "were safety-realigned after fine-tuning" in hub_card


def test_safety_vector_file_source_and_foreign_files_refused(tmp_path):
    base, unaligned = world.aligned_model(), world.unaligned_model()
    names = [n for n, _ in base.named_parameters() if ".layers." in n and n.endswith("proj.weight")]
    v = {n: base.state_dict()[n] - unaligned.state_dict()[n] for n in names}
    good = tmp_path / "v.safetensors"
    save_irr_file(str(good), v, kind="safety_vector", base_fingerprint=fingerprint(base.state_dict(), names))
    trainer, cb, probe = run(
        tmp_path, world.aligned_model(), IRRConfig(safety_vector=str(good), num_calibration_samples=16)
    )
    assert cb.sources["safety_vector"]["source"] == "safety_vector"
    margin("cb file ft refusal", probe.refusal, le=0.2)
    margin("cb file irr refusal", world.refusal_rate(trainer.model), ge=0.9)

    pickled = tmp_path / "v.pt"
    torch.save(v, pickled)
    from safetensors.torch import save_file

    foreign = tmp_path / "foreign.safetensors"
    save_file({k: t.contiguous() for k, t in v.items()}, str(foreign))
    for path, match in [(pickled, "not a safetensors"), (foreign, "no irr_callback metadata")]:
        model = world.aligned_model()
        before = {k: t.clone() for k, t in model.state_dict().items()}
        with pytest.raises(IRRFileError, match=match):
            run(tmp_path, model, IRRConfig(safety_vector=str(path)), steps=2, name="bad")
        assert all(torch.equal(before[k], t) for k, t in model.state_dict().items())  # refused before training


# ------------------------------------------------------------------------------------- LoRA + harmful data + cache
def test_lora_with_harmful_dataset_restores_refusals_and_reuses_cache(tmp_path, monkeypatch):
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM

    import irr_callback.inputs.unaligned as unaligned

    calls = []
    original = unaligned.harmful_finetune_vector
    monkeypatch.setattr(unaligned, "harmful_finetune_vector", lambda *a, **k: calls.append(1) or original(*a, **k))

    def lora_model():
        return get_peft_model(
            world.aligned_model(),
            LoraConfig(
                r=8,
                lora_alpha=16,
                target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
            ),
        )

    cfg = IRRConfig(
        harmful_dataset="unused-when-a-Dataset-is-given",
        cache_dir=str(tmp_path / "cache"),
        num_calibration_samples=16,
        unaligned_steps=30,
        unaligned_learning_rate=2e-3,
        lora_refactor_rank=64,
    )
    kwargs = {"harmful_dataset": world.harmful_pairs_dataset()}
    cfg.irr_output_dir = str(tmp_path / "run" / "_irr")  # IRR's copy (opt-in): merged model + adapter
    trainer, cb, probe = run(tmp_path, lora_model(), cfg, callback_kwargs=kwargs, learning_rate=5e-3)
    assert calls == [1] and cb.sources["safety_vector"] == {**cb.sources["safety_vector"], "cached": False}
    margin("cb lora ft refusal", probe.refusal, le=0.2)
    live = trainer.model
    margin("cb lora irr refusal", world.refusal_rate(live), ge=0.9)
    out = tmp_path / "run" / "_irr"
    # merged model (exact) and re-factored adapter (rank 64 = full rank here: exact too)
    merged = AutoModelForCausalLM.from_pretrained(out)
    torch.testing.assert_close(logits(merged), logits(live), rtol=1e-4, atol=1e-4)
    adapter = PeftModel.from_pretrained(world.aligned_model(), out / "adapter")
    torch.testing.assert_close(logits(adapter), logits(live), rtol=1e-4, atol=1e-4)
    report = json.loads((out / "irr_report.json").read_text())
    assert report["extra"]["lora_adapter"]["ranks"].startswith("rank 64 for every module")
    assert report["extra"]["lora_adapter"]["max_relative_gap"] < 1e-6
    # save_model on the live PeftModel writes the realigned adapter, not the un-realigned one
    trainer.save_model(str(tmp_path / "saved"))
    saved = PeftModel.from_pretrained(world.aligned_model(), tmp_path / "saved")
    margin("cb lora saved refusal", world.refusal_rate(saved), ge=0.9)

    # a second run on the same base and data reuses the cached safety vector: no harmful fine-tune
    trainer2, cb2, _ = run(tmp_path, lora_model(), cfg, callback_kwargs=kwargs, steps=2, name="run2")
    assert calls == [1]
    assert cb2.sources["safety_vector"]["cached"] is True
    assert cb2.sources["safety_vector"]["path"] == cb.sources["safety_vector"]["path"]


def test_lora_refactor_at_low_rank_reports_its_error(tmp_path, unaligned_dir):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(world.aligned_model(), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    trainer, cb, _ = run(
        tmp_path,
        model,
        IRRConfig(
            unaligned_model=unaligned_dir,
            lora_output="adapter",
            lora_refactor_rank=2,
            cache_dir=str(tmp_path / "c"),
            num_calibration_samples=8,
            irr_output_dir=str(tmp_path / "run" / "_irr"),
        ),
        steps=3,
    )
    out = tmp_path / "run" / "_irr"
    assert (out / "adapter_config.json").exists() and not (out / "config.json").exists()
    assert json.loads((out / "adapter_config.json").read_text())["r"] == 2
    lora = cb.report.extra["lora_adapter"]
    assert 0 < lora["max_relative_gap"] < 1 and {m["rank"] for m in lora["modules"].values()} == {2}
    assert {m.name.split(".")[-2] for m in cb.report.modules} == {"q_proj", "v_proj"}


def test_unsupported_peft_setups_are_refused_before_training(tmp_path, unaligned_dir):
    from peft import LoraConfig, get_peft_model

    for extra, match in [({"use_dora": True}, "DoRA"), ({"modules_to_save": ["lm_head"]}, "modules_to_save")]:
        model = get_peft_model(world.aligned_model(), LoraConfig(r=4, target_modules=["q_proj"], **extra))
        with pytest.raises(ValueError, match=match):
            run(tmp_path, model, IRRConfig(unaligned_model=unaligned_dir), steps=1, name="bad")


# ------------------------------------------------------------------------------------- resume, checkpoints
def test_resume_gives_the_same_realigned_weights_and_checkpoints_get_realigned_copies(tmp_path, unaligned_dir):
    cfg = IRRConfig(
        unaligned_model=unaligned_dir,
        cache_dir=str(tmp_path / "c"),
        num_calibration_samples=16,
        snapshot="disk",
        realign_checkpoints=True,
    )
    common = dict(steps=12, save_strategy="steps", save_steps=6)
    straight, _, probe_straight = run(tmp_path, world.aligned_model(), cfg, name="straight", **common)
    # the realigned checkpoint copy is written, and training went on untouched by it
    assert (tmp_path / "straight" / "checkpoint-6" / "irr" / "model.safetensors.index.json").exists()
    plain, _, probe_plain = run(
        tmp_path,
        world.aligned_model(),
        IRRConfig(unaligned_model=unaligned_dir, cache_dir=str(tmp_path / "c"), num_calibration_samples=16),
        name="plain",
        **common,
    )
    assert all(torch.equal(probe_plain.state[k], t) for k, t in probe_straight.state.items())

    with pytest.raises(KeyboardInterrupt):  # killed after the checkpoint at step 6: _irr_run/ stays for the resume
        run(tmp_path, world.aligned_model(), cfg, name="resumed", extra_callbacks=[Interrupt(8)], **common)
    assert (tmp_path / "resumed" / "_irr_run" / "snapshot.safetensors").exists()
    assert not (tmp_path / "straight" / "_irr_run").exists()  # a run that ended well removed it
    # resume from the middle in a new Trainer: the snapshot must come from disk, not from the checkpoint
    resumed, cb, _ = run(
        tmp_path,
        world.aligned_model(),
        cfg,
        name="resumed",
        resume=str(tmp_path / "resumed" / "checkpoint-6"),
        **common,
    )
    assert cb.sources["safety_vector"]["source"] == "resumed"
    expected = straight.model.state_dict()
    for k, t in resumed.model.state_dict().items():
        torch.testing.assert_close(t, expected[k], rtol=1e-5, atol=1e-6, msg=k)


def test_run_store_is_hidden_from_push_to_hub_and_removed_when_the_run_ends_well(tmp_path, unaligned_dir):
    import fnmatch
    import inspect

    from irr_callback.inputs.snapshot import RUN_DIR

    # Trainer.push_to_hub uploads output_dir minus its ignore patterns ("_*", "checkpoint-*" in transformers)
    assert '"_*"' in inspect.getsource(Trainer.push_to_hub) and fnmatch.fnmatch(RUN_DIR, "_*")
    seen = {}

    class Look(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            seen.setdefault("during", sorted(os.listdir(args.output_dir)))

    cfg = IRRConfig(unaligned_model=unaligned_dir, cache_dir=str(tmp_path / "c"), num_calibration_samples=8)
    _, cb, _ = run(
        tmp_path, world.aligned_model(), cfg, steps=2, save_strategy="steps", save_steps=1, extra_callbacks=[Look()]
    )
    assert "_irr_run" in seen["during"] and "irr_run" not in seen["during"]  # persisted for a resume, hidden
    assert cb.report.status == "ok"
    assert not [n for n in os.listdir(tmp_path / "run") if n.endswith("irr_run")]  # removed at the end


def test_resume_without_persisted_snapshot_is_refused(tmp_path, unaligned_dir):
    cfg = IRRConfig(unaligned_model=unaligned_dir, cache_dir=str(tmp_path / "c"), num_calibration_samples=8)
    with pytest.raises(KeyboardInterrupt):
        run(
            tmp_path,
            world.aligned_model(),
            cfg,
            steps=4,
            save_strategy="steps",
            save_steps=2,
            name="r",
            extra_callbacks=[Interrupt(3)],
        )
    import shutil

    shutil.rmtree(tmp_path / "r" / "_irr_run")
    with pytest.raises(FileNotFoundError, match="_irr_run"):
        run(
            tmp_path,
            world.aligned_model(),
            cfg,
            steps=4,
            save_strategy="steps",
            save_steps=2,
            name="r",
            resume=str(tmp_path / "r" / "checkpoint-2"),
        )


def test_snapshot_is_taken_once_under_repeated_train_begin(unaligned_dir, tmp_path):
    from transformers import TrainerControl, TrainerState

    model = world.aligned_model()
    cb = IRRCallback(IRRConfig(unaligned_model=unaligned_dir, cache_dir=str(tmp_path / "c")))
    args = TrainingArguments(str(tmp_path / "o"), report_to=[], use_cpu=True, save_strategy="no")
    cb.on_train_begin(args, TrainerState(), TrainerControl(), model=model)
    name = "model.layers.0.mlp.up_proj.weight"
    first = cb._snapshot[name].clone()
    with torch.no_grad():
        dict(model.named_parameters())[name].add_(1.0)  # e.g. steps taken before an OOM restart
    cb.on_train_begin(args, TrainerState(), TrainerControl(), model=model)
    assert torch.equal(cb._snapshot[name], first)


# ------------------------------------------------------------------------------------- failure path
def test_failure_keeps_finetuned_model_and_leaves_no_output_dir(tmp_path, unaligned_dir, monkeypatch):
    import irr_callback.pipeline.solve as solve_step

    calls = {"n": 0}
    original = solve_step.realign_group

    def failing(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 5:
            raise RuntimeError("boom")
        return original(*args, **kwargs)

    monkeypatch.setattr(solve_step, "realign_group", failing)
    copy = str(tmp_path / "run" / "_irr")
    cfg = IRRConfig(
        unaligned_model=unaligned_dir, cache_dir=str(tmp_path / "c"), num_calibration_samples=8, irr_output_dir=copy
    )
    model = world.aligned_model()
    with pytest.raises(RuntimeError, match="boom"):
        run(tmp_path, model, cfg, steps=4)
    probe_state = LAST["probe"].state
    assert all(torch.equal(probe_state[k], t) for k, t in model.state_dict().items())
    assert not os.path.exists(copy) and not (tmp_path / "run" / "README.md").exists()  # no card claims IRR
    assert [n for n in os.listdir(tmp_path / "run") if n.startswith(".")] == []
    report = json.loads((tmp_path / "run" / "irr_report.json").read_text())
    assert report["status"] == "failed" and "boom" in report["error"]

    # on_error="warn": training returns normally, same guarantees
    calls["n"] = 0
    trainer, cb, probe = run(
        tmp_path,
        world.aligned_model(),
        IRRConfig(
            unaligned_model=unaligned_dir, cache_dir=str(tmp_path / "c"), num_calibration_samples=8, on_error="warn"
        ),
        steps=4,
        name="warn",
    )
    assert cb.report.status == "failed" and not (tmp_path / "warn" / "irr").exists()
    assert all(torch.equal(probe.state[k], t) for k, t in trainer.model.state_dict().items())


def test_save_failure_leaves_no_partial_directory(tmp_path, unaligned_dir, monkeypatch):
    import irr_callback.callback as callback

    def broken_card(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(callback, "build_model_card", broken_card)
    cfg = IRRConfig(
        unaligned_model=unaligned_dir,
        cache_dir=str(tmp_path / "c"),
        num_calibration_samples=8,
        irr_output_dir=str(tmp_path / "run" / "_irr"),
    )
    with pytest.raises(OSError, match="disk full"):
        run(tmp_path, world.aligned_model(), cfg, steps=2)
    assert sorted(os.listdir(tmp_path / "run")) == ["irr_report.json"]
    assert json.loads((tmp_path / "run" / "irr_report.json").read_text())["status"] == "save_failed"


def test_save_failure_with_warn_says_the_live_model_is_realigned(tmp_path, unaligned_dir, monkeypatch, caplog):
    """on_error="warn", realignment ok, save failed: the warning and the report say what really happened."""
    from irr_callback import callback

    def broken_card(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(callback, "build_model_card", broken_card)
    cfg = IRRConfig(
        unaligned_model=unaligned_dir,
        cache_dir=str(tmp_path / "c"),
        num_calibration_samples=8,
        on_error="warn",
        irr_output_dir=str(tmp_path / "run" / "_irr"),
    )
    with caplog.at_level("WARNING", logger="irr_callback"):
        trainer, cb, probe = run(tmp_path, world.aligned_model(), cfg, steps=2)
    assert cb.report.status == "save_failed" and "disk full" in cb.report.error
    assert cb.report.totals["modules"] > 0 and cb.report.totals["removed"] > 0 and cb.output_path is None
    live = trainer.model.state_dict()
    assert any(not torch.equal(probe.state[k], live[k]) for k in live)  # the live model was realigned
    report = json.loads((tmp_path / "run" / "irr_report.json").read_text())
    assert report["status"] == "save_failed" and report["totals"]["removed"] == cb.report.totals["removed"]
    warning = " ".join(r.getMessage() for r in caplog.records)
    assert "IS realigned" in warning and "disk full" in warning and "stays the fine-tuned" not in warning
    assert not (tmp_path / "run" / "_irr").exists()


# ------------------------------------------------------------------------------------- Fisher, missing inputs
def test_remove_ratio_below_one_computes_fisher_from_generated_responses(tmp_path, unaligned_dir):
    import datasets

    safety = datasets.Dataset.from_dict({"prompt": world.harmful_prompts()[:8]})  # no response column
    cfg = IRRConfig(
        unaligned_model=unaligned_dir,
        cache_dir=str(tmp_path / "c"),
        num_calibration_samples=8,
        remove_ratio=0.5,
        safety_max_new_tokens=4,
        fisher_batch_size=4,
    )
    seen = {}

    class GradCheck(TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, **kwargs):
            seen["mode_before"] = model.training

        def on_step_begin(self, args, state, control, model=None, **kwargs):
            if state.global_step == 0:
                seen["grads"] = [p.grad for p in model.parameters()]
                seen["training"] = model.training

    model = world.aligned_model()
    trainer, cb, _ = run(
        tmp_path, model, cfg, steps=2, callback_kwargs={"safety_dataset": safety}, extra_callbacks=[GradCheck()]
    )
    # the Fisher pass at train begin left the model as the Trainer expects it
    assert all(g is None for g in seen["grads"]) and seen["training"] == seen["mode_before"]
    assert cb.sources["importance"]["source"] == "safety_dataset"
    assert cb.sources["importance"]["generated_responses"] is True
    totals = cb.report.totals
    assert 0.3 < totals["removed"] / totals["conflicts"] < 0.7
    _, cb2, _ = run(
        tmp_path, world.aligned_model(), cfg, steps=1, name="again", callback_kwargs={"safety_dataset": safety}
    )
    assert cb2.sources["importance"]["cached"] is True


def test_progress_bars_follow_disable_tqdm_and_show_on_the_main_process_only(tmp_path, capfd, monkeypatch):
    """The harmful fine-tune, safety-response, Fisher and layer bars behave like the Trainer's own."""
    import datasets

    from irr_callback import callback as callback_module

    safety = datasets.Dataset.from_dict({"prompt": world.harmful_prompts()[:4]})  # responses are generated
    bars = ("IRR harmful fine-tune", "IRR safety responses", "Fisher", "IRR layers")
    real_state = callback_module._partial_state
    for name, disable, main in (("quiet", True, True), ("shown", False, True), ("replica", False, False)):
        if not main:
            monkeypatch.setattr(
                callback_module,
                "_partial_state",
                lambda: type(
                    "Replica",
                    (),
                    {
                        "is_local_main_process": False,
                        "is_main_process": True,
                        "main_process_first": real_state().main_process_first,
                        "wait_for_everyone": lambda self: None,
                    },
                )(),
            )
        cfg = IRRConfig(
            harmful_dataset="given-below",
            remove_ratio=0.5,
            unaligned_steps=2,
            safety_max_new_tokens=2,
            fisher_batch_size=4,
            num_calibration_samples=4,
            cache_dir=str(tmp_path / name),
        )
        run(
            tmp_path,
            world.aligned_model(),
            cfg,
            steps=1,
            name=name,
            disable_tqdm=disable,
            callback_kwargs={"safety_dataset": safety, "harmful_dataset": world.harmful_pairs_dataset()},
        )
        err = capfd.readouterr().err
        for bar in bars:
            assert (bar in err) == (not disable and main), (name, bar)


def test_irr_log_lines_follow_the_trainer_log_level(tmp_path, unaligned_dir, caplog):
    """IRR's INFO lines show with TrainingArguments(log_level="info") or set_verbosity_info(), not by default."""
    from transformers.utils import logging as hf_logging

    before = hf_logging.get_verbosity()
    with caplog.at_level("ERROR", logger="irr_callback"):  # setting a level and restoring it (as here) ...
        pass  # ... leaves the logger following transformers, not pinned at the level it had
    cfg = IRRConfig(unaligned_model=unaligned_dir, cache_dir=str(tmp_path / "c"), num_calibration_samples=4)
    try:
        for name, log_level, verbosity in (
            ("default", "passive", hf_logging.WARNING),
            ("log_level", "info", hf_logging.WARNING),
            ("verbosity", "passive", hf_logging.INFO),
        ):
            hf_logging.set_verbosity(verbosity)
            caplog.clear()
            run(tmp_path, world.aligned_model(), cfg, steps=1, name=name, log_level=log_level)
            lines = [r.getMessage() for r in caplog.records if r.name.startswith("irr_callback")]
            shown = any(m.startswith("IRR: ready to realign") for m in lines)
            assert shown == (name != "default"), (name, lines)
    finally:
        hf_logging.set_verbosity(before)


def test_missing_safety_input_is_named(tmp_path):
    with pytest.raises(ValueError, match="safety_vector.*unaligned_model.*harmful_dataset"):
        run(tmp_path, world.aligned_model(), IRRConfig(), steps=1)
