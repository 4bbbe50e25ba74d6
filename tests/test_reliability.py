"""Reliability and security: bad inputs are refused before anything changes, untrusted files never
run code, a failure or a SIGKILL never leaves a half-written output, numerical faults are named.

Every test here is a row of docs/reliability.md.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import pickle
import signal
import socket
import subprocess
import sys
import time

import datasets
import pytest
import torch
from transformers import TrainerControl, TrainerState, TrainingArguments

import irr_callback as irr
from irr_callback import IRRCallback, IRRConfig
from irr_callback.cli import main
from irr_callback.core import realign_matrix
from irr_callback.core.obs import NumericalError
from irr_callback.inputs.data import DataError
from irr_callback.inputs.irr_files import IRRFileError, fingerprint, save_irr_file
from irr_callback.saving import atomic_directory, recover_interrupted
from irr_callback.targets import TargetError, find_targets
from tests.helpers import calibration, same_state, save_triple, state, text_rows, tiny_model, triple, write_jsonl
from tests.workers.interrupt import train_with_irr


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = os.path.join(ROOT, "tests", "workers", "interrupt.py")


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """Saved tiny base / fine-tuned / unaligned Llamas, calibration and safety data, a safety vector file."""
    tmp = tmp_path_factory.mktemp("rel")
    paths, models = save_triple(tmp)
    paths["calib"] = write_jsonl(tmp / "calib.jsonl", text_rows(6))
    paths["safety"] = write_jsonl(
        tmp / "safety.jsonl", [{"prompt": r["text"], "response": "w5 w6"} for r in text_rows(4, seed=1)]
    )
    base, _, unaligned = models
    names = [t.name for t in find_targets(base)[2]]
    v = irr.safety_vector(base, unaligned, names=names, sign_only=True)
    paths["v"] = str(tmp / "v.safetensors")
    save_irr_file(paths["v"], v, kind="safety_vector", base_fingerprint=fingerprint(base.state_dict(), names))
    return paths, models, names


def apply_args(paths, out, *extra, source=("--unaligned", None)):
    flag, value = source
    return [
        "apply",
        "--base",
        paths["base"],
        "--finetuned",
        paths["finetuned"],
        flag,
        value or paths["unaligned"],
        "--calibration-data",
        paths["calib"],
        "--output",
        str(out),
        *extra,
    ]


def digest(directory) -> dict[str, str]:
    return {
        f: hashlib.sha256(open(os.path.join(directory, f), "rb").read()).hexdigest()
        for f in sorted(os.listdir(directory))
    }


def siblings(path) -> list[str]:
    name = os.path.basename(str(path))
    return sorted(e for e in os.listdir(os.path.dirname(str(path))) if e.startswith(f".{name}."))


def same_bits(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    """`same_state` that counts NaN == NaN (for models given NaN on purpose)."""
    return a.keys() == b.keys() and all(
        torch.equal(a[k].nan_to_num(), b[k].nan_to_num()) and torch.equal(a[k].isnan(), b[k].isnan()) for k in a
    )


def no_model_loading(monkeypatch):
    """Make any model load fail loudly: proves a check ran before the heavy work."""
    import irr_callback.commands.apply as apply_cmd

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the input check")

    monkeypatch.setattr(apply_cmd, "load_causal_lm", refuse)


class _Payload:
    """Unpickling this creates `path`: if the file appears, a pickle was executed."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def write_pickle_payload(path, marker) -> str:
    with open(path, "wb") as fh:
        pickle.dump({"model.layers.0.mlp.up_proj.weight": _Payload(str(marker))}, fh)
    return str(path)


# ============================================================================ validation before any change
def test_model_weight_with_nan_is_named_and_nothing_changes(ckpts):
    _, (base, ft, unaligned), _ = ckpts
    model = copy.deepcopy(ft)
    name = "model.layers.1.mlp.up_proj.weight"
    with torch.no_grad():
        dict(model.named_parameters())[name][0, 0] = float("nan")
    before = state(model)
    with pytest.raises(ValueError, match=f"model's '{name}' contains NaN"):
        irr.realign(
            model,
            base=base,
            safety_vector=irr.safety_vector(base, unaligned),
            calibration=calibration(),
            progress=False,
        )
    assert same_bits(before, state(model))


