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

from .test_safety_stream import safety_rows


def retain_rows(n: int = 8, seed: int = 23):
    return safety_rows(n=n, prompt=5, response=6, seed=seed)


def run(config, *, retain=None, safety=True, cal=None, vector=None):
    base, ft, _ = triple("llama")
    model = copy.deepcopy(ft)
    report = realign(
        model,
        base=base,
        safety_vector=vector,
        calibration=cal if cal is not None else calibration(n=16, length=10),
        safety_calibration=safety_rows() if safety else None,
        retain_calibration=retain,
        config=config,
        progress=False,
    )
    return model, report


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
    """`IRRConfig.recommended()` has a retain weight: a call without retain data stays valid (the term is off,
    the report says retain_weight 0, a warning says why) and is bit for bit the run with ρ = 0."""
    with caplog.at_level(logging.WARNING, logger="irr_callback"):
        off, report = run(IRRConfig.recommended(safety_weight=0.5))
    assert IRRConfig.recommended().retain_weight > 0 and report.config["retain_weight"] == 0.0
    assert any("no retain_calibration" in r.getMessage() for r in caplog.records)
    zero, _ = run(IRRConfig.recommended(safety_weight=0.5, retain_weight=0.0))
    assert same_state(state(off), state(zero))


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


def test_auto_with_retain_records_three_losses_and_equals_the_fixed_run():
    cfg = IRRConfig.recommended(retain_weight=1.0)
    first, report = run(cfg, retain=retain_rows())
    rows = report.auto["candidates"]
    assert all(r["retain_loss"] is not None and "dominated" in r for r in rows)
    assert "retain_loss" in report.auto["references"]["finetuned"]
    assert report.auto["held_out_batches"]["retain"] >= 1
    fixed, _ = run(IRRConfig.recommended(retain_weight=1.0, safety_weight=report.safety_weight), retain=retain_rows())
    assert same_state(state(first), state(fixed))  # auto = the fixed run at the λ it chose


# ------------------------------------------------------------------------------------ the rule itself
def normalised(candidates: dict[float, tuple[float, ...]], retain: tuple[float, float] | None = None):
    """Losses whose references make s = the safety loss and d = the task loss (F: (0, 1), A: (1, 0))."""
    refs = {0.0: (0.0, 1.0), math.inf: (1.0, 0.0)}
    if retain is not None:
        refs = {0.0: (0.0, 1.0, retain[0]), math.inf: (1.0, 0.0, retain[1])}
    return {**refs, **candidates}


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
        return normalised({c: numbers[c] for c in candidates}) if references else {c: numbers[c] for c in candidates}

    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="irr_callback"):
        weight, table = search_weight(run_candidates)
    assert asked == [(0.1, 0.3, 1.0), (3.0,)] and weight == 0.3
    assert sum("no candidate" in r.getMessage() for r in caplog.records if r.levelno == logging.WARNING) == 1


def test_passing_chooses_the_smallest_undominated_weight():
    from irr_callback.pipeline.auto_weight import choose_weight

    # 0.3 passes but 1 beats it on both losses (noise): the smallest undominated passing λ is 1
    weight, table = choose_weight(normalised({0.1: (0.1, 0.3), 0.3: (0.3, 0.005), 1.0: (0.2, 0.001)}))
    assert weight == 1.0 and table["passing"]


def test_retain_tolerance_stops_over_restoring(caplog):
    """λ = 1 restores the safety loss but loses old abilities neither reference lost: 0.3 is taken, with a warning."""
    from irr_callback.pipeline.auto_weight import AUTO_RETAIN_TOLERANCE, choose_weight

    ref = 2.0  # retain loss of F (A: 1.9): the candidates' retain losses relative to 2.0
    cands = {
        0.1: (0.01, 0.30, ref * 1.001),
        0.3: (0.02, 0.05, ref * (1 + AUTO_RETAIN_TOLERANCE / 2)),
        1.0: (0.05, 0.001, ref * (1 + 4 * AUTO_RETAIN_TOLERANCE)),
    }
    with caplog.at_level(logging.WARNING, logger="irr_callback"):
        weight, table = choose_weight(normalised(cands, retain=(ref, 1.9)))
    assert weight == 0.3 and not table["passing"]
    assert table["candidates"][2]["retain_lost"] == pytest.approx(4 * AUTO_RETAIN_TOLERANCE)
    assert any("no candidate" in r.getMessage() for r in caplog.records)
    within = {**cands, 1.0: (0.05, 0.001, ref * (1 + AUTO_RETAIN_TOLERANCE / 2))}
    assert choose_weight(normalised(within, retain=(ref, 1.9)))[0] == 1.0  # passes once old abilities are kept


def test_held_out_losses_through_the_scored_positions_only_equal_the_full_logits(monkeypatch):
    """`logits_to_keep` sends only the positions that predict a scored token through the LM head: the same
    held-out losses (float tolerance) as the full logits, so the same λ."""
    from irr_callback.pipeline import auto_weight

    cfg = IRRConfig.recommended(retain_weight=1.0)
    _, selected = run(cfg, retain=retain_rows())
    monkeypatch.setattr(auto_weight, "accepts_argument", lambda model, name: False)
    _, full = run(cfg, retain=retain_rows())
    assert selected.safety_weight == full.safety_weight
    for mine, theirs in zip(selected.auto["candidates"], full.auto["candidates"]):
        for key in ("task_loss", "safety_loss", "retain_loss"):
            assert mine[key] == pytest.approx(theirs[key], rel=1e-5), key
