"""`IRRConfig.calibration_filter="refused"`: the calibration rows whose prompt the aligned reference refuses are
dropped before anything else, in every path, and the run is then the run without those rows."""

import copy
import logging

import pytest
import torch

from irr_callback import IRRConfig, realign, realign_checkpoint
from irr_callback.config import IRRConfigError
from irr_callback.pipeline.calibration import CalibrationError
from irr_callback.pipeline.calibration_filter import MAX_REFUSALS, probe_batches, refusal_prefixes, row_prompts
from irr_callback.tensors import SafetensorsMapping
from tests.helpers import greedy_continuation, random_lora, refused_calibration, state, triple


REFUSED = (1, 4)


def config(**overrides):
    values = dict(safety_weight=0.5, retain_weight=0.0, calibration_batch_size=2, calibration_filter="refused")
    return IRRConfig.recommended(**{**values, **overrides})


def run(model, base, rows, safety, cfg):
    return realign(model, base=base, calibration=rows, safety_calibration=safety, config=cfg, progress=False)


def test_refusal_openings_most_common_first_and_capped():
    def batch(responses):
        ids = torch.tensor([[7, 8] + r for r in responses])
        scored = torch.tensor([[0, 0] + [1] * len(r) for r in responses])
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "irr_loss_mask": scored}

    common, rare = [10, 11, 12, 13, 14], [20, 21, 22, 23, 24]
    batches = [batch([rare, common]), batch([common, [30, 1, 2, 3, 4]])]
    batches += [batch([[40 + i, 1, 2, 3, 9], [50 + i, 1, 2, 3, 9]]) for i in range(3)]
    openings = [o.tolist() for o in refusal_prefixes(batches)]
    assert openings[0] == common[:4]  # twice, and cut to the opening
    assert len(openings) == MAX_REFUSALS


def test_probes_are_prompt_plus_continuation_scored_on_the_continuation_only():
    rows = [
        {"input_ids": torch.tensor([5, 6, 7, 8, 9]), "irr_loss_mask": torch.tensor([0, 0, 1, 1, 1])},
        {"input_ids": torch.tensor([5, 6, 7]), "irr_loss_mask": torch.tensor([1, 1, 1])},  # no labels: no prompt
        {"input_ids": torch.tensor([3, 4, 5]), "irr_loss_mask": torch.tensor([0, 1, 1])},
    ]
    prompts = row_prompts(rows)
    assert [(i, p.tolist()) for i, p in prompts] == [(0, [5, 6]), (2, [3])]
    probes = [(p, more) for _, p in prompts for more in (torch.tensor([90, 91]), torch.tensor([80, 81, 82]))]
    batches = probe_batches(probes, batch_size=3, pad_token_id=0)
    assert batches[0]["input_ids"].tolist() == [[5, 6, 90, 91, 0], [5, 6, 80, 81, 82], [3, 90, 91, 0, 0]]
    assert batches[0]["irr_loss_mask"].tolist() == [[0, 0, 1, 1, 0], [0, 0, 1, 1, 1], [0, 1, 1, 0, 0]]
    assert batches[1]["attention_mask"].tolist() == [[1, 1, 1, 1]]


def test_drops_the_refused_rows_by_the_aligned_model_and_equals_the_run_without_them():
    """The rows whose prompt the base model answers with a refusal are dropped, judged by the aligned model (the
    fine-tuned one does not refuse them): the weights are bit for bit those of a run on the other rows only."""
    base, ft, _ = triple("llama")
    rows, safety = refused_calibration(base, refused=REFUSED)
    for i in REFUSED:  # the fine-tuned model does not refuse: a filter asking it would drop nothing
        refusal = safety[REFUSED.index(i)]["input_ids"][5:9]
        assert not torch.equal(greedy_continuation(ft, rows[i]["input_ids"][:5], 4), refusal)
    filtered = copy.deepcopy(ft)
    report = run(filtered, base, rows, safety, config())
    assert report.calibration_filter["dropped_rows"] == list(REFUSED)
    assert report.calibration_filter["judged"] == len(rows) and report.calibration_sequences == len(rows) - 2
    assert report.calibration_filter["second_pass_probes"] >= 2  # only rows whose first answer token opens a refusal
    expected = copy.deepcopy(ft)
    kept = [r for i, r in enumerate(rows) if i not in REFUSED]
    expected_report = run(expected, base, kept, safety, config(calibration_filter="none"))
    assert state(filtered).keys() == state(expected).keys()
    for (name, a), b in zip(state(filtered).items(), state(expected).values()):
        assert torch.equal(a, b), name
    assert report.calibration_tokens == expected_report.calibration_tokens
    assert "calibration filter dropped 2 of 8 rows" in report.setting_line()
    assert report.to_dict()["calibration_filter"]["dropped"] == 2


