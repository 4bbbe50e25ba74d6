"""The retain stream (general prompts with answers, ρ‖(Δ′ − Δ)X_r‖²) through `realign`, the offline path and
`safety_weight="auto"`, and the auto rule's choice among candidates (three losses, never a dominated one)."""

import copy
import logging
import math

import pytest
import torch

from irr_callback import IRRConfig, realign, realign_checkpoint
from irr_callback.tensors import SafetensorsMapping
from tests.helpers import calibration, same_state, state, triple

from .test_safety_stream import measured, safety_rows, written_rows


def retain_rows(n: int = 8, seed: int = 23):
    return safety_rows(n=n, prompt=5, response=6, seed=seed)


def run(config, *, retain=None, safety=True, cal=None, vector=None, safety_rows=safety_rows, model=None):
    """Realign a copy of the triple's fine-tuned model (`model`: that one, in place)."""
    base, ft, _ = triple("llama")
    model = model if model is not None else copy.deepcopy(ft)
    report = realign(
        model,
        base=base,
        safety_vector=vector,
        calibration=cal if cal is not None else calibration(n=16, length=10),
        safety_calibration=(safety_rows() if callable(safety_rows) else safety_rows) if safety else None,
        retain_calibration=retain,
        config=config,
        progress=False,
    )
    return model, report


def test_recommended_preset_turns_the_retain_term_on_with_its_own_objective():
    """The preset (issue 19, seventh round): ρ = 0.3 with the safety stream's answer positions and ridge 0.01; without
    the retain term, every safety token and ridge 0.1 (the fields' defaults, the earlier preset); a field the user
    gives wins over what the preset derives from ρ."""
    from irr_callback.config import NO_RETAIN_OBJECTIVE, RECOMMENDED_RETAIN_OBJECTIVE, RECOMMENDED_RETAIN_WEIGHT

    preset = IRRConfig.recommended()
    assert preset.retain_weight == RECOMMENDED_RETAIN_WEIGHT == 0.3 and preset.uses_retain_stream
    assert (
        (preset.safety_tokens, preset.safety_ridge) == ("answer", 0.01) == tuple(RECOMMENDED_RETAIN_OBJECTIVE.values())
    )
    assert preset.setting_name == "recommended"
    off = IRRConfig.recommended(retain_weight=0)
    assert (off.safety_tokens, off.safety_ridge) == tuple(NO_RETAIN_OBJECTIVE.values())
    assert NO_RETAIN_OBJECTIVE == {k: getattr(IRRConfig(), k) for k in NO_RETAIN_OBJECTIVE}  # the fields' defaults
    assert IRRConfig.recommended(retain_weight=1.0).safety_tokens == "answer"
    mine = IRRConfig.recommended(safety_ridge=1.0, retain_weight=0, safety_tokens="response")
    assert (mine.safety_ridge, mine.safety_tokens) == (1.0, "response")
    assert IRRConfig.recommended(safety_tokens="all").safety_ridge == 0.01  # only the field given is taken


@pytest.mark.parametrize(
    "config", [IRRConfig(), IRRConfig.recommended(safety_weight=0.5, retain_weight=0.0)], ids=["paper", "fixed"]
)
def test_zero_retain_weight_ignores_the_retain_data_bit_for_bit(config):
    vector = None
    if config.needs_safety_vector:
        import irr_callback as irr

        base, _, unaligned = triple("llama")
        vector = irr.safety_vector(base, unaligned)
    without, report = run(config, vector=vector)
    with_data, with_report = run(config, retain=retain_rows(), vector=vector)
    assert same_state(state(without), state(with_data))
    assert with_report.retain_tokens == 0 and with_report.totals["error_retain"] is None


def test_retain_weight_without_retain_data_warns_and_runs_with_the_term_off(caplog):
    """A config with a retain weight: a call without retain data stays valid (the term is off, the report says
    retain_weight 0, a warning says why) and is bit for bit the run with ρ = 0; the preset's objective for the
    retain term (answer tokens, ridge 0.01) becomes the preset's without it (every token, ridge 0.1)."""
    with caplog.at_level(logging.WARNING, logger="irr_callback"):
        off, report = run(IRRConfig.recommended(safety_weight=0.5, retain_weight=0.3))
    assert report.config["retain_weight"] == 0.0
    assert report.config["safety_tokens"] == "all" and report.config["safety_ridge"] == 0.1
    assert any("no retain_calibration" in r.getMessage() and "ridge" in r.getMessage() for r in caplog.records)
    zero, _ = run(IRRConfig.recommended(safety_weight=0.5, retain_weight=0.0))
    assert same_state(state(off), state(zero))
    # an objective the user chose is kept (only the term goes)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="irr_callback"):
        own, report = run(IRRConfig.recommended(safety_weight=0.5, retain_weight=0.3, safety_ridge=1.0))
    assert report.config["retain_weight"] == 0.0 and report.config["safety_tokens"] == "answer"
    assert report.config["safety_ridge"] == 1.0
    assert not any("ridge" in r.getMessage() for r in caplog.records if "no retain_calibration" in r.getMessage())


