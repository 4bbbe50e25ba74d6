"""`irr apply` / `irr sweep` with the safety stream (issue 12): --safety-data alone is the recommended
preset (no --unaligned), --safety_weight and the other safety flags, λ as a sweep axis, bad input."""

import copy
import glob
import json
import os

import datasets
import pytest
import torch

import irr_callback as irr
from irr_callback.cli import main
from irr_callback.inputs.data import calibration_examples, load_examples, safety_pairs, tokenize_pairs
from irr_callback.tensors import SafetensorsMapping
from tests.cli.test_cli import ckpts  # noqa: F401  (the tiny checkpoints fixture)
from tests.cli.test_eval import saved  # noqa: F401  (the toy world's models and data as files)
from tests.helpers import margin, text_rows, tiny_tokenizer, write_jsonl


NAME = "model.layers.1.mlp.down_proj.weight"


def _apply(paths, out, *extra):
    return main(
        [
            "apply",
            "--base",
            paths["base"],
            "--finetuned",
            paths["finetuned"],
            "--calibration-data",
            paths["calib"],
            "--safety-data",
            paths["safety"],
            "--output",
            str(out),
            *extra,
        ]
    )


def _tensor(directory, name=NAME):
    return SafetensorsMapping(str(directory))[name]


def test_apply_with_only_safety_data_is_the_recommended_preset_and_matches_library(ckpts, tmp_path, capsys):  # noqa: F811
    paths, (base, ft, _) = ckpts
    out = tmp_path / "out"
    no_retain = [
        "--retain_weight",
        "0",
    ]  # the safety stream alone (the retain stream: tests/cli/test_retain_stream.py)
    assert _apply(paths, out, *no_retain) == 0
    printed = capsys.readouterr().out
    report = json.loads((out / "irr_report.json").read_text())
    assert report["setting"] == "recommended" and report["config"]["identify_mode"] == "none"
    assert report["auto"]["chosen"] == report["safety_weight"] > 0
    assert report["safety_sequences"] == 6 and report["totals"]["removed"] == 0
    assert report["extra"]["preset"] == "recommended"
    assert report["config"]["calibration_filter"] == "refused" and report["calibration_filter"]["dropped"] == 0
    assert "--safety-data" in report["extra"]["safety_inputs"]["safety_calibration"]["source"]
    assert f"λ={report['safety_weight']:g} chosen by safety_weight='auto'" in printed
    card = (out / "README.md").read_text()
    assert "**recommended**" in card and f"λ = {report['safety_weight']:g}, chosen by" in card
    # the same as the library call on the same rows (tokenized like the calibration data)
    tok = tiny_tokenizer()
    safety = load_examples(paths["safety"], what="safety")
    model = copy.deepcopy(ft)
    lib = irr.realign(
        model,
        base=base,
        calibration=calibration_examples(
            load_examples(paths["calib"], what="c"), tok, num_samples=128, max_length=512
        ),
        safety_calibration=tokenize_pairs(tok, safety["prompt"], safety["response"], max_length=512),
        config=irr.IRRConfig.recommended(),
        progress=False,
    )
    assert lib.safety_weight == report["safety_weight"]
    torch.testing.assert_close(_tensor(out), dict(model.named_parameters())[NAME].detach(), rtol=0, atol=0)
    # --low-memory searches λ the same way, one layer at a time
    assert _apply(paths, tmp_path / "low", "--low-memory", "--calibration_filter", "none", *no_retain) == 0
    low = json.loads((tmp_path / "low" / "irr_report.json").read_text())
    assert low["config"]["calibration_filter"] == "none" and "calibration_filter" not in low  # nothing was dropped
    assert low["safety_weight"] == report["safety_weight"] and low["auto"]["chosen"] == report["safety_weight"]
    torch.testing.assert_close(_tensor(tmp_path / "low"), _tensor(out), rtol=1e-5, atol=1e-6)


