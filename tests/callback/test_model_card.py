"""The README.md written next to a realigned model (issue 15: wording, sources, counts, base_model)."""

from __future__ import annotations

import pytest

from irr_callback.config import IRRConfig
from irr_callback.outputs.model_card import build_model_card, display_name, hub_id
from irr_callback.report import IRRReport, ModuleStats


def report(modules: int = 1, **config) -> IRRReport:
    r = IRRReport(config=IRRConfig(**config).to_dict())
    r.modules = [
        ModuleStats(name=f"model.layers.0.m{i}.weight", shape=(4, 4), entries=16, conflicts=8, removed=4, layer=0)
        for i in range(modules)
    ]
    return r


CACHE = "/home/me/.cache/irr_callback/0123abcd/safety_vector-99.safetensors"


def card(rep, base="/home/me/models/llama-aligned", sources=None) -> str:
    sources = sources or {
        "safety_vector": {
            "source": "unaligned_model",
            "cached": True,
            "path": CACHE,
            "unaligned_model": "/home/me/models/llama-unaligned",
        },
        "importance": {"source": "none", "cached": False, "path": None},
    }
    return str(build_model_card(rep, base_model=base, sources=sources))


def test_wording_follows_remove_ratio():
    assert "Every fine-tuning delta whose sign conflicts" in card(report(remove_ratio=1.0))
    half = card(
        report(remove_ratio=0.5),
        sources={
            "safety_vector": {"source": "safety_vector", "path": "v.safetensors"},
            "importance": {"source": "fisher", "path": "/x/f.safetensors"},
        },
    )
    assert "every" not in half.lower()
    assert "the 50% with the highest Fisher importance" in half and "other conflicting deltas were kept" in half
    assert "IRR_more" in card(report(remove_ratio=0.5, remove_more=True))
    assert "left unchanged (recalibrate=False)" in card(report(recalibrate=False))


def test_sources_not_cache_paths_and_counts():
    text = card(report(modules=1))
    assert CACHE not in text and "/home/me" not in text
    assert "`llama-unaligned`" in text and "unaligned_model" in text and "reused from the cache" in text
    assert "in 1 module;" in text and "1 modules" not in text and "0 modules kept plain removal" in text
    assert "in 3 modules;" in card(report(modules=3))
    harmful = card(
        report(),
        sources={
            "safety_vector": {
                "source": "harmful_dataset",
                "path": CACHE,
                "harmful_dataset": "data/harmful.jsonl",
                "steps": 30,
            }
        },
    )
    assert "`harmful.jsonl`" in harmful and "30-step harmful fine-tune" in harmful and CACHE not in harmful
    in_memory = card(
        report(),
        sources={
            "safety_vector": {"source": "harmful_dataset", "harmful_dataset": "Dataset"},
            "importance": {
                "source": "safety_dataset",
                "safety_dataset": "org/safety",
                "generated_responses": True,
                "path": CACHE,
            },
        },
    )
    assert "an in-memory dataset" in in_memory and "`org/safety`" in in_memory and "own answers" in in_memory


@pytest.mark.parametrize(
    "base, expected",
    [
        ("/home/me/models/llama-aligned", None),
        ("models/llama-aligned", None),  # relative local path
        ("meta-llama/Llama-3.2-1B-Instruct", "meta-llama/Llama-3.2-1B-Instruct"),
        ("/root/.cache/huggingface/hub/models--meta-llama--Llama-3.2-1B/snapshots/abc123", "meta-llama/Llama-3.2-1B"),
    ],
)
def test_base_model_is_a_hub_id_or_left_out(tmp_path, monkeypatch, base, expected):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models").mkdir()
    header = card(report(), base=base).split("---")[1]
    assert hub_id(base) == expected
    if expected:
        assert f"base_model: {expected}" in header
    else:
        assert "base_model" not in header and "/home/me" not in card(report(), base=base)
    assert display_name(base) in card(report(), base=base)


def test_source_lines_name_each_input_once_and_rightly():
    """The safety stream points to `safety_data` (one description); the retain data are general prompts."""
    from irr_callback.outputs.model_card import source_text

    stream = source_text("safety_calibration", {"source": "safety_data", "examples": 114})
    assert "114 rows of the safety data (`safety_data`)" in stream
    retain = source_text("retain_data", {"source": "default", "set": "general_prompts.jsonl", "prompts": 64})
    assert "default general prompts" in retain and "safety" not in retain
    assert "default safety prompts" in source_text("safety_data", {"source": "default", "set": "s", "prompts": 8})
    assert "identify_mode='none'" in source_text("safety_vector", {"source": "none"})