@pytest.mark.parametrize("safety_weight", [0.0, 0.5])
def test_larger_retain_weight_keeps_the_layer_closer_on_retain_tokens(safety_weight):
    """At layer 0 no stream's inputs depend on ρ, so by construction the retain term falls as ρ grows."""
    errors = []
    for rho in (0.1, 1.0, 10.0):
        mode = "sign" if not safety_weight else "none"
        cfg = IRRConfig(identify_mode=mode, safety_weight=safety_weight, retain_weight=rho)
        vector = None
        if not safety_weight:
            import irr_callback as irr

            base, _, unaligned = triple("llama")
            vector = irr.safety_vector(base, unaligned)
        _, report = run(cfg, retain=retain_rows(), safety=bool(safety_weight), vector=vector)
        assert report.retain_tokens == 8 * 11 and report.retain_sequences == 8
        errors.append(sum(m.error_retain for m in report.modules if m.layer == 0))
    assert errors == sorted(errors, reverse=True) and errors[-1] < errors[0]


def test_offline_equals_in_memory_with_the_retain_stream(tmp_path):
    base, ft, _ = triple("llama")
    ft.save_pretrained(tmp_path / "ft")
    base.save_pretrained(tmp_path / "base")
    cfg = IRRConfig.recommended(retain_weight=1.0, calibration_batch_size=4)
    cal = calibration(n=16, length=10)
    report = realign_checkpoint(
        str(tmp_path / "ft"),
        base=str(tmp_path / "base"),
        calibration=cal,
        safety_calibration=safety_rows(),
        retain_calibration=retain_rows(),
        output_dir=str(tmp_path / "out"),
        config=cfg,
        progress=False,
    )
    expected = copy.deepcopy(ft)
    expected_report = realign(
        expected, base=base, calibration=cal, safety_calibration=safety_rows(), retain_calibration=retain_rows(),
        config=cfg, progress=False,
    )  # fmt: skip
    assert report.safety_weight == expected_report.safety_weight
    written = SafetensorsMapping(str(tmp_path / "out"))
    for key, value in expected.state_dict().items():
        torch.testing.assert_close(written[key], value, rtol=1e-5, atol=1e-6, msg=key)
    assert report.retain_tokens == expected_report.retain_tokens > 0


def test_smallest_first_measures_a_candidate_as_the_whole_grid_does(monkeypatch):
    """A candidate's held-out measures do not depend on which candidates share its pass: the search that runs the
    smallest first gives the full grid's measures for every candidate it runs, the same λ and the same weights
    (trial candidates throughout: `AUTO_KEEP_FIRST` off)."""
    from irr_callback.pipeline import auto_weight

    monkeypatch.setattr(auto_weight, "AUTO_KEEP_FIRST", False)
    cfg = IRRConfig.recommended()
    lazy_model, lazy = run(cfg, retain=retain_rows())
    monkeypatch.setattr(auto_weight, "AUTO_SMALLEST_FIRST", False)
    full_model, full = run(cfg, retain=retain_rows())
    assert lazy.safety_weight == full.safety_weight and same_state(state(lazy_model), state(full_model))
    by_weight = {r["safety_weight"]: r for r in full.auto["candidates"]}
    for row in lazy.auto["candidates"]:
        assert row == {**by_weight[row["safety_weight"]], "dominated": row["dominated"]}
    assert lazy.auto["references"] == full.auto["references"]


def test_auto_with_retain_records_three_losses_and_equals_the_fixed_run():
    cfg = IRRConfig.recommended(retain_weight=1.0)
    first, report = run(cfg, retain=retain_rows())
    rows = report.auto["candidates"]
    assert all(r["retain_loss"] is not None and "dominated" in r for r in rows)
    assert "retain_loss" in report.auto["references"]["finetuned"]
    assert report.auto["held_out_batches"]["retain"] >= 1
    cal, safe, retain = written_rows(
        report, calibration(n=16, length=10), ("safety", safety_rows()), ("retain", retain_rows())
    )
    fixed, _ = run(IRRConfig.recommended(retain_weight=1.0, safety_weight=report.safety_weight), retain=retain, cal=cal,
                   safety_rows=safe)  # fmt: skip
    assert same_state(state(first), state(fixed))  # auto = the fixed run at the λ it chose, on the rows it used