def test_apply_fixed_weight_low_memory_equals_in_memory_and_unaligned_is_ignored_by_recommended(ckpts, tmp_path):  # noqa: F811
    paths, _ = ckpts
    fixed = [
        "--safety_weight",
        "0.3",
        "--safety_tokens",
        "response",
        "--retain_weight",
        "0",
        "--task_term",
        "fine-tuned",
    ]
    assert _apply(paths, tmp_path / "mem", *fixed) == 0
    assert _apply(paths, tmp_path / "low", *fixed, "--low-memory") == 0
    torch.testing.assert_close(_tensor(tmp_path / "low"), _tensor(tmp_path / "mem"), rtol=0, atol=0)
    report = json.loads((tmp_path / "low" / "irr_report.json").read_text())
    assert report["setting"] == "safety-regularised" and report["safety_weight"] == 0.3 and "auto" not in report
    assert report["config"]["safety_tokens"] == "response" and report["extra"]["preset"] == "recommended"
    assert report["config"]["task_term"] == "fine-tuned"
    # --preset recommended with an unaligned model: the preset reads no safety vector (same weights)
    assert _apply(paths, tmp_path / "rec", *fixed, "--unaligned", paths["unaligned"], "--preset", "recommended") == 0
    torch.testing.assert_close(_tensor(tmp_path / "rec"), _tensor(tmp_path / "mem"), rtol=0, atol=0)
    # with --unaligned and no --preset: the paper's preset plus the safety stream (sign removal + λ)
    assert _apply(paths, tmp_path / "sign", "--safety_weight", "0.3", "--unaligned", paths["unaligned"]) == 0
    report = json.loads((tmp_path / "sign" / "irr_report.json").read_text())
    assert report["config"]["identify_mode"] == "sign" and report["totals"]["removed"] > 0
    assert report["setting"] == "safety-regularised"


def test_apply_generates_missing_responses_with_the_base_model(ckpts, tmp_path):  # noqa: F811
    paths, _ = ckpts
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": r["text"]} for r in text_rows(8, seed=3)])
    out = tmp_path / "out"
    args = ["--safety-data", prompts, "--safety_weight", "1", "--safety_max_new_tokens", "4"]
    assert _apply(paths, out, *args) == 0
    report = json.loads((out / "irr_report.json").read_text())
    assert "generated by the base model" in report["extra"]["safety_inputs"]["safety_calibration"]["source"]
    assert report["safety_sequences"] == 8 and report["safety_weight"] == 1.0


