"""The default harmful prompts: the shipped set (offline, >= 100, deterministic, every category) and
the hub set (the documented id, loaded with `datasets`; the shipped set when it cannot be loaded)."""

from __future__ import annotations

import datasets
import pytest

from irr_callback.inputs import safety_prompts as sp


def test_shipped_set_loads_offline_and_is_large_and_varied(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    def no_hub(*args, **kwargs):
        raise AssertionError("the hub must not be asked when offline")

    monkeypatch.setattr(datasets, "load_dataset", no_hub)
    rows = sp.shipped_rows()
    assert len(rows) >= 100
    assert len({r["id"] for r in rows}) == len(rows) and len({r["prompt"] for r in rows}) == len(rows)
    categories = {r["category"] for r in rows}
    assert {"weapons", "cyber", "fraud", "drugs", "self_harm", "hate", "violence", "privacy"} <= categories
    chosen = sp.load_default_prompts(None)
    assert chosen.source == "shipped" and chosen.name == sp.SHIPPED_NAME and chosen.license == "Apache-2.0"
    assert len(chosen.prompts) == len(rows) and chosen.fallback_reason == "offline"
    assert chosen.describe()["prompts"] == len(rows) and chosen.describe()["set"] == sp.SHIPPED_NAME


def test_shipped_file_is_package_data():
    from pathlib import Path

    tomllib = pytest.importorskip("tomllib")  # python >= 3.11
    root = Path(__file__).resolve().parents[2]
    package_data = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    assert sp.SHIPPED_FILE in package_data["irr_callback"]
    assert "Apache-2.0" in (root / "irr_callback" / "resources" / "README.md").read_text()


def test_subsets_are_deterministic_and_splits_disjoint():
    a = sp.shipped_prompts(32, seed=3).prompts
    assert a == sp.shipped_prompts(32, seed=3).prompts and len(a) == 32
    assert a != sp.shipped_prompts(32, seed=4).prompts
    assert sp.shipped_prompts(16, seed=3).prompts == a[:16]  # a prefix: more prompts never reorder the first
    train, test = sp.shipped_prompts(None, split="train").prompts, sp.shipped_prompts(None, split="test").prompts
    assert not set(train) & set(test) and len(train) + len(test) == len(sp.shipped_rows())
    assert 0.1 < len(test) / (len(train) + len(test)) < 0.3
    assert set(sp.shipped_prompts(None, split="test", seed=7).prompts) == set(test)  # the split ignores the seed
    with pytest.raises(ValueError, match="split"):
        sp.shipped_prompts(4, split="dev")


def _fake_hub(calls):
    def load_dataset(path, **kwargs):
        calls.append((path, kwargs))
        return datasets.Dataset.from_dict(
            {sp.HUB_COLUMN: [f"harmful request number {i}" for i in range(40)], "target": ["Sure"] * 40}
        )

    return load_dataset


def test_online_uses_the_documented_hub_dataset(monkeypatch):
    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    calls = []
    monkeypatch.setattr(datasets, "load_dataset", _fake_hub(calls))
    chosen = sp.load_default_prompts(16, seed=1)
    assert calls == [(sp.HUB_DATASET, {"split": sp.HUB_SPLIT, "revision": sp.HUB_REVISION})]
    assert sp.HUB_DATASET == "walledai/AdvBench" and sp.HUB_COLUMN == "prompt"
    assert chosen.source == "hub" and chosen.name == sp.HUB_DATASET and chosen.license == "MIT"
    assert len(chosen.prompts) == 16 and all(p.startswith("harmful request") for p in chosen.prompts)
    assert chosen.describe()["available"] == 40 and chosen.describe()["revision"] == sp.HUB_REVISION
    assert sp.load_default_prompts(16, seed=1).prompts == chosen.prompts  # deterministic online too


@pytest.mark.parametrize("error", [ConnectionError("no route to host"), OSError("couldn't reach the hub")])
def test_connection_error_falls_back_to_the_shipped_set(monkeypatch, error):
    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    calls = []

    def unreachable(path, **kwargs):
        calls.append(path)
        raise error

    monkeypatch.setattr(datasets, "load_dataset", unreachable)
    chosen = sp.load_default_prompts(24, seed=2)
    assert calls == [sp.HUB_DATASET]
    assert chosen.source == "shipped" and chosen.prompts == sp.shipped_prompts(24, seed=2).prompts
    assert type(error).__name__ in chosen.fallback_reason and "fallback_reason" in chosen.describe()


@pytest.mark.parametrize("variable", ["HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"])
def test_offline_variables_skip_the_hub(monkeypatch, variable):
    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv(variable, "1")
    calls = []
    monkeypatch.setattr(datasets, "load_dataset", _fake_hub(calls))
    assert sp.load_default_prompts(8).source == "shipped" and calls == []
    assert sp.load_default_prompts(8, online=True).source == "hub"  # an explicit online=True asks the hub


def test_hub_id_is_pinned_in_the_config_help_and_the_docs():
    from dataclasses import fields
    from pathlib import Path

    from irr_callback import IRRConfig

    help_text = next(f for f in fields(IRRConfig) if f.name == "safety_dataset").metadata["help"]
    assert sp.HUB_DATASET in help_text and "MIT" in help_text
    docs = (Path(__file__).resolve().parents[2] / "docs" / "defaults.md").read_text()
    assert sp.HUB_DATASET in docs and sp.HUB_REVISION in docs and sp.SHIPPED_FILE in docs