def test_kept_first_candidate_is_judged_as_a_trial_on_the_same_rows(monkeypatch):
    """`AUTO_KEEP_FIRST`: the smallest candidate is the run itself, judged by held-out copies riding along. Its
    measures and the references' are those a trial pass gives when its Hessians come from the same rows (every row
    not held out), so the rule sees the same numbers either way; only the second realignment is saved."""
    from irr_callback.pipeline import auto_weight

    cfg = IRRConfig.recommended()
    kept_model, kept = run(cfg, retain=retain_rows())
    assert kept.auto["kept_written_weights"] and [c["safety_weight"] for c in kept.auto["candidates"]] == [0.1]
    assert len({m.name for m in kept.modules}) == len(kept.modules)  # one realignment's statistics
    monkeypatch.setattr(auto_weight, "AUTO_KEEP_FIRST", False)
    for stream in auto_weight.AUTO_SHARES:  # every row not held out feeds the trial's Hessians
        monkeypatch.setitem(auto_weight.AUTO_SHARES, stream, 1.0)
    trial_model, trial = run(cfg, retain=retain_rows())
    assert not trial.auto["kept_written_weights"] and trial.safety_weight == kept.safety_weight
    for mine, theirs in zip(kept.auto["candidates"], trial.auto["candidates"]):
        assert mine.keys() == theirs.keys()
        for key, value in theirs.items():
            assert mine[key] == (pytest.approx(value, rel=1e-5, abs=1e-7) if isinstance(value, float) else value), key
    for which, values in trial.auto["references"].items():
        assert kept.auto["references"][which] == pytest.approx(values, rel=1e-5, abs=1e-7), which
    assert not same_state(state(kept_model), state(trial_model))  # the trial's run re-solved from every row


@pytest.mark.parametrize("backup", ["cpu", "disk"])
def test_a_kept_first_candidate_that_is_not_chosen_is_put_back(monkeypatch, backup):
    """When the smallest candidate, written as the run, is not chosen, the fine-tuned weights are put back exactly
    before the trial passes: the result is the fixed run at the chosen λ from every row, with one realignment's
    statistics in the report, and a failure after that still restores the fine-tuned model."""
    from irr_callback.pipeline import auto_weight

    monkeypatch.setattr(auto_weight, "AUTO_TOLERANCE", -1.0)  # nothing passes
    monkeypatch.setattr(auto_weight, "AUTO_MIN_GAP", -math.inf)  # and fine-tuning always left damage
    cfg = IRRConfig.recommended(backup=backup)
    model, report = run(cfg, retain=retain_rows())
    assert not report.auto["kept_written_weights"] and len(report.auto["candidates"]) > 1
    assert len({m.name for m in report.modules}) == len(report.modules)  # the put-back run's are gone
    fixed, _ = run(IRRConfig.recommended(safety_weight=report.safety_weight), retain=retain_rows())
    assert same_state(state(model), state(fixed))

    from irr_callback.pipeline import in_memory

    calls = []
    original = in_memory.run_layers

    def fail_on_the_final_run(*args, **kwargs):
        calls.append(kwargs.get("rider"))
        if len(calls) == 2:
            raise RuntimeError("boom")
        return original(*args, **kwargs)

    monkeypatch.setattr(in_memory, "run_layers", fail_on_the_final_run)
    _, ft, _ = triple("llama")
    with pytest.raises(RuntimeError, match="boom"):
        run(cfg, retain=retain_rows(), model=ft)
    assert calls[0] is not None and calls[1] is None  # the kept candidate's run, then the final one
    assert same_state(state(ft), state(triple("llama")[1]))  # nothing of either run is left


# ------------------------------------------------------------------------------------ the rule itself
def normalised(candidates: dict[float, tuple[float, ...]], retain: tuple[float, float] | None = None, accuracy=None):
    """Measures whose references make s = the safety loss and d = the task loss (F: (0, 1), A: (1, 0)),
    every token accuracy 1.0 unless `accuracy` ({λ: (task, safety[, retain])}) says otherwise."""
    refs = {0.0: (0.0, 1.0), math.inf: (1.0, 0.0)}
    if retain is not None:
        refs = {0.0: (0.0, 1.0, retain[0]), math.inf: (1.0, 0.0, retain[1])}
    return measured({**refs, **candidates}, accuracy)