def test_base_of_another_size_is_refused_naming_the_parameter(ckpts):
    from transformers import LlamaConfig, LlamaForCausalLM

    _, (base, ft, unaligned), _ = ckpts
    wide = LlamaForCausalLM(
        LlamaConfig(
            hidden_size=48,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=96,
        )
    )
    model = copy.deepcopy(ft)
    before = state(model)
    with pytest.raises(ValueError, match=r"base\['model\.layers\.0\.self_attn\.q_proj\.weight'\] has shape"):
        irr.realign(
            model,
            base=wide,
            safety_vector=irr.safety_vector(base, unaligned),
            calibration=calibration(),
            progress=False,
        )
    assert same_state(before, state(model))


def test_quantized_target_weight_is_refused():
    model = tiny_model("llama")
    module = model.model.layers[0].self_attn.q_proj
    module.weight = torch.nn.Parameter(torch.zeros_like(module.weight, dtype=torch.int8), requires_grad=False)
    with pytest.raises(TargetError, match="q_proj.weight: weight dtype torch.int8 is quantized"):
        find_targets(model)


@pytest.mark.parametrize("variant, match", [({"use_dora": True}, "DoRA"), ({"lora_bias": True}, "lora_bias")])
def test_realign_refuses_unsupported_lora_variants(ckpts, variant, match):
    from peft import LoraConfig, get_peft_model

    _, (base, _, unaligned), _ = ckpts
    model = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, target_modules=["q_proj"], **variant))
    before = state(model)
    with pytest.raises(TargetError, match=match):
        irr.realign(model, safety_vector=irr.safety_vector(base, unaligned), calibration=calibration(), progress=False)
    assert same_state(before, state(model))


def _begin(callback, model, tmp_path, *, step=0, save_strategy="no"):
    args = TrainingArguments(str(tmp_path / "run"), report_to=[], use_cpu=True, save_strategy=save_strategy)
    st = TrainerState()
    st.global_step = step
    callback.on_train_begin(args, st, TrainerControl(), model=model)


def test_callback_refuses_unsupported_peft_setups(ckpts, tmp_path):
    from peft import IA3Config, LoraConfig, get_peft_model

    paths, (base, _, _), _ = ckpts
    cases = [
        (
            lambda: get_peft_model(copy.deepcopy(base), LoraConfig(r=4, target_modules=["q_proj"], lora_bias=True)),
            "lora_bias=True",
        ),
        (
            lambda: get_peft_model(
                copy.deepcopy(base),
                IA3Config(target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"]),
            ),
            "IA3",
        ),
    ]

    def two_adapters():
        m = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, target_modules=["q_proj"]))
        m.add_adapter("second", LoraConfig(r=4, target_modules=["v_proj"]))
        return m

    def qlora():
        m = copy.deepcopy(base)
        m.is_loaded_in_4bit = True  # what a bitsandbytes 4-bit load sets
        return m

    cases += [(two_adapters, "2 adapters"), (qlora, "QLoRA")]
    for make, match in cases:
        model = make()
        before = state(model)
        with pytest.raises(ValueError, match=match):
            _begin(IRRCallback(IRRConfig(safety_vector=paths["v"])), model, tmp_path)
        assert same_state(before, state(model)), match


def test_callback_harmful_and_safety_data_are_checked_naming_column_or_field(ckpts, tmp_path):
    paths, (base, _, _), _ = ckpts
    wrong = datasets.Dataset.from_dict({"question": ["w4 w5"], "response": ["w6"]})
    with pytest.raises(DataError, match=r"harmful_dataset has no column 'prompt' \(harmful_prompt_column\)"):
        _begin(IRRCallback(IRRConfig(), harmful_dataset=wrong), copy.deepcopy(base), tmp_path)
    with pytest.raises(DataError, match=r"safety_dataset has no column 'prompt' \(safety_prompt_column\)"):
        _begin(
            IRRCallback(IRRConfig(safety_vector=paths["v"], remove_ratio=0.5), safety_dataset=wrong),
            copy.deepcopy(base),
            tmp_path,
        )
    from tests.helpers import tiny_tokenizer

    empty = datasets.Dataset.from_dict({"prompt": [], "response": []})
    callback = IRRCallback(
        IRRConfig(safety_vector=paths["v"], remove_ratio=0.5, cache_dir=str(tmp_path / "c")), safety_dataset=empty
    )
    args = TrainingArguments(str(tmp_path / "run"), report_to=[], use_cpu=True, save_strategy="no")
    with pytest.raises(DataError, match=r"safety_dataset: the Dataset is empty"):
        callback.on_train_begin(
            args, TrainerState(), TrainerControl(), model=copy.deepcopy(base), processing_class=tiny_tokenizer()
        )


