"""The safety stream through the layer loop: padding-free tokens, its aligned twin, the offline path,
`safety_weight="auto"` (data only, deterministic) and the checks before anything is written."""

import copy
import json
import math
import os

import pytest
import torch

from irr_callback import IRRConfig, IRRConfigError, realign, realign_checkpoint
from irr_callback.pipeline.calibration import CalibrationError
from irr_callback.tensors import SafetensorsMapping
from tests.helpers import VOCAB, calibration, random_lora, same_state, state, triple


def safety_rows(n: int = 8, prompt: int = 4, response: int = 5, seed: int = 11, pad_left: int = 0):
    """Harmful-prompt stand-ins with "safe responses": labels -100 on the prompt (and on padding)."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        ids = torch.randint(3, VOCAB, (prompt + response,), generator=g)
        labels = ids.clone()
        labels[:prompt] = -100
        mask = torch.ones_like(ids)
        if pad_left:
            ids = torch.cat([torch.zeros(pad_left, dtype=torch.long), ids])
            labels = torch.cat([torch.full((pad_left,), -100), labels])
            mask = torch.cat([torch.zeros(pad_left, dtype=torch.long), mask])
        rows.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
    return rows


def written_rows(report, cal, *streams, batch_size: int = 4):
    """The rows an auto run's written weights come from: every row, or (the smallest candidate kept as the run,
    `AUTO_KEEP_FIRST`) those not held out. `cal`: one batch dict; `streams`: (name, list of rows) pairs."""
    if not report.auto["kept_written_weights"]:
        return cal, *(rows for _, rows in streams)
    held = report.auto["held_out_batches"]

    def kept(count: int, name: str) -> int:
        return (math.ceil(count / batch_size) - held[name]) * batch_size

    n = kept(cal[0]["input_ids"].shape[0], "calibration")
    return [{k: v[:n] for k, v in cal[0].items()}], *(rows[: kept(len(rows), name)] for name, rows in streams)


def run(config, *, safety=None, cal=None, model=None, base=None):
    b, ft, _ = triple("llama")
    model = copy.deepcopy(model if model is not None else ft)
    report = realign(
        model,
        base=base if base is not None else b,
        calibration=cal if cal is not None else calibration(n=16, length=10),
        safety_calibration=safety if safety is not None else safety_rows(),
        config=config,
        progress=False,
    )
    return model, report


@pytest.mark.parametrize("term", ["aligned", "delta"])
def test_safety_stream_sees_padding_free_tokens_only(term):
    cfg = IRRConfig.recommended(safety_weight=0.5, safety_term=term, calibration_batch_size=4, safety_tokens="all")
    plain, report = run(cfg)
    padded, padded_report = run(cfg, safety=safety_rows(pad_left=3))  # the same rows, left-padded
    for (name, a), (_, b) in zip(plain.named_parameters(), padded.named_parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
    assert report.safety_tokens == padded_report.safety_tokens == 8 * 9
    response_only = IRRConfig.recommended(
        safety_weight=0.5, safety_term=term, safety_tokens="response", retain_weight=0.0
    )
    assert run(response_only)[1].safety_tokens == 8 * 5
    answer = IRRConfig.recommended(safety_weight=0.5, safety_term=term, safety_tokens="answer", retain_weight=0.0)
    assert run(answer)[1].safety_tokens == 8 * 5  # the last prompt token and the response but its last token


def test_answer_tokens_are_the_positions_that_predict_the_response():
    """safety_tokens='answer': position p is selected when token p + 1 is a response token (labels set), so the
    last prompt token, where greedy decoding opens the answer, is in and the last response token is out;
    padding (left or right) is never selected."""
    from irr_callback.pipeline.calibration import calibration_batches

    rows = [
        {"input_ids": [5, 6, 7, 8, 9], "labels": [-100, -100, -100, 8, 9]},
        {"input_ids": [0, 0, 5, 6, 7, 8], "attention_mask": [0, 0, 1, 1, 1, 1], "labels": [-100] * 4 + [7, 8]},
    ]
    masks = {
        which: calibration_batches(rows, max_samples=2, max_length=8, batch_size=2, token_selection=which)[0][
            "irr_token_mask"
        ].tolist()
        for which in ("response", "answer")
    }
    assert masks["response"] == [[0, 0, 0, 1, 1], [0, 0, 1, 1, 0]]
    assert masks["answer"] == [[0, 0, 1, 1, 0], [0, 1, 1, 0, 0]]
    weighted = calibration_batches(rows, max_samples=2, max_length=8, batch_size=2, answer_weight=3)[0]
    assert weighted["irr_token_mask"].tolist() == [[1, 1, 3, 3, 1], [1, 3, 3, 1, 0]]  # calibration_answer_weight
    response = calibration_batches(rows, max_samples=2, max_length=8, batch_size=2, answer_weight=3,
                                   token_selection="response")[0]  # fmt: skip
    assert response["irr_token_mask"].tolist() == [[0, 0, 3, 3, 1], [0, 3, 3, 1, 0]]  # the decision position too
    with pytest.raises(ValueError, match="answer_weight"):
        calibration_batches(rows, max_samples=2, max_length=8, batch_size=2, answer_weight=0)


def test_calibration_answer_weight_reweights_h_d_only():
    """calibration_answer_weight=k: the answer positions of the calibration rows count k times in H_d (the Hessian
    accumulator's integer weights, tests/core/test_hessian.py), so the solve moves; the rows and tokens used do not."""
    cal = safety_rows(n=16, seed=3)  # labelled rows: -100 on the prompt
    one, one_report = run(IRRConfig.recommended(safety_weight=0.5), cal=cal)
    three, three_report = run(IRRConfig.recommended(safety_weight=0.5, calibration_answer_weight=3), cal=cal)
    assert one_report.calibration_tokens == three_report.calibration_tokens == 16 * 9
    moved = max(float((a - b).abs().max()) for a, b in zip(one.parameters(), three.parameters()))
    assert moved > 1e-4
    with pytest.raises(IRRConfigError, match="calibration_answer_weight"):
        IRRConfig.recommended(calibration_answer_weight=0)


def test_zero_weight_ignores_the_safety_stream_and_is_the_paper():
    import irr_callback as irr

    base, ft, unaligned = triple("llama")
    v = irr.safety_vector(base, unaligned)
    paper, with_data = copy.deepcopy(ft), copy.deepcopy(ft)
    cal = calibration(n=16, length=10)
    realign(paper, base=base, safety_vector=v, calibration=cal, progress=False)
    report = realign(
        with_data, base=base, safety_vector=v, calibration=cal, safety_calibration=safety_rows(), progress=False
    )
    assert same_state(state(paper), state(with_data))
    assert report.setting == "irr" and report.safety_weight is None and report.safety_tokens == 0


@pytest.mark.parametrize("term", ["aligned", "delta"])
def test_larger_weight_trades_task_error_for_safety_error(term):
    """At layer 0 both streams' inputs do not depend on λ, so the regularised least squares trade off
    by construction: the safety term falls and the task term rises with λ."""
    safety, task = [], []
    for weight in (0.1, 1.0, 10.0):
        _, report = run(IRRConfig.recommended(safety_weight=weight, safety_term=term))
        first = [m for m in report.modules if m.layer == 0]
        safety.append(sum(m.error_safety for m in first))
        task.append(sum(m.error_recalibrated for m in first))
    assert safety == sorted(safety, reverse=True) and task == sorted(task)
    assert safety[0] > safety[-1] and task[0] < task[-1]


def test_auto_is_deterministic_and_reads_only_calibration_and_safety_data(monkeypatch):
    base, ft, _ = triple("llama")
    cal, safe = calibration(n=16, length=10), safety_rows()
    allowed = {tuple(row.tolist()) for row in cal[0]["input_ids"]} | {tuple(r["input_ids"].tolist()) for r in safe}
    seen = []
    original = type(ft).forward

    def spy(self, input_ids=None, **kwargs):
        seen.extend(tuple(row[row != 0].tolist()) for row in input_ids)  # padding dropped
        return original(self, input_ids=input_ids, **kwargs)

    monkeypatch.setattr(type(ft), "forward", spy)
    first, report = run(IRRConfig.recommended(), cal=cal, safety=safe)
    assert seen and all(any(row == a[: len(row)] for a in allowed) for row in seen)
    second, again = run(IRRConfig.recommended(), cal=cal, safety=safe)
    assert same_state(state(first), state(second))
    assert report.safety_weight == again.safety_weight and report.safety_weight in [
        c["safety_weight"] for c in report.auto["candidates"]
    ]
    assert report.auto["candidates"] == again.auto["candidates"]
    assert {"criterion", "reason", "chosen", "references", "seconds"} <= set(report.auto)
    assert report.setting == "recommended" and "chosen by safety_weight='auto'" in report.summary()
    assert report.auto["kept_written_weights"]  # the tiny triple's fine-tune leaves nothing to restore (gap < 0)
    written_cal, written_safe = written_rows(report, cal, ("safety", safe))
    fixed, _ = run(IRRConfig.recommended(safety_weight=report.safety_weight), cal=written_cal, safety=written_safe)
    assert same_state(state(first), state(fixed))  # auto = the fixed run at the λ it chose, on the rows it used


def measured(losses, accuracy=None):
    """{λ: (losses, accuracies)} as the search measures them; every token accuracy 1.0 unless given."""
    accuracy = accuracy or {}
    return {c: (tuple(v), tuple(accuracy.get(c, (1.0,) * len(v)))) for c, v in losses.items()}


def test_auto_chooses_the_smallest_weight_that_restores_the_safety_loss():
    from irr_callback.pipeline.auto_weight import choose_weight

    losses = {0.0: (0.1, 2.0), float("inf"): (4.0, 0.0), 0.1: (0.2, 0.5), 0.3: (0.4, 0.004), 1.0: (1.0, 0.001)}
    assert choose_weight(measured(losses))[0] == 0.3  # 0.004 / 2.0 = 0.002 <= 0.005; 0.1 leaves 25%
    undamaged = {**losses, 0.0: (0.1, 0.02)}  # the fine-tune did not hurt safety: the smallest λ
    assert choose_weight(measured(undamaged))[0] == 0.1
    hopeless = {0.0: (0.1, 2.0), float("inf"): (4.0, 0.0), 0.1: (0.2, 1.5), 0.3: (0.4, 1.0)}
    weight, table = choose_weight(measured(hopeless))
    assert weight == 0.3 and not table["passing"]


#: objective options on top of a safety term: the fine-tuned twins (task_term) and a pass per group (true_sequential)
OPTIONS = {"": {}, "fine-tuned task": {"task_term": "fine-tuned"}, "true sequential": {"true_sequential": True}}


@pytest.mark.parametrize("term,option", [("aligned", ""), ("delta", ""), ("aligned", "fine-tuned task"),
                                         ("aligned", "true sequential")])  # fmt: skip
def test_offline_equals_in_memory_with_the_safety_stream(tmp_path, term, option):
    base, ft, _ = triple("llama")
    ft.save_pretrained(tmp_path / "ft")
    base.save_pretrained(tmp_path / "base")
    cfg = IRRConfig.recommended(safety_weight=0.5, safety_term=term, **OPTIONS[option])
    cal = calibration(n=16, length=10)
    report = realign_checkpoint(
        str(tmp_path / "ft"),
        base=str(tmp_path / "base"),
        calibration=cal,
        safety_calibration=safety_rows(),
        output_dir=str(tmp_path / "out"),
        config=cfg,
        progress=False,
    )
    expected = copy.deepcopy(ft)
    expected_report = realign(expected, base=base, calibration=cal, safety_calibration=safety_rows(), config=cfg)
    written = SafetensorsMapping(str(tmp_path / "out"))
    for key, value in expected.state_dict().items():
        assert torch.equal(written[key], value), key
    assert report.safety_tokens == expected_report.safety_tokens > 0
    assert [m.error_safety for m in report.modules] == [m.error_safety for m in expected_report.modules]


@pytest.mark.parametrize(
    "term,tied,put_back", [("aligned", False, False), ("delta", True, False), ("aligned", False, True)]
)
def test_offline_auto_equals_in_memory_auto(tmp_path, monkeypatch, term, tied, put_back):
    """`safety_weight="auto"` on the offline path: the same search, one layer loaded at a time, the same λ and
    weights; the checkpoint's tensors outside the layers (a tied LM head too) are back on meta afterwards.
    `put_back`: no candidate passes, so the smallest one, written as the run, is discarded (its shards deleted)
    and the search goes on with trial passes; the output holds one realignment's shards only."""
    from irr_callback.pipeline import auto_weight

    if put_back:  # every candidate fails the safety test, and fine-tuning always counts as damage
        monkeypatch.setattr(auto_weight, "AUTO_TOLERANCE", -1.0)
        monkeypatch.setattr(auto_weight, "AUTO_MIN_GAP", -math.inf)

    base, ft, _ = triple("llama")
    if tied:  # an LM head tied to the embeddings: absent from the checkpoint, scored through the embeddings
        for model in (base, ft):
            model.config.tie_word_embeddings = True
            model.lm_head.weight = model.model.embed_tokens.weight
    ft.save_pretrained(tmp_path / "ft")
    cfg = IRRConfig.recommended(safety_term=term)
    cal = calibration(n=16, length=10)
    loaded = []
    original = auto_weight.held_out_losses

    def spy(model, layers, *args, load_layer=None, drop_layer=None, **kwargs):
        def load(index, layer):
            assert all(p.is_meta for p in layer.parameters())  # nothing but this layer is in memory
            assert not model.lm_head.weight.is_meta  # the head scores the candidates
            loaded.append(index)
            load_layer(index, layer)

        return original(model, layers, *args, load_layer=load, drop_layer=drop_layer, **kwargs)

    monkeypatch.setattr(auto_weight, "held_out_losses", spy)
    report = realign_checkpoint(
        str(tmp_path / "ft"),
        base={k: v.clone() for k, v in base.state_dict().items()},
        calibration=cal,
        safety_calibration=safety_rows(),
        output_dir=str(tmp_path / "out"),
        config=cfg,
        progress=False,
    )
    monkeypatch.setattr(auto_weight, "held_out_losses", original)
    expected = copy.deepcopy(ft)
    expected_report = realign(expected, base=base, calibration=cal, safety_calibration=safety_rows(), config=cfg)
    monkeypatch.undo()
    kept = report.auto["kept_written_weights"]
    assert kept == expected_report.auto["kept_written_weights"] == (not put_back)
    assert (loaded == []) if kept else (loaded[:2] == [0, 1] and len(loaded) in (2, 4))  # one pass per trial round
    files = {f for f in os.listdir(tmp_path / "out") if f.endswith(".safetensors")}
    with open(tmp_path / "out" / "model.safetensors.index.json") as fh:
        assert files == set(json.load(fh)["weight_map"].values())  # no shard of the discarded run is left
    assert report.safety_weight == expected_report.safety_weight and report.auto["passing"] is not None
    assert [c["safety_weight"] for c in report.auto["candidates"]] == [
        c["safety_weight"] for c in expected_report.auto["candidates"]
    ]
    for mine, theirs in zip(report.auto["candidates"], expected_report.auto["candidates"]):
        assert mine["safety_loss"] == pytest.approx(theirs["safety_loss"], rel=1e-5)
        assert mine["task_loss"] == pytest.approx(theirs["task_loss"], rel=1e-5)
    written = SafetensorsMapping(str(tmp_path / "out"))
    for key, value in expected.state_dict().items():
        if key in written or not tied:
            torch.testing.assert_close(written[key], value, rtol=1e-5, atol=1e-6, msg=key)
    assert ("lm_head.weight" in written) is not tied


@pytest.mark.parametrize(
    "value", [-1.0, float("nan"), float("inf"), "lots", True, [0.5]], ids=["neg", "nan", "inf", "word", "bool", "list"]
)
def test_bad_safety_weight_names_the_field(value):
    with pytest.raises(IRRConfigError, match="IRRConfig.safety_weight"):
        IRRConfig(safety_weight=value)


def test_config_fields_are_checked_and_parsed():
    assert IRRConfig(safety_weight="AUTO ").safety_weight == "auto"
    assert IRRConfig(safety_weight="0.25").safety_weight == 0.25
    with pytest.raises(IRRConfigError, match="safety_term"):
        IRRConfig(safety_term="both")
    with pytest.raises(IRRConfigError, match="safety_tokens"):
        IRRConfig(safety_tokens="labels")
    with pytest.raises(IRRConfigError, match="safety_ridge"):
        IRRConfig(safety_ridge=-0.1)
    with pytest.raises(IRRConfigError, match="IRRConfig.recalibrate"):
        IRRConfig(safety_weight=0.5, recalibrate=False)
    assert IRRConfig().setting_name == "irr" and IRRConfig.recommended().setting_name == "recommended"
    assert IRRConfig.recommended(safety_weight=0.3).setting_name == "safety-regularised"


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(safety=None), ValueError, "needs safety_calibration"),
        (dict(safety=[]), CalibrationError, "safety_calibration"),
        (dict(safety=[{"text": "no ids"}]), CalibrationError, "safety_calibration item #0 has no 'input_ids'"),
        (dict(safety=safety_rows(response=0)), CalibrationError, "no tokens of the 'response' tokens"),
    ],
    ids=["missing", "empty", "no-input-ids", "no-response-tokens"],
)
def test_bad_safety_data_is_named_before_anything_is_written(kwargs, error, match):
    base, ft, _ = triple("llama")
    before = state(ft)
    cfg = IRRConfig.recommended(safety_weight=0.5, safety_tokens="response")
    with pytest.raises(error, match=match):
        realign(ft, base=base, calibration=calibration(), safety_calibration=kwargs["safety"], config=cfg)
    assert same_state(before, state(ft))