@pytest.mark.parametrize(
    "case",
    [
        "negative_weight",
        "word_weight",
        "no_usable_rows",
        "no_prompt_column",
        "low_memory_no_response",
        "weight_without_safety_data",
        "paper_preset_without_vector",
        "auto_too_few_rows",
    ],
)
def test_apply_bad_safety_input_exits_2_naming_the_field(ckpts, tmp_path, capsys, case):  # noqa: F811
    paths, _ = ckpts
    paths = dict(paths)
    extra = []
    blank = [{"prompt": " ", "response": "w5"}, {"prompt": "w4", "response": ""}]
    expect = {
        "negative_weight": "IRRConfig.safety_weight must be a number >= 0 or 'auto'",
        "word_weight": "IRRConfig.safety_weight must be a number >= 0 or 'auto', got 'lots'",
        "no_usable_rows": "--safety-data has no usable row",
        "no_prompt_column": "--safety-data has no column 'prompt' (--safety-prompt-column)",
        "low_memory_no_response": "has no column 'response' (--safety-response-column)",
        "weight_without_safety_data": "--safety_weight 0.5 needs --safety-data",
        "paper_preset_without_vector": "needs --unaligned or --safety-vector",
        "auto_too_few_rows": "--safety_weight auto holds out part of --safety-data",
    }[case]
    if case == "negative_weight":
        extra = ["--safety_weight", "-1"]
    elif case == "word_weight":
        extra = ["--safety_weight", "lots"]
    elif case == "no_usable_rows":
        paths["safety"] = write_jsonl(tmp_path / "blank.jsonl", blank)
    elif case == "no_prompt_column":
        paths["safety"] = write_jsonl(tmp_path / "q.jsonl", [{"question": "w4", "response": "w5"}])
    elif case == "low_memory_no_response":
        paths["safety"] = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "w4 w5"}] * 8)
        extra = ["--low-memory", "--safety_weight", "0.3"]
    elif case == "paper_preset_without_vector":
        extra = ["--preset", "paper"]
    elif case == "auto_too_few_rows":
        paths["safety"] = write_jsonl(tmp_path / "few.jsonl", [{"prompt": "w4", "response": "w5"}] * 3)
    if case == "weight_without_safety_data":
        args = ["apply", "--base", paths["base"], "--finetuned", paths["finetuned"], "--unaligned", paths["unaligned"]]
        args += ["--calibration-data", paths["calib"], "--output", str(tmp_path / "out"), "--safety_weight", "0.5"]
        assert main(args) == 2
    else:
        assert _apply(paths, tmp_path / "out", *extra) == 2
    assert expect in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_sweep_safety_weight_axis(saved, tmp_path, capsys):  # noqa: F811
    out = tmp_path / "sweep"
    flags = {
        "--base": saved["aligned"],
        "--finetuned": saved["finetuned"],
        "--calibration-data": saved["downstream_train"],
        "--safety-data": saved["safety_data"],  # alone: the recommended preset
        "--limit": "16",
        "--threads": "1",
        "--batch-size": "64",
    }
    args = ["sweep", "--toy", "--no-base", "--save-models", *[x for kv in flags.items() for x in kv]]
    args += ["--output-dir", str(out)]
    assert main([*args, "--safety-weights", "0", "1", "auto"]) == 0
    assert {"sweep.md", "sweep.json", "pareto.png", "lambda-0", "lambda-1", "lambda-auto"} <= set(os.listdir(out))
    result = json.load(open(out / "sweep.json"))
    rows = {r["model"]: r for r in result["rows"]}
    assert list(rows) == ["fine-tuned", "IRR λ=0", "IRR λ=1", "IRR λ=auto"]
    assert rows["IRR λ=1"]["lambda"] == 1.0 and rows["IRR λ=1"]["setting"] == "safety-regularised"
    auto = rows["IRR λ=auto"]
    assert auto["setting"] == "recommended" and auto["lambda"] == result["irr_totals"]["λ=auto"]["safety_weight"] > 0
    assert result["irr_totals"]["λ=auto"]["auto"]["chosen"] == auto["lambda"]
    assert rows["IRR λ=0"]["removed_pct"] == 0  # identify_mode none, λ = 0: nothing to do
    assert rows["IRR λ=0"]["refusal_attacked"] == rows["fine-tuned"]["refusal_attacked"]
    margin(
        "sweep auto - ft refusal_attacked", auto["refusal_attacked"] - rows["fine-tuned"]["refusal_attacked"], ge=0.5
    )
    saved_report = json.loads((out / "lambda-auto" / "irr_report.json").read_text())
    assert saved_report["safety_weight"] == auto["lambda"]
    table = capsys.readouterr().out
    assert "| IRR λ=auto |" in table and "lambda" in table
    # bad axis values exit 2 naming the flag, before anything is written
    for bad, expect in ((["--safety-weights", "-1"], "--safety-weights"), (["--remove-ratios", "0.5", "1"], "none")):
        assert main([*args[:-1], str(tmp_path / "bad"), *bad]) == 2
        assert expect in capsys.readouterr().err and not (tmp_path / "bad").exists()


def test_safety_dataset_in_memory_form_is_accepted_by_the_library_reader():
    prompts, responses, generated = safety_pairs(
        datasets.Dataset.from_dict({"prompt": ["a", "", "b"], "response": ["x", "y", " "]}),
        prompt_column="prompt",
        response_column="response",
        what="safety",
    )
    assert (prompts, responses, generated) == (["a"], ["x"], False)