def _no_hub(monkeypatch):
    """Any hub lookup fails the test: a local-looking path must never reach the Hub."""
    import huggingface_hub

    local_json = datasets.load_dataset

    def hub(*args, **kwargs):
        if args and args[0] == "json":  # a local file through the json builder
            return local_json(*args, **kwargs)
        raise AssertionError(f"hub lookup for {args or kwargs}")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", hub)
    monkeypatch.setattr(datasets, "load_dataset", hub)


def test_callback_empty_or_missing_inputs_are_named(ckpts, tmp_path, monkeypatch):
    """An empty Dataset or file says "is empty" naming the field (not "needs a safety input"); a local-looking
    path that does not exist says "does not exist" and never reaches the Hub."""
    paths, (base, _, _), _ = ckpts
    from tests.helpers import tiny_tokenizer

    monkeypatch.chdir(tmp_path)
    (tmp_path / "models").mkdir()
    empty_file = tmp_path / "empty.jsonl"
    empty_file.write_text("\n")
    _no_hub(monkeypatch)
    empty = datasets.Dataset.from_dict({"prompt": [], "response": []})
    cases = [
        (
            IRRCallback(IRRConfig(cache_dir="c"), harmful_dataset=empty),
            DataError,
            "harmful_dataset: the Dataset is empty",
        ),
        (
            IRRCallback(IRRConfig(harmful_dataset=str(empty_file), cache_dir="c")),
            DataError,
            "IRRConfig.harmful_dataset: '.*empty.jsonl' is empty",
        ),
        (
            IRRCallback(IRRConfig(harmful_dataset="nope.jsonl", cache_dir="c")),
            DataError,
            "IRRConfig.harmful_dataset: 'nope.jsonl' does not exist",
        ),
        (
            IRRCallback(IRRConfig(unaligned_model="models/nope", cache_dir="c")),
            FileNotFoundError,
            "IRRConfig.unaligned_model: 'models/nope' does not exist",
        ),
        (
            IRRCallback(
                IRRConfig(safety_vector=paths["v"], remove_ratio=0.5, safety_dataset="data/nope.jsonl", cache_dir="c")
            ),
            DataError,
            "IRRConfig.safety_dataset: 'data/nope.jsonl' does not exist",
        ),
    ]
    args = TrainingArguments(str(tmp_path / "run"), report_to=[], use_cpu=True, save_strategy="no")
    for callback, error, match in cases:
        model = copy.deepcopy(base)
        with pytest.raises(error, match=match):
            callback.on_train_begin(
                args, TrainerState(), TrainerControl(), model=model, processing_class=tiny_tokenizer()
            )
        assert same_state(state(model), state(base))


def test_local_looking_paths_and_empty_data(tmp_path, monkeypatch):
    from irr_callback.inputs.data import load_examples
    from irr_callback.paths import looks_like_local_path

    monkeypatch.chdir(tmp_path)
    (tmp_path / "models").mkdir()
    for path in ("data/nope.jsonl", "nope.jsonl", "./x", "../x", "/abs/x", "~/x", "a/b/c", "models/nope"):
        assert looks_like_local_path(path), path
    for hub_id in ("gpt2", "org/name", "meta-llama/Llama-3.2-1B-Instruct", "Qwen/Qwen2.5-0.5B", "imdb"):
        assert not looks_like_local_path(hub_id), hub_id
    _no_hub(monkeypatch)
    (tmp_path / "blank.jsonl").write_text("")
    (tmp_path / "list.json").write_text("[]")
    for source, match in [
        ("blank.jsonl", "'blank.jsonl' is empty"),
        ("list.json", "'list.json' is empty"),
        ([], "the list is empty"),
        (datasets.Dataset.from_dict({"a": []}), "the Dataset is empty"),
        ("data/nope.jsonl", "'data/nope.jsonl' does not exist"),
    ]:
        with pytest.raises(DataError, match=f"--flag: {match}"):
            load_examples(source, what="--flag")