def test_issue_23_never_a_dominated_candidate_and_a_warning(caplog):
    """Issue 23 point 4: no candidate passes; λ = 3 is worse than 0.3 on both losses and must not be chosen."""
    from irr_callback.pipeline.auto_weight import choose_weight, search_weight

    numbers = {0.1: (0.008, 0.207), 0.3: (0.025, 0.170), 1.0: (0.104, 0.213), 3.0: (0.367, 0.262)}
    with caplog.at_level(logging.WARNING, logger="irr_callback"):
        weight, table = choose_weight(normalised(numbers))
    assert weight == 0.3 and not table["passing"]
    assert {r["safety_weight"] for r in table["candidates"] if r["dominated"]} == {1.0, 3.0}
    assert [r["safety_left"] for r in table["candidates"]] == pytest.approx([0.207, 0.170, 0.213, 0.262])
    warned = [r for r in caplog.records if r.levelno == logging.WARNING and "no candidate" in r.getMessage()]
    assert len(warned) == 1 and "λ=0.3" in warned[0].getMessage()

    asked = []

    def run_candidates(candidates, references):  # the search as it ran in the issue: coarse, then 3
        asked.append(tuple(candidates))
        return (
            normalised({c: numbers[c] for c in candidates})
            if references
            else measured({c: numbers[c] for c in candidates})
        )

    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="irr_callback"):
        weight, table = search_weight(run_candidates)
    assert asked == [(0.1,), (0.3, 1.0), (3.0,)] and weight == 0.3  # the smallest first: it did not pass
    assert sum("no candidate" in r.getMessage() for r in caplog.records if r.levelno == logging.WARNING) == 1


@pytest.mark.parametrize("smallest_first", [True, False])
def test_search_runs_the_smallest_candidate_first_and_stops_when_it_passes(monkeypatch, smallest_first):
    """AUTO_SMALLEST_FIRST: the smallest candidate runs first with the references; when it passes (or fine-tuning
    left nothing to restore) the rest of the grid is not run, and λ is the one the whole grid gives."""
    from irr_callback.pipeline import auto_weight

    monkeypatch.setattr(auto_weight, "AUTO_SMALLEST_FIRST", smallest_first)
    cases = {
        "passes": {0.1: (0.01, 0.001), 0.3: (0.02, 0.0), 1.0: (0.05, 0.0)},
        "nothing to restore": {0.1: (0.01, 0.001), 0.3: (0.02, 0.0), 1.0: (0.05, 0.0)},
        "fails": {0.1: (0.01, 0.30), 0.3: (0.02, 0.003), 1.0: (0.05, 0.0), 0.2: (0.015, 0.004)},
    }
    for name, numbers in cases.items():
        asked = []
        refs = ((0.0, 0.02), (0.5, 0.0)) if name == "nothing to restore" else ((0.0, 1.0), (0.5, 0.0))

        def run_candidates(candidates, references, numbers=numbers, refs=refs, asked=asked):
            asked.append(tuple(candidates))
            picked = {c: numbers[c] for c in candidates}
            return measured({0.0: refs[0], math.inf: refs[1], **picked} if references else picked)

        weight, table = auto_weight.search_weight(run_candidates)
        full = auto_weight.choose_weight(measured({0.0: refs[0], math.inf: refs[1], **numbers}), warn=False)[0]
        assert weight == full, name
        if name == "fails":
            assert weight == 0.2 and asked[-1] == (0.2,)  # the midpoint below 0.3, as without the shortcut
        else:
            assert weight == 0.1
            assert asked == ([(0.1,)] if smallest_first else [(0.1, 0.3, 1.0)]), name
            assert [r["safety_weight"] for r in table["candidates"]] == ([0.1] if smallest_first else [0.1, 0.3, 1.0])


def test_passing_chooses_the_smallest_undominated_weight():
    from irr_callback.pipeline.auto_weight import choose_weight

    # 0.3 passes but 1 beats it on both losses (noise): the smallest undominated passing λ is 1
    weight, table = choose_weight(normalised({0.1: (0.1, 0.3), 0.3: (0.3, 0.005), 1.0: (0.2, 0.001)}))
    assert weight == 1.0 and table["passing"]