def test_sign_mode_without_a_safety_vector_names_it():
    base, ft, _ = triple("llama")
    with pytest.raises(ValueError, match="no safety_vector was given"):
        realign(ft, base=base, calibration=calibration(), config=IRRConfig(safety_weight=0.5))


def test_auto_needs_two_batches_of_each_stream():
    with pytest.raises(ValueError, match="at least 2 × calibration_batch_size"):
        run(IRRConfig.recommended(calibration_batch_size=16), safety=safety_rows(n=8))


@pytest.mark.parametrize("term,option", [("aligned", ""), ("delta", ""), ("aligned", "fine-tuned task"),
                                         ("aligned", "true sequential")])  # fmt: skip
def test_lora_adapter_equals_its_merged_model(term, option):
    """A PeftModel is realigned like its merged dense model with the base as `base`: the aligned twin
    of a LoRA layer uses the frozen weight as it was before the layer's solve overwrote it; a fine-tuned twin runs
    the layer with its adapter on (before the solve switches it off); with a pass per group, the later passes run
    the earlier groups realigned (their adapters off)."""
    base, _, _ = triple("llama", layers=3)
    lora = random_lora(base)
    dense = copy.deepcopy(lora).merge_and_unload()
    cfg = IRRConfig.recommended(safety_weight=0.5, safety_term=term, **OPTIONS[option])
    realign(lora, calibration=calibration(n=16, length=10), safety_calibration=safety_rows(), config=cfg)
    realign(dense, base=base, calibration=calibration(n=16, length=10), safety_calibration=safety_rows(), config=cfg)
    merged = lora.merge_and_unload()
    for (name, a), (_, b) in zip(merged.named_parameters(), dense.named_parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize(
    "term", ["aligned", "delta", "aligned + retain", "aligned + fine-tuned task + retain", "aligned + true sequential"]
)
def test_lora_adapter_factors_solve_the_objective_the_solver_solved(term):
    """The adapter step rebuilds the group's objective from the layer's streams (H_d, H_s, C, H_A, W_A): at full
    rank its optimum is the solver's Δ′ exactly (same objective), at the trained rank it is the exact
    rank-constrained optimum (no mask) and costs a gap ≥ 0."""
    from irr_callback.pipeline.lowrank import AdapterFactors
    from irr_callback.targets import find_targets

    base, _, _ = triple("llama", layers=2)
    retain = term.endswith("retain")
    cfg = IRRConfig.recommended(
        safety_weight=0.5,
        safety_term=term.split()[0],
        retain_weight=0.7 if retain else 0.0,
        task_term="fine-tuned" if "fine-tuned" in term else "delta",
        true_sequential="sequential" in term,
    )
    extra = {"retain_calibration": calibration(n=16, length=10, seed=3)} if retain else {}
    found = {}
    for rank in (None, 10_000):
        lora = random_lora(base, target_modules=["q_proj", "down_proj"])
        factors = AdapterFactors(rank=rank)
        realign(lora, calibration=calibration(n=16, length=10), safety_calibration=safety_rows(), config=cfg,
                lowrank=factors, **extra)  # fmt: skip
        found[rank] = factors.factors
        if rank is not None:
            _, _, targets = find_targets(lora)
            aligned = dict(base.named_parameters())
            for t in targets:
                f = factors.factors[t.name]
                realigned = (
                    t.weight.detach() - aligned[t.name.replace("base_model.model.", "").replace(".base_layer", "")]
                )
                torch.testing.assert_close(f.b @ f.a, realigned, rtol=1e-3, atol=1e-5, msg=t.name)
                assert abs(f.relative_gap) < 1e-5
    assert found[None] and all(f.exact and f.rank == f.trained_rank == 4 for f in found[None].values())
    assert all(f.objective_gap >= -1e-6 for f in found[None].values())


def test_lora_put_back_candidate_leaves_the_adapter_factors_of_the_final_run(monkeypatch):
    """A LoRA run whose kept-first candidate is put back (nothing passes, by construction): the frozen weights and
    the adapters (B switched off by the candidate's writes) come back exactly, and the collected factors are the
    final run's only, equal to those of a fixed run at the chosen λ."""
    from irr_callback.pipeline import auto_weight
    from irr_callback.pipeline.lowrank import AdapterFactors

    base, _, _ = triple("llama", layers=2)
    cal = calibration(n=16, length=10)

    def lora_run(config):
        lora = random_lora(base, target_modules=["q_proj", "down_proj"])
        factors = AdapterFactors()
        report = realign(lora, calibration=cal, safety_calibration=safety_rows(), config=config, lowrank=factors)
        return lora, factors.factors, report

    monkeypatch.setattr(auto_weight, "AUTO_TOLERANCE", -1.0)
    monkeypatch.setattr(auto_weight, "AUTO_MIN_GAP", -math.inf)
    auto_model, auto_factors, report = lora_run(IRRConfig.recommended())
    monkeypatch.undo()
    assert not report.auto["kept_written_weights"] and len(report.auto["candidates"]) > 1
    fixed_model, fixed_factors, _ = lora_run(IRRConfig.recommended(safety_weight=report.safety_weight))
    assert same_state(state(auto_model), state(fixed_model))
    assert auto_factors.keys() == fixed_factors.keys() and auto_factors
    for name, f in fixed_factors.items():
        assert torch.equal(auto_factors[name].b, f.b) and torch.equal(auto_factors[name].a, f.a), name
