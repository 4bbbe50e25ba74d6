"""`irr apply` with the retain stream: --retain-data with answers (in memory and --low-memory, same weights),
the shipped general prompts answered by --base without it; --low-memory cannot generate answers (without
--retain-data the term is off, with prompts only it is refused)."""

import json

import torch

from irr_callback.inputs.general_prompts import SHIPPED_NAME
from tests.cli.test_cli import ckpts  # noqa: F401  (the tiny checkpoints fixture)
from tests.cli.test_safety_stream import _apply, _tensor
from tests.helpers import text_rows, write_jsonl


RETAIN = ["--safety_weight", "0.3", "--retain_weight", "1"]


def test_apply_with_retain_data_in_memory_equals_low_memory(ckpts, tmp_path):  # noqa: F811
    paths, _ = ckpts
    rows = [{"prompt": r["text"], "response": "w1 w2 w3"} for r in text_rows(5, seed=7)]
    data = write_jsonl(tmp_path / "retain.jsonl", rows)
    assert _apply(paths, tmp_path / "mem", *RETAIN, "--retain-data", data) == 0
    assert _apply(paths, tmp_path / "low", *RETAIN, "--retain-data", data, "--low-memory") == 0
    torch.testing.assert_close(_tensor(tmp_path / "low"), _tensor(tmp_path / "mem"), rtol=0, atol=0)
    report = json.loads((tmp_path / "mem" / "irr_report.json").read_text())
    assert report["retain_sequences"] == 5 and report["config"]["retain_weight"] == 1.0
    assert (
        report["extra"]["retain_data"]["set"].endswith("retain.jsonl")
        and not report["extra"]["retain_data"]["generated_responses"]
    )
    card = (tmp_path / "mem" / "README.md").read_text()
    assert "Retain stream: 5 sequences" in card and "ρ = 1" in card
    assert _apply(paths, tmp_path / "none", "--safety_weight", "0.3") == 0  # ρ = 0: another model
    assert not torch.equal(_tensor(tmp_path / "none"), _tensor(tmp_path / "mem"))


def test_apply_without_retain_data_answers_the_shipped_prompts_and_low_memory_refuses(
    ckpts,  # noqa: F811
    tmp_path,
    monkeypatch,
    capsys,
):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("IRR_CACHE", str(tmp_path / "cache"))
    paths, _ = ckpts
    extra = [*RETAIN, "--num_retain_samples", "4", "--retain_max_new_tokens", "3"]
    assert _apply(paths, tmp_path / "out", *extra) == 0
    info = json.loads((tmp_path / "out" / "irr_report.json").read_text())["extra"]["retain_data"]
    assert info["set"] == SHIPPED_NAME and info["generated_responses"] and info["examples"] == 4
    assert _apply(paths, tmp_path / "low", *extra, "--low-memory") == 0  # cannot generate: the retain term is off
    assert json.loads((tmp_path / "low" / "irr_report.json").read_text())["config"]["retain_weight"] == 0.0
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": r["text"]} for r in text_rows(3, seed=2)])
    assert _apply(paths, tmp_path / "low2", *extra, "--retain-data", prompts, "--low-memory") == 2
    assert "--retain-data" in capsys.readouterr().err and not (tmp_path / "low2").exists()