def _apply_with_no_safety_flag(paths, out, *extra):
    args = ["apply", "--base", paths["base"], "--finetuned", paths["finetuned"]]
    return main([*args, "--calibration-data", paths["calib"], "--output", str(out), *extra])


def test_apply_with_no_safety_input_answers_the_default_prompts_with_the_base(ckpts, tmp_path, monkeypatch, capsys):  # noqa: F811
    from irr_callback.inputs import refusals
    from irr_callback.inputs import safety_prompts as sp

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # the shipped set
    monkeypatch.setenv("IRR_CACHE", str(tmp_path / "cache"))
    paths, _ = ckpts
    calls = []
    original = refusals.generate_responses

    def counted(model, *args, **kwargs):
        calls.append(model.config.name_or_path)
        return original(model, *args, **kwargs)

    monkeypatch.setattr(refusals, "generate_responses", counted)
    assert _apply_with_no_safety_flag(paths, tmp_path / "out") == 0
    assert calls and set(calls) == {paths["base"]}  # the answers were written by --base, not the fine-tune
    report = json.loads((tmp_path / "out" / "irr_report.json").read_text())
    assert report["status"] == "ok" and report["extra"]["preset"] == "recommended"
    assert report["config"]["identify_mode"] == "none" and report["config"]["safety_weight"] == "auto"
    assert report["auto"]["chosen"] == report["safety_weight"] and report["totals"]["removed"] == 0
    data = report["extra"]["safety_inputs"]["safety_data"]
    assert data["set"] == sp.SHIPPED_NAME and data["origin"] == "shipped" and data["license"] == "Apache-2.0"
    assert data["prompts"] == irr.IRRConfig().num_safety_samples == report["safety_sequences"]
    assert data["generated_responses"] and data["cached"] is False
    # the report names the cache file, not its path on this machine (an output carries no local path)
    assert data["path"].startswith("refusals-") and str(tmp_path) not in json.dumps(report)
    [local] = glob.glob(os.path.join(str(tmp_path / "cache"), "**", data["path"]), recursive=True)
    source = report["extra"]["safety_inputs"]["safety_calibration"]["source"]
    assert "default safety prompts" in source and "generated by the base model" in source
    assert "safety_data" in (tmp_path / "out" / "README.md").read_text()  # the model card lists the set
    # the prompts and answers are the callback's: the default set, answered by the base, cached
    cached = json.loads(open(local).read())
    assert cached["prompts"] == sp.load_default_prompts(data["prompts"], seed=0, online=False).prompts
    # a second run reuses the cached answers: the same weights, nothing generated
    n = len(calls)
    assert _apply_with_no_safety_flag(paths, tmp_path / "again") == 0
    again = json.loads((tmp_path / "again" / "irr_report.json").read_text())
    assert len(calls) == n and again["extra"]["safety_inputs"]["safety_data"]["cached"] is True
    torch.testing.assert_close(_tensor(tmp_path / "again"), _tensor(tmp_path / "out"), rtol=0, atol=0)
    # --low-memory cannot generate the answers (with 'auto' or a number): a clear error, nothing written
    capsys.readouterr()
    assert _apply_with_no_safety_flag(paths, tmp_path / "low", "--low-memory") == 2
    assert "cannot generate the base model's answers to the default safety prompts" in capsys.readouterr().err
    assert _apply_with_no_safety_flag(paths, tmp_path / "low", "--low-memory", "--safety_weight", "0.3") == 2
    assert "cannot generate the base model's answers to the default safety prompts" in capsys.readouterr().err
    assert not (tmp_path / "low").exists()


def test_apply_help_names_the_default_safety_data(capsys):
    from irr_callback.cli import build_parser

    with pytest.raises(SystemExit):
        build_parser().parse_args(["apply", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "With no safety input at all" in out and "default harmful prompts" in out