def test_apply_refuses_another_architecture_before_loading_models(ckpts, tmp_path, capsys, monkeypatch):
    from transformers import LlamaConfig

    paths, _, _ = ckpts
    qwen = str(tmp_path / "qwen")
    tiny_model("qwen2").save_pretrained(qwen)
    wide = str(tmp_path / "wide")
    LlamaConfig(
        hidden_size=48,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=96,
    ).save_pretrained(wide)  # config only: never loaded
    no_model_loading(monkeypatch)
    out = tmp_path / "out"
    cases = [
        (["--base", qwen], "--finetuned .* not the same architecture as --base .*model_type 'llama' vs 'qwen2'"),
        (["--finetuned", wide], "--finetuned .* not the same architecture .*hidden_size 48 vs 32"),
        (["--unaligned", qwen], "--unaligned .* not the same architecture .*model_type 'qwen2' vs 'llama'"),
    ]
    for (flag, value), match in cases:
        args = apply_args(paths, out)
        args[args.index(flag) + 1] = value
        assert main(args) == 2
        assert __import__("re").search(match, capsys.readouterr().err), match
        assert not out.exists() and not siblings(out)


def test_every_pairing_of_two_checkpoints_refuses_another_architecture(ckpts, tmp_path, capsys):
    """The check `irr apply` runs is also run by `irr safety-vector` and the callback's unaligned_model (a Qwen2
    unaligned model has tensors with the Llama base's names and shapes: without it, a meaningless vector)."""
    paths, (base, _, _), _ = ckpts
    qwen = str(tmp_path / "qwen")
    tiny_model("qwen2").save_pretrained(qwen)
    out = tmp_path / "v.safetensors"
    assert main(["safety-vector", "--base", paths["base"], "--unaligned", qwen, "--output", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"--unaligned '{qwen}' is not the same architecture as --base" in err and "'qwen2' vs 'llama'" in err
    assert not out.exists()
    model = copy.deepcopy(base)
    callback = IRRCallback(IRRConfig(unaligned_model=qwen, cache_dir=str(tmp_path / "c")))
    with pytest.raises(
        irr.IRRConfigError,
        match=r"IRRConfig.unaligned_model '.*qwen' is not the same architecture "
        r"as the base model .*model_type 'qwen2' vs 'llama'",
    ):
        _begin(callback, model, tmp_path)
    assert same_state(state(model), state(base)) and not (tmp_path / "c").exists()
    # the same architecture still passes (a real unaligned model)
    _begin(
        IRRCallback(IRRConfig(unaligned_model=paths["unaligned"], cache_dir=str(tmp_path / "c"))),
        copy.deepcopy(base),
        tmp_path,
    )


def test_apply_checks_safety_data_columns_before_loading_models(ckpts, tmp_path, capsys, monkeypatch):
    paths, _, _ = ckpts
    bad = write_jsonl(tmp_path / "safety.jsonl", [{"prompt": "w4", "answer": "w5"}])
    no_model_loading(monkeypatch)
    out = tmp_path / "out"
    assert main(apply_args(paths, out, "--safety-data", bad, "--remove_ratio", "0.5")) == 2
    err = capsys.readouterr().err
    assert "--safety-data has no column 'response' (--safety-response-column)" in err
    assert not out.exists()


def test_apply_refuses_dora_adapter(ckpts, tmp_path, capsys):
    from peft import LoraConfig, get_peft_model

    paths, (base, _, _), _ = ckpts
    model = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, target_modules=["q_proj"], use_dora=True))
    model.peft_config["default"].base_model_name_or_path = paths["base"]
    adapter = str(tmp_path / "dora")
    model.save_pretrained(adapter)
    out = tmp_path / "out"
    args = apply_args(paths, out)
    args[args.index("--finetuned") + 1] = adapter
    assert main(args) == 2
    assert "DoRA adapters are not supported; merge the adapter" in capsys.readouterr().err
    assert not out.exists() and not siblings(out)


def test_apply_safety_vector_missing_a_target_is_named(ckpts, tmp_path, capsys):
    paths, (base, _, unaligned), names = ckpts
    partial = str(tmp_path / "partial.safetensors")
    keep = [n for n in names if "layers.1.mlp.down_proj" not in n]
    v = irr.safety_vector(base, unaligned, names=keep, sign_only=True)
    save_irr_file(partial, v, kind="safety_vector", base_fingerprint=fingerprint(base.state_dict(), keep))
    out = tmp_path / "out"
    assert main(apply_args(paths, out, source=("--safety-vector", partial))) == 2
    assert "safety_vector has no entry for target 'model.layers.1.mlp.down_proj.weight'" in capsys.readouterr().err
    assert not out.exists()


