"""The `irr` console script on tiny checkpoints saved from configs."""

import json
import os

import pytest
import torch
from safetensors import safe_open

import irr_callback as irr
from irr_callback.cli import build_parser, main
from tests.helpers import save_triple, text_rows, write_jsonl


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ckpt")
    paths, models = save_triple(tmp)
    paths["calib"] = write_jsonl(tmp / "calib.jsonl", text_rows(8))
    paths["safety"] = write_jsonl(
        tmp / "safety.jsonl", [{"prompt": r["text"], "response": "w5 w6 w7"} for r in text_rows(6, seed=1)]
    )
    return paths, models


def _listing(directory):
    return sorted(os.listdir(directory))


def test_help_explains_every_option(capsys):
    parser = build_parser()
    for command in ("apply", "safety-vector", "fisher"):
        with pytest.raises(SystemExit):
            parser.parse_args([command, "--help"])
        out = capsys.readouterr().out
        assert "--output" in out
    with pytest.raises(SystemExit):
        parser.parse_args(["apply", "--help"])
    out = capsys.readouterr().out
    for flag in ("--remove_ratio", "--recalibrate", "--blocksize", "--percdamp", "--calibration-data"):
        assert flag in out


@pytest.mark.parametrize("command", ["apply", "safety-vector", "fisher", "eval", "sweep", "demo"])
def test_help_is_formatted_for_reading(capsys, command):
    """Usage examples kept line by line, each flag listed once, no "(default: None)" on required flags, one
    default per flag."""
    import re

    with pytest.raises(SystemExit):
        build_parser().parse_args([command, "--help"])
    out = capsys.readouterr().out
    assert "(default: None)" not in out
    for line in out.splitlines():
        flags = re.findall(r"(--[\w-]+)(?: [A-Z_\[\]. ]+)?(?:,|$)", line.strip()) if line.startswith("  --") else []
        assert len(flags) == len(set(flags)), line  # not "--recalibrate BOOL, --recalibrate BOOL"
    assert out.lower().count("(default: the device") <= 1 and "decoder layer). (default" not in out
    examples = [line for line in out.splitlines() if line.strip().startswith(f"irr {command} ")]
    assert examples, "the usage examples of the module docstring are shown as written"
    assert all(not line.rstrip().endswith("\\") or line.startswith("  ") for line in examples)
    if command == "apply":
        assert "  irr apply --base ALIGNED --finetuned FT_DIR --unaligned UNALIGNED_DIR \\\n" in out
        assert "--recalibrate BOOL    " in out and "(default: True)" in out  # an informative default stays


def test_apply_with_unaligned_matches_library(ckpts, tmp_path):
    paths, (base, ft, unaligned) = ckpts
    out = str(tmp_path / "out")
    rc = main(
        [
            "apply",
            "--base",
            paths["base"],
            "--finetuned",
            paths["finetuned"],
            "--unaligned",
            paths["unaligned"],
            "--calibration-data",
            paths["calib"],
            "--output",
            out,
        ]
    )
    assert rc == 0
    assert {"config.json", "model.safetensors", "irr_report.json", "README.md", "tokenizer.json"} <= set(_listing(out))
    report = json.load(open(os.path.join(out, "irr_report.json")))
    assert report["status"] == "ok" and report["totals"]["removed"] > 0
    # same result as the library on the same inputs
    from irr_callback.inputs.data import calibration_examples, load_examples
    from tests.helpers import tiny_tokenizer

    model = __import__("copy").deepcopy(ft)
    calib = calibration_examples(
        load_examples(paths["calib"], what="calib"), tiny_tokenizer(), num_samples=128, max_length=512
    )
    irr.realign(
        model,
        base=base,
        safety_vector=irr.safety_vector(base, unaligned, sign_only=True),
        calibration=calib,
        progress=False,
    )
    name = "model.layers.1.mlp.down_proj.weight"
    with safe_open(os.path.join(out, "model.safetensors"), "pt") as fh:
        torch.testing.assert_close(fh.get_tensor(name), model.state_dict()[name])