def test_retain_tolerance_stops_over_restoring(caplog):
    """λ = 1 restores the safety loss but loses retain token accuracy that both references keep: 0.3 is
    taken, with a warning. The retain loss alone does not count (near zero at both references, it can
    double while greedy answers stay the same)."""
    from irr_callback.pipeline.auto_weight import AUTO_RETAIN_TOLERANCE, choose_weight

    cands = {0.1: (0.01, 0.30, 0.02), 0.3: (0.02, 0.05, 0.04), 1.0: (0.05, 0.001, 0.08)}
    floor = 0.9  # retain accuracy of F (A: 0.95): the candidates' accuracies below it
    acc = {
        0.0: (1.0, 0.8, floor),
        math.inf: (0.5, 1.0, 0.95),
        0.1: (1.0, 0.9, floor),
        0.3: (1.0, 0.95, floor - AUTO_RETAIN_TOLERANCE / 2),
        1.0: (0.99, 1.0, floor - 4 * AUTO_RETAIN_TOLERANCE),
    }
    with caplog.at_level(logging.WARNING, logger="irr_callback"):
        weight, table = choose_weight(normalised(cands, retain=(0.01, 0.001), accuracy=acc))
    assert weight == 0.3 and not table["passing"]
    assert table["candidates"][2]["retain_accuracy_lost"] == pytest.approx(4 * AUTO_RETAIN_TOLERANCE)
    assert (
        table["candidates"][2]["retain_loss"] == 0.08 and table["references"]["finetuned"]["retain_accuracy"] == floor
    )
    assert any("no candidate" in r.getMessage() for r in caplog.records)
    within = {**acc, 1.0: (0.99, 1.0, floor - AUTO_RETAIN_TOLERANCE / 2)}
    assert choose_weight(normalised(cands, retain=(0.01, 0.001), accuracy=within))[0] == 1.0  # old abilities kept


def test_task_tolerance_keeps_the_task_when_safety_needs_more(caplog):
    """λ = 1 restores the safety loss but loses more task token accuracy than `AUTO_TASK_TOLERANCE`: the rule
    keeps the task (λ = 0.3, the least safety damage within the tolerances) and warns; within it, 1 is taken."""
    from irr_callback.pipeline.auto_weight import AUTO_TASK_TOLERANCE, choose_weight, search_weight

    cands = {0.1: (0.01, 0.30), 0.3: (0.02, 0.05), 1.0: (0.3, 0.001), 3.0: (0.5, 0.0)}
    acc = {0.0: (0.98, 0.8), 0.1: (0.98, 0.9), 0.3: (0.95, 0.95), 1.0: (0.97 - AUTO_TASK_TOLERANCE, 1.0)}
    acc[3.0] = (0.5, 1.0)
    with caplog.at_level(logging.WARNING, logger="irr_callback"):
        weight, table = choose_weight(normalised(cands, accuracy=acc))
    assert weight == 0.3 and not table["passing"]
    assert table["candidates"][2]["task_accuracy_lost"] == pytest.approx(AUTO_TASK_TOLERANCE + 0.01)
    assert any("no candidate" in r.getMessage() for r in caplog.records)
    asked = []

    def run_candidates(candidates, references):
        asked.append(tuple(candidates))
        picked = {c: cands[c] for c in candidates}
        return normalised(picked, accuracy=acc) if references else measured(picked, acc)

    assert search_weight(run_candidates)[0] == 0.3
    assert asked == [(0.1,), (0.3, 1.0)]  # no fallback to 3: λ = 1 already lost too much of the task
    kept = {**acc, 1.0: (0.98 - AUTO_TASK_TOLERANCE / 2, 1.0)}
    assert choose_weight(normalised(cands, accuracy=kept))[0] == 1.0


def test_held_out_losses_through_the_scored_positions_only_equal_the_full_logits(monkeypatch):
    """`logits_to_keep` sends only the positions that predict a scored token through the LM head: the same
    held-out losses (float tolerance) as the full logits, so the same λ."""
    from irr_callback.pipeline import head

    cfg = IRRConfig.recommended(retain_weight=1.0)
    _, selected = run(cfg, retain=retain_rows())
    monkeypatch.setattr(head, "accepts_argument", lambda model, name: False)
    _, full = run(cfg, retain=retain_rows())
    assert selected.safety_weight == full.safety_weight
    for mine, theirs in zip(selected.auto["candidates"], full.auto["candidates"]):
        for key in ("task_loss", "safety_loss", "retain_loss", "task_accuracy", "retain_accuracy"):
            assert mine[key] == pytest.approx(theirs[key], rel=1e-5), key