def test_auto_weight_holds_out_only_kept_rows():
    """With safety_weight='auto' the rows are dropped before the held-out split: the search is the search on the
    kept rows."""
    base, ft, _ = triple("llama")
    rows, safety = refused_calibration(base, n_rows=12, refused=(2, 9), safety_copies=4)
    filtered, expected = copy.deepcopy(ft), copy.deepcopy(ft)
    report = run(filtered, base, rows, safety, config(safety_weight="auto"))
    kept = [r for i, r in enumerate(rows) if i not in (2, 9)]
    reference = run(expected, base, kept, safety, config(safety_weight="auto", calibration_filter="none"))
    assert report.calibration_filter["dropped_rows"] == [2, 9]
    assert report.safety_weight == reference.safety_weight
    assert report.auto["candidates"] == reference.auto["candidates"]


def test_lora_reference_is_the_model_with_its_adapter_off():
    base, _, _ = triple("llama")
    rows, safety = refused_calibration(base, refused=REFUSED)
    lora = random_lora(base, scale=0.3)
    for i in REFUSED:  # with the adapter on, the model does not refuse
        refusal = safety[REFUSED.index(i)]["input_ids"][5:9]
        assert not torch.equal(greedy_continuation(lora, rows[i]["input_ids"][:5], 4), refusal)
    report = run(lora, None, rows, safety, config())
    assert report.calibration_filter["dropped_rows"] == list(REFUSED)


def test_offline_path_drops_the_same_rows_and_writes_the_same_weights(tmp_path):
    base, ft, _ = triple("llama")
    rows, safety = refused_calibration(base, refused=REFUSED)
    ft.save_pretrained(tmp_path / "ft")
    base.save_pretrained(tmp_path / "base")
    report = realign_checkpoint(
        str(tmp_path / "ft"), base=str(tmp_path / "base"), calibration=rows, safety_calibration=safety,
        output_dir=str(tmp_path / "out"), config=config(), progress=False,
    )  # fmt: skip
    expected = copy.deepcopy(ft)
    run(expected, base, rows, safety, config())
    assert report.calibration_filter["dropped_rows"] == list(REFUSED)
    written = SafetensorsMapping(str(tmp_path / "out"))
    for name, tensor in expected.state_dict().items():
        if name in written:
            torch.testing.assert_close(written[name], tensor, rtol=1e-5, atol=1e-6, msg=name)


def test_every_row_refused_is_an_error_before_anything_changes():
    base, ft, _ = triple("llama")
    rows, safety = refused_calibration(base, n_rows=2, refused=(0, 1))
    before = state(ft)
    with pytest.raises(CalibrationError, match="dropped all 2 calibration rows"):
        run(ft, base, rows, safety, config())
    assert all(torch.equal(a, b) for a, b in zip(before.values(), state(ft).values()))


def test_too_few_rows_left_for_auto_is_an_error_naming_the_filter():
    base, ft, _ = triple("llama")
    rows, safety = refused_calibration(base, n_rows=4, refused=(0, 1, 2), safety_copies=4)
    before = state(ft)
    with pytest.raises(CalibrationError, match="dropped 3 of 4 calibration rows.*calibration_filter='none'"):
        run(ft, base, rows, safety, config(safety_weight="auto"))
    assert all(torch.equal(a, b) for a, b in zip(before.values(), state(ft).values()))


def test_rows_without_labels_are_kept_with_a_warning(caplog):
    base, ft, _ = triple("llama")
    rows, safety = refused_calibration(base, refused=REFUSED)
    unlabelled = [{k: v for k, v in r.items() if k != "labels"} for r in rows]
    with caplog.at_level(logging.WARNING, logger="irr_callback"):
        report = run(ft, base, unlabelled, safety, config())
    assert report.calibration_filter["judged"] == 0 and report.calibration_sequences == len(rows)
    assert "judged no calibration row" in caplog.text


def test_config_names_the_field():
    with pytest.raises(IRRConfigError, match="calibration_filter"):
        IRRConfig(calibration_filter="harmful")
    with pytest.raises(IRRConfigError, match="calibration_filter.*safety_weight"):
        IRRConfig(calibration_filter="refused")  # the paper's IRR has no safety stream to read refusals from


def test_recommended_filters_unless_it_has_no_safety_stream():
    assert IRRConfig.recommended().calibration_filter == "refused"
    assert IRRConfig.recommended(safety_weight=0).calibration_filter == "none"  # no refusals to look for
    assert IRRConfig.recommended(calibration_filter="none").calibration_filter == "none"
    assert IRRConfig().calibration_filter == "none"  # the paper's IRR uses every row