def test_verbose_shows_irr_lines_and_not_everyone_elses(ckpts, tmp_path, caplog, monkeypatch):
    import logging

    from transformers.utils import logging as hf_logging

    from irr_callback.logs import LOGGER

    paths, _ = ckpts
    seen = []
    import irr_callback.commands.apply as apply_cmd

    original = apply_cmd.realign_inputs
    monkeypatch.setattr(
        apply_cmd, "realign_inputs", lambda *a, **k: seen.append(hf_logging.get_verbosity()) or original(*a, **k)
    )
    for verbose in (False, True):
        caplog.clear()
        args = [
            "apply",
            "--base",
            paths["base"],
            "--finetuned",
            paths["finetuned"],
            "--unaligned",
            paths["unaligned"],
            "--calibration-data",
            paths["calib"],
            "--output",
            str(tmp_path / f"out-{verbose}"),
        ]
        assert main(["-v", *args] if verbose else args) == 0
        irr_info = [r for r in caplog.records if r.name.startswith("irr_callback") and r.levelno == logging.INFO]
        assert bool(irr_info) == verbose and (not verbose or any("IRR ok" in r.getMessage() for r in irr_info))
    assert seen == [hf_logging.WARNING] * 2  # -v does not turn on transformers' own INFO output
    assert LOGGER.getEffectiveLevel() == hf_logging.get_verbosity()  # back to following transformers


def test_safety_vector_and_fisher_files_then_apply_with_ratio(ckpts, tmp_path):
    paths, _ = ckpts
    v_path, f_path = str(tmp_path / "v.safetensors"), str(tmp_path / "f.safetensors")
    assert main(["safety-vector", "--base", paths["base"], "--unaligned", paths["unaligned"], "--output", v_path]) == 0
    assert main(["fisher", "--base", paths["base"], "--safety-data", paths["safety"], "--output", f_path]) == 0
    with safe_open(v_path, "pt") as fh:
        assert fh.metadata()["irr_callback.kind"] == "safety_vector"
        assert fh.get_tensor(next(iter(fh.keys()))).dtype == torch.int8
    out = str(tmp_path / "out")
    rc = main(
        [
            "apply",
            "--base",
            paths["base"],
            "--finetuned",
            paths["finetuned"],
            "--safety-vector",
            v_path,
            "--fisher",
            f_path,
            "--calibration-data",
            paths["calib"],
            "--output",
            out,
            "--remove_ratio",
            "0.5",
        ]
    )
    assert rc == 0
    totals = json.load(open(os.path.join(out, "irr_report.json")))["totals"]
    assert 0.35 < totals["removed"] / totals["conflicts"] < 0.65


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_safety_vector_made_from_float32_applies_in_another_dtype(ckpts, tmp_path, dtype):
    """The base fingerprint does not depend on the dtype the base is loaded in (issue 15: it was refused as
    "made for another base model")."""
    paths, _ = ckpts
    v_path = str(tmp_path / "v.safetensors")
    assert main(["safety-vector", "--base", paths["base"], "--unaligned", paths["unaligned"], "--output", v_path]) == 0
    out = str(tmp_path / "out")
    assert (
        main(
            [
                "apply",
                "--base",
                paths["base"],
                "--finetuned",
                paths["finetuned"],
                "--safety-vector",
                v_path,
                "--calibration-data",
                paths["calib"],
                "--output",
                out,
                "--dtype",
                dtype,
            ]
        )
        == 0
    )
    with open(os.path.join(out, "irr_report.json")) as fh:
        assert json.load(fh)["status"] == "ok"


def test_safety_vector_for_another_base_is_refused(ckpts, tmp_path, capsys):
    paths, _ = ckpts
    v_path = str(tmp_path / "v.safetensors")
    # a vector made with the fine-tuned model as "base" does not fit the real base
    assert (
        main(["safety-vector", "--base", paths["finetuned"], "--unaligned", paths["unaligned"], "--output", v_path])
        == 0
    )
    out = str(tmp_path / "out")
    rc = main(
        [
            "apply",
            "--base",
            paths["base"],
            "--finetuned",
            paths["finetuned"],
            "--safety-vector",
            v_path,
            "--calibration-data",
            paths["calib"],
            "--output",
            out,
        ]
    )
    assert rc == 2 and "another base" in capsys.readouterr().err
    assert not os.path.exists(out) and _listing(tmp_path) == ["v.safetensors"]