@pytest.mark.parametrize("keep_positions", [True, False])
def test_held_out_scores_are_the_plain_forward_loss_and_token_accuracy(monkeypatch, keep_positions):
    """`_scores` (what the rule reads) from a stream's recorded last-layer output equals the model's own forward:
    the mean next-token loss, the share of scored tokens that are the argmax and the share of rows whose every
    scored token is (with and without `logits_to_keep`)."""
    from types import SimpleNamespace

    from irr_callback.pipeline import auto_weight, head

    if not keep_positions:
        monkeypatch.setattr(head, "accepts_argument", lambda model, name: False)
    _, model, _ = triple("llama")
    model.eval()
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(3, 60, (3, 9), generator=g)
    with torch.no_grad():  # rows 0-1 answer greedily (every scored token the argmax), row 2 at random
        for t in range(4, 9):
            ids[:2, t] = model(input_ids=ids[:2, :t]).logits[:, -1].argmax(-1)
    attention = torch.ones_like(ids)
    scored = torch.zeros_like(ids)
    scored[:, 4:] = 1  # the response tokens
    scored[2, 7:] = 0
    captured = []
    hook = model.model.layers[-1].register_forward_hook(
        lambda module, args, out: captured.append(out[0] if isinstance(out, tuple) else out)
    )
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=attention).logits
    hook.remove()
    stream = SimpleNamespace(
        hidden=[captured[0]], batches=[{"input_ids": ids, "attention_mask": attention, "irr_loss_mask": scored}]
    )
    with torch.no_grad():
        nll, accuracy, exact = auto_weight._scores(model, model.model.layers, stream, SimpleNamespace(kind="single"))
    where = scored[:, 1:].bool()
    picked, wanted = logits[:, :-1][where], ids[:, 1:][where]
    assert nll == pytest.approx(float(torch.nn.functional.cross_entropy(picked, wanted)), rel=1e-5)
    assert accuracy == pytest.approx(float((picked.argmax(-1) == wanted).float().mean()))
    assert 0.6 < accuracy < 1  # 10 of the 13 scored tokens are greedy by construction, row 2's mostly not
    hits = (logits[:, :-1].argmax(-1) == ids[:, 1:]) | ~where
    assert exact == pytest.approx(float(hits.all(dim=1).float().mean()))
    assert exact == pytest.approx(2 / 3)  # rows 0-1 answer greedily; row 2 holds the misses (accuracy < 1)


def test_task_answers_tolerance_counts_whole_answers_not_tokens(caplog):
    """λ = 1 restores the safety loss and loses little task *token* accuracy, but the held-out task rows whose
    greedy answer is exact fall by more than `AUTO_TASK_EXACT_TOLERANCE` of the fine-tuned model's: a token lost
    in each of many answers. The rule keeps the task (λ = 0.3) and warns; within the tolerance, 1 is taken."""
    from irr_callback.pipeline.auto_weight import AUTO_TASK_EXACT_TOLERANCE, AUTO_TASK_TOLERANCE, choose_weight

    cands = {0.1: (0.01, 0.30), 0.3: (0.02, 0.05), 1.0: (0.05, 0.001)}
    base = normalised(cands)
    exact = {0.0: (1.0, 0.0), math.inf: (0.4, 1.0), 0.1: (1.0, 0.5), 0.3: (0.95, 0.8)}
    lost = 1.0 - (AUTO_TASK_EXACT_TOLERANCE + 0.05)  # share of F's exact rows left at λ = 1
    assert AUTO_TASK_TOLERANCE > 0.05  # the token accuracies alone (1.0 everywhere) would let λ = 1 pass

    def with_exact(at_one):
        return {c: (*base[c], {**exact, 1.0: (at_one, 1.0)}[c]) for c in base}

    with caplog.at_level(logging.WARNING, logger="irr_callback"):
        weight, table = choose_weight(with_exact(lost))
    assert weight == 0.3 and not table["passing"]
    assert table["candidates"][2]["task_exact_lost"] == pytest.approx(AUTO_TASK_EXACT_TOLERANCE + 0.05)
    assert table["candidates"][2]["task_accuracy_lost"] == 0.0
    assert table["references"]["finetuned"]["task_exact"] == 1.0
    assert any("task answers lost" in r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    assert choose_weight(with_exact(1.0 - AUTO_TASK_EXACT_TOLERANCE / 2))[0] == 1.0
    assert choose_weight(base)[0] == 1.0  # measures without exact matches (older recordings): not tested
