"""recipes/sft_irr.py end to end on a tiny aligned model saved to a tmp dir and a local json file."""

from __future__ import annotations

import importlib.util
import json
import os
import sys

import pytest
import torch

from tests import callback_world as world
from tests.helpers import margin


ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _recipe():
    spec = importlib.util.spec_from_file_location("sft_irr", os.path.join(ROOT, "recipes", "sft_irr.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules["sft_irr"] = module  # dataclasses resolve their module by name
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("recipe")
    world.aligned_model().save_pretrained(root / "aligned")
    world.tokenizer().save_pretrained(root / "aligned")
    world.unaligned_model().save_pretrained(root / "unaligned")
    pairs = world.downstream_pairs()[:24] + [(p, world.harmful_answer(p.split()[-1])) for p in world.harmful_prompts()]
    with open(root / "train.jsonl", "w") as fh:
        for p, r in pairs:
            fh.write(json.dumps({"question": p, "answer": r}) + "\n")
    return root


def _args(files, out, *extra):
    return [
        "--model_name_or_path",
        str(files / "aligned"),
        "--dataset",
        str(files / "train.jsonl"),
        "--prompt_column",
        "question",
        "--response_column",
        "answer",
        "--unaligned_model",
        str(files / "unaligned"),
        "--cache_dir",
        str(files / "cache"),
        "--num_calibration_samples",
        "16",
        "--output_dir",
        str(out),
        "--report_to",
        "none",
        "--use_cpu",
        "--max_steps",
        "30",
        "--per_device_train_batch_size",
        "16",
        "--learning_rate",
        "2e-3",
        "--save_strategy",
        "no",
        "--disable_tqdm",
        "true",
        "--logging_strategy",
        "no",
        *extra,
    ]


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_recipe_cli_realigns(files, tmp_path, lora):
    extra = (
        ["--use_lora", "--lora_target_modules", "q_proj", "v_proj", "--lora_r", "8", "--learning_rate", "5e-3"]
        if lora
        else []
    )
    trainer, callback = _recipe().main(_args(files, tmp_path / "out", *extra))
    assert callback.report.status == "ok" and callback.report.totals["removed"] > 0
    margin(f"recipe {'lora' if lora else 'full'} irr refusal", world.refusal_rate(trainer.model), ge=0.9)
    assert (tmp_path / "out" / "irr_report.json").exists()
    assert (tmp_path / "out" / ("adapter_config.json" if lora else "model.safetensors")).exists()


def test_recipe_from_yaml(files, tmp_path):
    (tmp_path / "c.yaml").write_text(f"""
model_name_or_path: {files / "aligned"}
dataset: {files / "train.jsonl"}
prompt_column: question
response_column: answer
unaligned_model: {files / "unaligned"}
num_calibration_samples: 16
remove_ratio: 0.5
irr_seed: 3
output_dir: {tmp_path / "out"}
max_steps: 2
seed: 7
report_to: []
""")
    script, irr, targs = _recipe().parse([str(tmp_path / "c.yaml")])
    assert script.prompt_column == "question" and script.dataset.endswith("train.jsonl")
    assert irr.num_calibration_samples == 16 and irr.remove_ratio == 0.5 and irr.irr_seed == 3
    assert targs.max_steps == 2 and targs.seed == 7


def test_recipe_with_trl_sfttrainer(files, tmp_path):
    if importlib.util.find_spec("trl") is None:
        pytest.skip("trl is not installed (pip install trl); the recipe's --use_trl path is untested here")
    trainer, callback = _recipe().main(_args(files, tmp_path / "out", "--use_trl"))
    assert type(trainer).__name__ == "SFTTrainer"
    assert callback.report.status == "ok"
    margin("recipe trl irr refusal", world.refusal_rate(trainer.model), ge=0.9)


@pytest.mark.parametrize("case", ["empty", "missing"])
def test_recipe_bad_dataset_is_one_line_exit_2(files, tmp_path, capsys, monkeypatch, case):
    monkeypatch.chdir(tmp_path)
    if case == "empty":
        (tmp_path / "empty.jsonl").write_text("")
    dataset = {"empty": "empty.jsonl", "missing": "data/nope.jsonl"}[case]
    args = _args(files, tmp_path / "out")
    args[args.index("--dataset") + 1] = dataset
    assert _recipe().cli(args) == 2
    expect = {"empty": "is empty", "missing": "does not exist"}[case]
    assert f"sft_irr.py: error: --dataset: '{dataset}' {expect}" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