@pytest.mark.parametrize("case", ["missing_base", "missing_calib", "bad_column", "output_exists", "ratio_no_fisher"])
def test_bad_input_exits_nonzero_with_message_and_no_output(ckpts, tmp_path, capsys, case):
    paths, _ = ckpts
    out = tmp_path / "out"
    args = [
        "apply",
        "--base",
        paths["base"],
        "--finetuned",
        paths["finetuned"],
        "--unaligned",
        paths["unaligned"],
        "--calibration-data",
        paths["calib"],
        "--output",
        str(out),
    ]
    expect = {
        "missing_base": "--base",
        "missing_calib": "--calibration-data",
        "bad_column": "column",
        "output_exists": "already exists",
        "ratio_no_fisher": "--fisher",
    }[case]
    if case == "missing_base":
        args[2] = str(tmp_path / "nope")
    elif case == "missing_calib":
        args[8] = str(tmp_path / "nope.jsonl")
    elif case == "bad_column":
        args[8] = write_jsonl(tmp_path / "bad.jsonl", [{"question": "w4 w5"}])
    elif case == "output_exists":
        out.mkdir()
        (out / "keep.txt").write_text("previous")
    elif case == "ratio_no_fisher":
        args += ["--remove_ratio", "0.5"]
    assert main(args) == 2
    assert expect in capsys.readouterr().err
    if case == "output_exists":
        assert _listing(out) == ["keep.txt"]
    else:
        assert not out.exists()
    assert not [p for p in os.listdir(tmp_path) if ".tmp-" in p]


@pytest.mark.parametrize("case", ["apply_calib", "apply_safety", "sv_harmful", "fisher_safety"])
def test_empty_data_file_is_named_exit_2(ckpts, tmp_path, capsys, case):
    """An empty .jsonl is "<flag>: '<file>' is empty", exit 2 (not a bare StopIteration from datasets)."""
    paths, _ = ckpts
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    apply = [
        "apply",
        "--base",
        paths["base"],
        "--finetuned",
        paths["finetuned"],
        "--unaligned",
        paths["unaligned"],
        "--calibration-data",
        paths["calib"],
        "--output",
        str(tmp_path / "out"),
    ]
    args, flag = {
        "apply_calib": ([str(empty) if a == paths["calib"] else a for a in apply], "--calibration-data"),
        "apply_safety": (apply + ["--safety-data", str(empty), "--remove_ratio", "0.5"], "--safety-data"),
        "sv_harmful": (
            [
                "safety-vector",
                "--base",
                paths["base"],
                "--harmful-data",
                str(empty),
                "--output",
                str(tmp_path / "v.safetensors"),
            ],
            "--harmful-data",
        ),
        "fisher_safety": (
            [
                "fisher",
                "--base",
                paths["base"],
                "--safety-data",
                str(empty),
                "--output",
                str(tmp_path / "f.safetensors"),
            ],
            "--safety-data",
        ),
    }[case]
    assert main(args) == 2
    assert f"{flag}: '{empty}' is empty" in capsys.readouterr().err
    assert _listing(tmp_path) == ["empty.jsonl"]


@pytest.mark.parametrize("case", ["calib", "base", "unaligned", "sv_base", "sv_harmful", "fisher_base"])
def test_relative_local_path_that_does_not_exist_is_named_never_looked_up(ckpts, tmp_path, capsys, monkeypatch, case):
    import datasets
    import huggingface_hub
    import transformers

    def hub(*args, **kwargs):
        raise AssertionError("looked up on the Hub")

    for module, name in (
        (huggingface_hub, "snapshot_download"),
        (datasets, "load_dataset"),
        (transformers.AutoConfig, "from_pretrained"),
    ):
        monkeypatch.setattr(module, name, hub)
    paths, _ = ckpts
    monkeypatch.chdir(tmp_path)
    os.mkdir("models")  # `models/nope` next to a models/ folder is a local path, not the hub id models/nope
    apply = [
        "apply",
        "--base",
        paths["base"],
        "--finetuned",
        paths["finetuned"],
        "--unaligned",
        paths["unaligned"],
        "--calibration-data",
        paths["calib"],
        "--output",
        "out",
    ]
    sv = ["safety-vector", "--base", paths["base"], "--unaligned", paths["unaligned"], "--output", "v.safetensors"]

    def swap(args, old, new):
        return [new if a == old else a for a in args]

    args, flag, missing = {
        "calib": (swap(apply, paths["calib"], "data/nope.jsonl"), "--calibration-data", "data/nope.jsonl"),
        "base": (swap(apply, paths["base"], "models/nope"), "--base", "models/nope"),
        "unaligned": (swap(apply, paths["unaligned"], "./nope"), "--unaligned", "./nope"),
        "sv_base": (swap(sv, paths["base"], "models/nope"), "--base", "models/nope"),
        "sv_harmful": (
            sv[:3] + ["--harmful-data", "nope.jsonl", "--output", "v.safetensors"],
            "--harmful-data",
            "nope.jsonl",
        ),
        "fisher_base": (
            ["fisher", "--base", "models/nope", "--safety-data", paths["calib"], "--output", "f.safetensors"],
            "--base",
            "models/nope",
        ),
    }[case]
    assert main(args) == 2
    assert f"{flag}: '{missing}' does not exist" in capsys.readouterr().err
    assert _listing(tmp_path) == ["models"]