# ============================================================================ untrusted files
@pytest.mark.parametrize(
    "flag, name", [("--safety-vector", "v.pt"), ("--safety-vector", "v.safetensors"), ("--fisher", "f.bin")]
)
def test_apply_never_executes_a_pickled_safety_file(ckpts, tmp_path, capsys, flag, name):
    paths, _, _ = ckpts
    marker = tmp_path / "PWNED"
    payload = write_pickle_payload(tmp_path / name, marker)
    out = tmp_path / "out"
    source = ("--safety-vector", payload if flag == "--safety-vector" else paths["v"])
    extra = ["--fisher", payload, "--remove_ratio", "0.5"] if flag == "--fisher" else []
    assert main(apply_args(paths, out, *extra, source=source)) == 2
    assert "is not a safetensors file; pickled files" in capsys.readouterr().err
    assert not marker.exists() and not out.exists()


def test_apply_refuses_a_pickled_model_checkpoint_with_code(ckpts, tmp_path, capsys):
    import shutil

    paths, _, _ = ckpts
    marker = tmp_path / "PWNED"
    finetuned = tmp_path / "ft_bin"
    finetuned.mkdir()
    shutil.copy(os.path.join(paths["finetuned"], "config.json"), finetuned)
    write_pickle_payload(finetuned / "pytorch_model.bin", marker)
    out = tmp_path / "out"
    args = apply_args(paths, out)
    args[args.index("--finetuned") + 1] = str(finetuned)
    assert main(args) == 2
    assert "was refused (loaded with weights_only=True, nothing executed)" in capsys.readouterr().err
    assert not marker.exists() and not out.exists()


def test_callback_never_executes_a_pickled_safety_vector(tmp_path):
    marker = tmp_path / "PWNED"
    for name in ("v.pt", "v.safetensors"):
        payload = write_pickle_payload(tmp_path / name, marker)
        with pytest.raises(IRRFileError, match="not a safetensors file"):
            train_with_irr(str(tmp_path / "run"), payload, str(tmp_path / "irr"))
        assert not marker.exists()
        assert not (tmp_path / "irr").exists()


def test_resume_of_a_run_started_before_the_rename_finds_irr_run(ckpts, tmp_path):
    paths, (base, _, _), _ = ckpts
    cfg = IRRConfig(safety_vector=paths["v"])
    _begin(IRRCallback(cfg), copy.deepcopy(base), tmp_path, save_strategy="steps")
    os.rename(tmp_path / "run" / "_irr_run", tmp_path / "run" / "irr_run")  # what an older version wrote
    resumed = IRRCallback(cfg)
    _begin(resumed, copy.deepcopy(base), tmp_path, step=4, save_strategy="steps")
    assert resumed.sources["safety_vector"]["source"] == "resumed"
    assert os.path.basename(os.path.dirname(resumed.sources["safety_vector"]["path"])) == "irr_run"


def test_resume_refuses_a_pickled_or_foreign_snapshot(ckpts, tmp_path):
    paths, (base, _, _), names = ckpts
    cfg = IRRConfig(safety_vector=paths["v"], snapshot="disk")
    _begin(IRRCallback(cfg), copy.deepcopy(base), tmp_path, save_strategy="steps")
    snapshot = tmp_path / "run" / "_irr_run" / "snapshot.safetensors"
    marker = tmp_path / "PWNED"
    write_pickle_payload(snapshot, marker)
    with pytest.raises(IRRFileError, match="not a safetensors file"):
        _begin(IRRCallback(cfg), copy.deepcopy(base), tmp_path, step=4, save_strategy="steps")
    assert not marker.exists()
    # a genuine snapshot of another run's base: the persisted safety vector's fingerprint disagrees
    save_irr_file(str(snapshot), {n: base.state_dict()[n] for n in names}, kind="snapshot", base_fingerprint="0" * 32)
    with pytest.raises(IRRFileError, match="was made for base .*this run's base is 0{32}"):
        _begin(IRRCallback(cfg), copy.deepcopy(base), tmp_path, step=4, save_strategy="steps")


