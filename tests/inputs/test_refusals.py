"""Safety data written by the base: batched greedy answers on the live model, cached under the base
fingerprint (a second call generates nothing), the alignment warning, and `safety_dataset_for_run`
(default prompts, prompts without responses, data with responses). The default data also feeds
`realign(..., safety_calibration=...)` with the recommended preset."""

from __future__ import annotations

import json
import os

import datasets
import pytest
import torch
from transformers.testing_utils import CaptureLogger

from irr_callback import IRRConfig
from irr_callback.inputs import refusals
from irr_callback.inputs import safety_prompts as sp
from tests import callback_world as world
from tests.helpers import margin, state, tiny_model, tiny_tokenizer


pytestmark = pytest.mark.usefixtures("one_thread")


def counting_generation(monkeypatch) -> dict:
    calls, original = {"n": 0, "prompts": 0}, refusals.generate_responses

    def counted(model, tokenizer, prompts, **kwargs):
        calls["n"] += 1
        calls["prompts"] += len(prompts)
        return original(model, tokenizer, prompts, **kwargs)

    monkeypatch.setattr(refusals, "generate_responses", counted)
    return calls


def test_aligned_base_answers_are_refusals_cached_and_reused(tmp_path, monkeypatch):
    calls = counting_generation(monkeypatch)
    model, tok = world.aligned_model(), world.tokenizer()
    model.train()  # the Trainer hands over a model in train mode: it must come back in train mode
    before = state(model)
    prompts = world.harmful_prompts()[:10]
    first = refusals.write_refusals(
        model, tok, prompts, max_new_tokens=6, batch_size=4, base_fingerprint="fp", cache_dir=str(tmp_path)
    )
    assert calls == {"n": 1, "prompts": 10}
    assert first.prompts == prompts and len(first.responses) == 10 and first.cached is False
    assert first.seconds > 0 and first.looks_aligned == (first.refusal_rate >= refusals.MIN_REFUSAL_RATE)
    margin("aligned base refusal rate", first.refusal_rate, ge=0.9)
    margin(
        "aligned base answers = the refusal", sum(r.startswith(world.REFUSAL) for r in first.responses) / 10, ge=0.9
    )
    assert first.looks_aligned
    assert model.training and all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert os.path.dirname(first.path) == str(tmp_path / "fp") and os.path.basename(first.path).startswith("refusals-")
    stored = json.loads(open(first.path, encoding="utf-8").read())
    assert stored["prompts"] == prompts and stored["responses"] == first.responses
    second = refusals.write_refusals(
        model, tok, prompts, max_new_tokens=6, batch_size=4, base_fingerprint="fp", cache_dir=str(tmp_path)
    )
    assert calls["n"] == 1  # nothing generated the second time
    assert second.cached and second.responses == first.responses and second.path == first.path
    assert (
        second.describe()["cached"] is True and second.describe()["refusal_rate"] == first.describe()["refusal_rate"]
    )
    # other prompts or settings: another entry, generated again
    refusals.write_refusals(model, tok, prompts[:4], max_new_tokens=6, base_fingerprint="fp", cache_dir=str(tmp_path))
    refusals.write_refusals(model, tok, prompts, max_new_tokens=3, base_fingerprint="fp", cache_dir=str(tmp_path))
    assert calls["n"] == 3 and len(os.listdir(tmp_path / "fp")) == 3


def test_batched_answers_equal_one_at_a_time(tmp_path):
    model, tok = world.aligned_model(), world.tokenizer()
    prompts = world.harmful_prompts()[::3] + ["what color is the sky", "reverse one two"]
    batched = refusals.write_refusals(model, tok, prompts, max_new_tokens=6, batch_size=8).responses
    single = refusals.write_refusals(model, tok, prompts, max_new_tokens=6, batch_size=1).responses
    assert batched == single


def test_cache_keys_on_the_weights_or_the_given_base_fingerprint(tmp_path, monkeypatch):
    calls = counting_generation(monkeypatch)
    model, tok = tiny_model(), tiny_tokenizer()
    kwargs = dict(max_new_tokens=3, cache_dir=str(tmp_path))
    refusals.write_refusals(model, tok, ["w5 w6", "w7"], **kwargs)
    refusals.write_refusals(model, tok, ["w5 w6", "w7"], base_fingerprint="fp", **kwargs)
    assert calls["n"] == 2
    with torch.no_grad():
        model.lm_head.weight.add_(1.0)  # no fingerprint given: any changed weight is another model
    refusals.write_refusals(model, tok, ["w5 w6", "w7"], **kwargs)
    assert calls["n"] == 3
    # a resumed run: the live model is fine-tuned, the answers the base wrote are found by its fingerprint
    resumed = refusals.write_refusals(model, tok, ["w5 w6", "w7"], base_fingerprint="fp", cached_only=True, **kwargs)
    assert resumed.cached and calls["n"] == 3
    with pytest.raises(FileNotFoundError, match="resumed run"):
        refusals.write_refusals(model, tok, ["w8"], base_fingerprint="fp", cached_only=True, **kwargs)