def test_model_that_cannot_be_found_is_named_by_its_flag(ckpts, tmp_path, capsys):
    """A hub-id-like name that cannot be loaded (offline here) names the flag it came from."""
    paths, _ = ckpts
    missing = "irr-callback-tests/no-such-model"
    assert (
        main(
            [
                "safety-vector",
                "--base",
                missing,
                "--unaligned",
                paths["unaligned"],
                "--output",
                str(tmp_path / "v.safetensors"),
            ]
        )
        == 2
    )
    assert f"--base: cannot read the model config of '{missing}'" in capsys.readouterr().err
    assert (
        main(
            [
                "safety-vector",
                "--base",
                paths["base"],
                "--unaligned",
                missing,
                "--output",
                str(tmp_path / "v.safetensors"),
            ]
        )
        == 2
    )
    assert f"--unaligned: cannot read the model config of '{missing}'" in capsys.readouterr().err
    assert (
        main(
            [
                "eval",
                "--models",
                missing,
                "--harmful",
                paths["calib"],
                "--prompt-column",
                "text",
                "--output",
                str(tmp_path / "e.json"),
            ]
        )
        == 2
    )
    assert f"--models: cannot load '{missing}'" in capsys.readouterr().err
    assert _listing(tmp_path) == []


def test_lora_adapter_apply_and_base_mismatch(ckpts, tmp_path, capsys):
    from peft import LoraConfig, get_peft_model

    paths, (base, _, _) = ckpts
    model = get_peft_model(__import__("copy").deepcopy(base), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    model.peft_config["default"].base_model_name_or_path = paths["base"]
    adapter = str(tmp_path / "adapter")
    model.save_pretrained(adapter)
    out = str(tmp_path / "out")
    rc = main(
        [
            "apply",
            "--base",
            paths["base"],
            "--finetuned",
            adapter,
            "--unaligned",
            paths["unaligned"],
            "--calibration-data",
            paths["calib"],
            "--output",
            out,
        ]
    )
    assert rc == 0
    report = json.load(open(os.path.join(out, "irr_report.json")))
    assert {m["name"].split(".")[-2] for m in report["modules"]} == {"q_proj", "v_proj"}
    assert not any(f.startswith("adapter_") for f in os.listdir(out))  # a merged, dense model
    # an adapter recorded for another base is refused
    model.peft_config["default"].base_model_name_or_path = "some-org/another-model"
    other = str(tmp_path / "adapter2")
    model.save_pretrained(other)
    rc = main(
        [
            "apply",
            "--base",
            paths["base"],
            "--finetuned",
            other,
            "--unaligned",
            paths["unaligned"],
            "--calibration-data",
            paths["calib"],
            "--output",
            str(tmp_path / "out2"),
        ]
    )
    assert rc == 2 and "another-model" in capsys.readouterr().err


def test_apply_low_memory_matches_in_memory_apply(ckpts, tmp_path):
    paths, _ = ckpts
    outs = {}
    for mode in ("memory", "low"):
        out = str(tmp_path / mode)
        extra = ["--low-memory"] if mode == "low" else []
        assert (
            main(
                [
                    "apply",
                    "--base",
                    paths["base"],
                    "--finetuned",
                    paths["finetuned"],
                    "--unaligned",
                    paths["unaligned"],
                    "--calibration-data",
                    paths["calib"],
                    "--output",
                    out,
                    *extra,
                ]
            )
            == 0
        )
        outs[mode] = out
    from irr_callback.tensors import SafetensorsMapping

    memory, low = SafetensorsMapping(outs["memory"]), SafetensorsMapping(outs["low"])
    name = "model.layers.1.self_attn.v_proj.weight"
    assert torch.equal(memory[name], low[name])
    assert {"irr_report.json", "README.md", "config.json"} <= set(_listing(outs["low"]))