def test_tampered_and_corrupt_safety_vector_files(ckpts, tmp_path, capsys):
    paths, (base, _, unaligned), names = ckpts
    v = dict(irr.safety_vector(base, unaligned, names=names, sign_only=True))
    name = "model.layers.0.mlp.gate_proj.weight"
    v[name] = v[name].t().contiguous()  # (64, 32) -> (32, 64); the fingerprint (of the base) still matches
    tampered = str(tmp_path / "tampered.safetensors")
    save_irr_file(tampered, v, kind="safety_vector", base_fingerprint=fingerprint(base.state_dict(), names))
    out = tmp_path / "out"
    assert main(apply_args(paths, out, source=("--safety-vector", tampered))) == 2
    assert (
        f"safety_vector['{name}'] has shape (32, 64), the model's weight has shape (64, 32)" in capsys.readouterr().err
    )
    corrupt = str(tmp_path / "corrupt.safetensors")
    data = open(paths["v"], "rb").read()
    with open(corrupt, "wb") as fh:
        fh.write(data[: len(data) // 2])  # e.g. an interrupted copy
    assert main(apply_args(paths, out, source=("--safety-vector", corrupt))) == 2
    assert "not a valid safetensors file" in capsys.readouterr().err
    assert not out.exists()


def test_callback_refuses_a_safety_vector_made_for_another_base(ckpts, tmp_path):
    paths, (base, ft, _), _ = ckpts
    before = state(ft)
    with pytest.raises(IRRFileError, match="made for another base model"):
        _begin(IRRCallback(IRRConfig(safety_vector=paths["v"])), ft, tmp_path)  # ft is not the vector's base
    assert same_state(before, state(ft))


# ============================================================================ interrupted runs (SIGKILL)
def _run_and_kill(tmp_path, mode: str, args: list[str], timeout: float = 120.0) -> None:
    """Start the worker, wait until it froze at the chosen point, SIGKILL it, reap it."""
    signal_file = tmp_path / f"{mode}.frozen"
    env = dict(os.environ, PYTHONPATH=ROOT, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    proc = subprocess.Popen(
        [sys.executable, WORKER, str(signal_file), mode, "--", *args],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + timeout
        while not signal_file.exists():
            if proc.poll() is not None:
                raise AssertionError(
                    f"worker exited ({proc.returncode}) before freezing:\n" + proc.stdout.read().decode()[-3000:]
                )
            if time.monotonic() > deadline:
                raise AssertionError("worker did not reach the freeze point")
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL


def test_sigkill_while_apply_writes_keeps_previous_output_then_rerun_works(ckpts, tmp_path):
    paths, _, _ = ckpts
    out = tmp_path / "out"
    assert main(apply_args(paths, out, "--remove_ratio", "1.0")) == 0
    previous = digest(out)
    _run_and_kill(tmp_path, "apply-save", apply_args(paths, out, "--overwrite", "--recalibrate", "false"))
    assert digest(out) == previous  # the previous output, intact
    [left] = siblings(out)  # the killed run's half-written temp dir, nothing else
    assert ".out.tmp-" in left and "model.safetensors" in os.listdir(tmp_path / left)
    assert "irr_report.json" not in os.listdir(tmp_path / left)
    # the rerun removes the dead writer's temp dir and replaces the output completely
    assert main(apply_args(paths, out, "--overwrite", "--recalibrate", "false")) == 0
    assert siblings(out) == []
    report = json.loads((out / "irr_report.json").read_text())
    assert report["status"] == "ok" and report["config"]["recalibrate"] is False


def test_sigkill_between_the_renames_then_previous_output_is_restored(ckpts, tmp_path, capsys):
    paths, _, _ = ckpts
    out = tmp_path / "out"
    assert main(apply_args(paths, out)) == 0
    previous = digest(out)
    _run_and_kill(tmp_path, "apply-rename", apply_args(paths, out, "--overwrite", "--recalibrate", "false"))
    # killed after moving the previous output aside: no output, never a half-written one
    assert not out.exists()
    old = [s for s in siblings(out) if ".out.old-" in s]
    assert len(old) == 1 and digest(tmp_path / old[0]) == previous
    # the next run puts the previous output back first, so without --overwrite it is protected
    assert main(apply_args(paths, out)) == 2
    assert "already exists" in capsys.readouterr().err
    assert digest(out) == previous and siblings(out) == []
    assert main(apply_args(paths, out, "--overwrite", "--recalibrate", "false")) == 0
    assert json.loads((out / "irr_report.json").read_text())["config"]["recalibrate"] is False


def test_sigkill_during_callback_save_keeps_previous_output_then_rerun_works(ckpts, tmp_path):
    paths, _, _ = ckpts
    target = tmp_path / "irr"
    first = train_with_irr(str(tmp_path / "run1"), paths["v"], str(target))
    assert first.report.status == "ok"
    previous = digest(target)
    _run_and_kill(tmp_path, "callback-save", [str(tmp_path / "run2"), paths["v"], str(target)])
    assert digest(target) == previous
    [left] = siblings(target)
    assert ".irr.tmp-" in left and "irr_report.json" not in os.listdir(tmp_path / left)
    again = train_with_irr(str(tmp_path / "run3"), paths["v"], str(target))
    assert again.report.status == "ok" and again.output_path == str(target)
    assert siblings(target) == [] and {"model.safetensors", "irr_report.json", "README.md"} <= set(os.listdir(target))


def test_recover_interrupted_only_touches_dead_writers_on_this_host(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    host = socket.gethostname()
    live_tmp = tmp_path / f".out.tmp-{host}-{os.getpid()}-abc"
    dead_tmp = tmp_path / f".out.tmp-{host}-{dead.pid}-abc"
    other_host = tmp_path / f".out.tmp-elsewhere-{dead.pid}-abc"
    for p in (live_tmp, dead_tmp, other_host):
        p.mkdir()
    actions = recover_interrupted(str(target))
    assert not dead_tmp.exists() and live_tmp.exists() and other_host.exists()
    assert len(actions) == 1 and str(dead_tmp) in actions[0]


def test_atomic_directory_error_leaves_target_untouched(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    (target / "keep.txt").write_text("previous")
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_directory(str(target)) as tmp:
            (tmp_path / tmp / "half.bin").write_bytes(b"x")
            raise RuntimeError("boom")
    assert os.listdir(target) == ["keep.txt"] and siblings(target) == []
    with atomic_directory(str(target)) as tmp:
        (tmp_path / tmp / "new.txt").write_text("new")
    assert os.listdir(target) == ["new.txt"] and siblings(target) == []


# ============================================================================ resume
def test_resume_realigns_against_the_persisted_base_not_the_checkpoint(ckpts, tmp_path):
    paths, (base, _, _), names = ckpts
    cfg = IRRConfig(safety_vector=paths["v"])
    model = copy.deepcopy(base)
    _begin(IRRCallback(cfg), model, tmp_path, save_strategy="steps")
    with torch.no_grad():  # training went on; a checkpoint of these weights is what a resume loads
        for p in model.parameters():
            p.add_(0.5)
    resumed = IRRCallback(cfg)
    _begin(resumed, model, tmp_path, step=6, save_strategy="steps")
    assert resumed.sources["safety_vector"]["source"] == "resumed"
    base_sd = base.state_dict()
    for name in names:
        assert torch.equal(resumed._snapshot[name], base_sd[name]), name
    # and the realignment uses it: the deltas are the 0.5 of "training", not zero
    report = irr.realign(
        model,
        base=resumed._snapshot,
        safety_vector=resumed._safety,
        calibration=calibration(),
        config=resumed._run_config,
        progress=False,
    )
    assert report.totals["conflicts"] > 0.3 * report.totals["entries"]


# ============================================================================ numerical faults
def test_cholesky_retries_are_reported_per_module_and_exhaustion_is_named(ckpts, tmp_path):
    _, (base, ft, unaligned), _ = ckpts
    v = irr.safety_vector(base, unaligned, sign_only=True)
    model = copy.deepcopy(ft)
    # 3 calibration tokens for 32..64 inputs and almost no damping: H is singular in float32
    report = irr.realign(
        model,
        base=base,
        safety_vector=v,
        calibration=calibration(1, 3),
        config=IRRConfig(percdamp=1e-8),
        progress=False,
    )
    retried = [m for m in report.modules if m.damping_retries > 0]
    assert retried and report.totals["damping_retries"] == sum(m.damping_retries for m in report.modules)
    path = tmp_path / "report.json"
    report.save(str(path))
    saved = {m["name"]: m for m in json.loads(path.read_text())["modules"]}
    assert saved[retried[0].name]["damping_retries"] == retried[0].damping_retries > 0
    model = copy.deepcopy(ft)
    before = state(model)
    with pytest.raises(
        NumericalError,
        match=r"model\.layers\.0\.\S+: the Hessian is not positive definite .* "
        r"0 retries",
    ):
        irr.realign(
            model,
            base=base,
            safety_vector=v,
            calibration=calibration(1, 3),
            config=IRRConfig(percdamp=1e-8, max_damping_retries=0),
            progress=False,
        )
    assert same_state(before, state(model))


def test_worse_recalibration_falls_back_to_removal_and_the_report_says_so():
    base, ft, unaligned = triple("llama", dtype=torch.float64)
    v = irr.safety_vector(base, unaligned, sign_only=True)
    # 6 tokens and tiny damping: the compensation overshoots in some modules
    kwargs = dict(base=base, safety_vector=v, calibration=calibration(1, 6), progress=False)
    fallback = copy.deepcopy(ft)
    report = irr.realign(fallback, config=IRRConfig(percdamp=1e-6, blocksize=1), **kwargs)
    fell = report.totals["fell_back_to_removal"]
    assert any(n.startswith("model.layers.0.") for n in fell)
    assert fell and f"{len(fell)} fell back to plain removal" in report.summary()
    plain = copy.deepcopy(ft)
    irr.realign(plain, config=IRRConfig(recalibrate=False), **kwargs)
    raw = copy.deepcopy(ft)
    raw_report = irr.realign(raw, config=IRRConfig(percdamp=1e-6, blocksize=1, fallback_to_removal=False), **kwargs)
    params = {k: dict(m.named_parameters()) for k, m in (("fb", fallback), ("plain", plain), ("raw", raw))}
    raw_stats = {m.name: m for m in raw_report.modules}
    for m in report.modules:
        if m.fell_back_to_removal:
            assert not m.recalibrated and m.error_recalibrated > m.error_removal
            assert torch.equal(params["fb"][m.name], params["plain"][m.name]), m.name
            if m.layer == 0:  # later layers see other inputs once an earlier module fell back
                assert not torch.equal(params["raw"][m.name], params["plain"][m.name]), m.name
                assert raw_stats[m.name].error_recalibrated == m.error_recalibrated
        else:
            assert m.recalibrated and m.error_recalibrated <= m.error_removal


def test_nan_in_the_solved_delta_stops_naming_the_module(ckpts, monkeypatch):
    import irr_callback.core.realign as core_realign

    _, (base, ft, unaligned), _ = ckpts
    original = core_realign.obs_sweep

    def nan_sweep(delta, *args, **kwargs):
        result = original(delta, *args, **kwargs)
        return result._replace(delta=result.delta * float("nan")) if delta.shape[1] == 64 else result  # down_proj

    monkeypatch.setattr(core_realign, "obs_sweep", nan_sweep)
    model = copy.deepcopy(ft)
    before = state(model)
    with pytest.raises(
        NumericalError,
        match=r"model\.layers\.0\.mlp\.down_proj\.weight: the realigned delta "
        r"contains NaN",
    ):
        irr.realign(
            model,
            base=base,
            safety_vector=irr.safety_vector(base, unaligned),
            calibration=calibration(),
            progress=False,
        )
    assert same_state(before, state(model))  # layer 0's q..up were written first, then restored


@pytest.mark.parametrize("where", ["layer_output", "embeddings"])
def test_nan_hidden_states_stop_naming_the_layer(ckpts, where):
    _, (base, ft, unaligned), _ = ckpts
    model = copy.deepcopy(ft)
    if where == "embeddings":
        with torch.no_grad():
            model.model.embed_tokens.weight[:] = float("inf")
        match = r"input of decoder layer 'model\.layers\.0' \(the embedding output\) contains NaN or Inf"
    else:  # e.g. an fp16 overflow inside layer 0 after its weights were changed
        model.model.layers[0].register_forward_hook(lambda mod, args, out: out * float("nan"))
        match = r"output of decoder layer 'model\.layers\.0' after realignment contains NaN or Inf"
    before = state(model)
    with pytest.raises(NumericalError, match=match):
        irr.realign(
            model,
            base=base,
            safety_vector=irr.safety_vector(base, unaligned),
            calibration=calibration(),
            progress=False,
        )
    assert same_state(before, state(model))


def test_nan_hessian_is_named():
    with pytest.raises(ValueError, match="q_proj: the Hessian contains NaN or Inf"):
        realign_matrix(torch.randn(4, 6), torch.randn(4, 6), hessian=torch.full((6, 6), float("nan")), name="q_proj")