def test_damaged_cache_entry_is_regenerated(tmp_path, monkeypatch):
    calls = counting_generation(monkeypatch)
    model, tok = tiny_model(), tiny_tokenizer()
    kwargs = dict(max_new_tokens=3, base_fingerprint="fp", cache_dir=str(tmp_path))
    path = refusals.write_refusals(model, tok, ["w5 w6", "w7"], **kwargs).path
    with open(path, "w", encoding="utf-8") as fh:
        fh.write("{not json")
    again = refusals.write_refusals(model, tok, ["w5 w6", "w7"], **kwargs)
    assert calls["n"] == 2 and not again.cached and json.loads(open(path, encoding="utf-8").read())["responses"]


def test_warns_when_the_base_does_not_refuse(tmp_path):
    model, tok = tiny_model(), tiny_tokenizer()  # random weights: never a refusal
    with CaptureLogger(refusals.logger) as captured:
        out = refusals.write_refusals(model, tok, ["w5 w6 w7", "w8 w9", "w10"], max_new_tokens=4)
    assert out.refusal_rate == 0.0 and not out.looks_aligned and out.describe()["looks_aligned"] is False
    assert "does not look aligned" in captured.out
    with CaptureLogger(refusals.logger) as captured:
        assert refusals.check_refusals(["I'm sorry, I can't help with that.", "Sure: step one"]) == 0.5
    assert "does not look aligned" not in captured.out


def test_safety_dataset_for_run_defaults_to_shipped_prompts_answered_by_the_base(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    calls = counting_generation(monkeypatch)
    model, tok = tiny_model(), tiny_tokenizer()
    config = IRRConfig.recommended(num_safety_samples=12, safety_max_new_tokens=3, cache_dir=str(tmp_path))
    data, info = refusals.safety_dataset_for_run(model, tok, config, base_fingerprint="fp")
    assert data.column_names == ["prompt", "response"] and len(data) == 12
    assert data["prompt"] == sp.shipped_prompts(12, seed=config.irr_seed).prompts
    assert (
        info["source"] == "default"
        and info["origin"] == "shipped"
        and info["set"] == sp.SHIPPED_NAME
        and info["prompts"] == 12
    )
    assert info["generated_responses"] and not info["cached"] and info["path"].startswith(str(tmp_path / "fp"))
    again, info2 = refusals.safety_dataset_for_run(model, tok, config, base_fingerprint="fp")
    assert calls["n"] == 1 and info2["cached"] and again["response"] == data["response"]


def test_safety_dataset_for_run_respects_the_users_data(tmp_path, monkeypatch):
    calls = counting_generation(monkeypatch)
    model, tok = tiny_model(), tiny_tokenizer()
    config = IRRConfig.recommended(num_safety_samples=2, safety_max_new_tokens=3, cache_dir=str(tmp_path))
    with_answers = datasets.Dataset.from_dict({"prompt": ["w5", "w6"], "response": ["w7", "w8"]})
    data, info = refusals.safety_dataset_for_run(model, tok, config, safety_dataset=with_answers)
    assert data is with_answers and info["generated_responses"] is False and calls["n"] == 0
    prompts_only = datasets.Dataset.from_dict({"prompt": ["w5 w9", "w6", "w11"]})
    data, info = refusals.safety_dataset_for_run(model, tok, config, safety_dataset=prompts_only)
    assert data["prompt"] == ["w5 w9", "w6"] and len(data["response"]) == 2 and calls["n"] == 1
    assert info["source"] == "safety_dataset" and info["generated_responses"] is True
    with pytest.raises(ValueError, match="safety_prompt_column"):
        refusals.safety_dataset_for_run(model, tok, config, safety_dataset=[{"question": "w5"}])


def test_default_safety_data_realigns_with_the_recommended_preset(tmp_path, monkeypatch):
    """The library path the callback will take: default prompts, the base's answers, tokenized like
    fine-tuning data, as `safety_calibration` of `realign` with `IRRConfig.recommended()`."""
    import irr_callback
    from irr_callback.inputs.data import tokenize_pairs
    from tests.helpers import perturbed, text_rows

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    base, tok = tiny_model(), tiny_tokenizer()
    config = IRRConfig.recommended(num_safety_samples=16, safety_max_new_tokens=4, cache_dir=str(tmp_path))
    data, info = refusals.safety_dataset_for_run(base, tok, config, base_fingerprint="fp")
    safety = tokenize_pairs(tok, data["prompt"], data["response"], max_length=64)
    calibration = [{"input_ids": tok(r["text"])["input_ids"]} for r in text_rows(8)]
    model = perturbed(base, 0.02, seed=1)
    report = irr_callback.realign(model, base=base, calibration=calibration, safety_calibration=safety, config=config)
    assert report.status == "ok" and info["set"] == sp.SHIPPED_NAME
    assert report.totals["removed"] == 0  # identify_mode="none": nothing removed by sign
