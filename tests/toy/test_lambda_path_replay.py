"""`benchmarks/suite_lambda_path.py --simulate`: the replay the auto rule's tolerances were chosen with
(docs/safety-weight.md) runs the library's own `search_weight` on recorded held-out measures and reads back what
the chosen λ gave on the evaluation."""

import json
import os
import sys

import pytest


@pytest.fixture
def lambda_path():
    here = os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks")
    sys.path.insert(0, os.path.abspath(here))
    try:
        import suite_lambda_path

        yield suite_lambda_path
    finally:
        sys.path.remove(os.path.abspath(here))


def _measured(task_acc: float, safety_loss: float, retain_acc: float = 1.0) -> dict:
    """The task loss rises as its accuracy falls (so no candidate beats another on every loss)."""
    return {"loss": [1.0 - task_acc, safety_loss, 0.1], "accuracy": [task_acc, 0.9, retain_acc]}


def _evaluation(meets: bool, old: float = 1.0, down: float = 1.0) -> dict:
    refusal = 1.0 if meets else 0.2
    return {"refusal_attacked": refusal, "refusal_unattacked": refusal, "over_refusal": 0.0,
            "downstream_ratio": down, "old_ratio": old, "meets_target": meets, "misses": []}  # fmt: skip


def test_replay_takes_the_rules_choice_and_its_recorded_evaluation(lambda_path):
    # world a: λ = 0.1 leaves safety damage, 0.2 restores it within every tolerance, so the rule (coarse 0.1 / 0.3 / 1,
    # then the midpoint 0.2) takes 0.2; world b: restoring needs λ = 1, which loses more task accuracy than the
    # tolerance (so does 0.3), so the rule keeps the task at 0.1 (that λ did not meet the target; 1 did: the oracle
    # counts it)
    refs = {"F": _measured(1.0, 2.0), "A": _measured(0.5, 0.0)}
    a = {**refs, "0.1": _measured(1.0, 0.5), "0.2": _measured(0.98, 0.001), "0.3": _measured(0.97, 0.0),
         "1": _measured(0.9, 0.0)}  # fmt: skip
    b = {**refs, "0.1": _measured(1.0, 1.0), "0.3": _measured(0.8, 0.5), "1": _measured(0.6, 0.0),
         "3": _measured(0.5, 0.0)}  # fmt: skip
    payload = {
        "grid": [0.1, 0.2, 0.3, 1, 3],
        "worlds": [
            {"world": "a", "finetune": "full", "held_out": a,
             "evaluation": {k: _evaluation(k == "0.2") for k in a if k not in "FA"}},
            {"world": "b", "finetune": "lora", "held_out": b,
             "evaluation": {k: _evaluation(k == "1", down=0.5 if k == "1" else 1.0) for k in b if k not in "FA"}},
        ],
    }  # fmt: skip
    result = lambda_path.simulate(payload)
    rows = {r["world"]: r for r in result["rows"]}
    assert rows["a"]["safety_weight"] == 0.2 and rows["a"]["passing"] and rows["a"]["meets_target"]
    assert rows["b"]["safety_weight"] == 0.1 and not rows["b"]["passing"] and not rows["b"]["meets_target"]
    summary = result["summary"]
    assert summary["full"] == "1/1" and summary["lora"] == "0/1"
    assert summary["best_fixed_lambda_per_world"] == {"full": 1, "lora": 1}
    assert summary["min_downstream_ratio"] == 1.0  # world b's replayed λ = 0.1, not the oracle's 1 (0.5)

    del payload["worlds"][0]["held_out"]["0.2"]  # the rule asks for a λ the path did not record: a clear error
    with pytest.raises(KeyError, match="a: λ"):
        lambda_path.simulate(payload)


def test_replay_reads_the_recorded_exact_matches(lambda_path):
    """Paths recorded with row exact matches feed the rule's task answers test: λ = 0.2 restores the safety loss
    within the token tolerances but answers fewer than 1 - AUTO_TASK_EXACT_TOLERANCE of F's held-out rows exactly,
    so the replay keeps the task at 0.1; the same path without the exact matches takes 0.2."""
    from irr_callback.pipeline.auto_weight import AUTO_TASK_EXACT_TOLERANCE

    def measured(task_acc, safety_loss, exact):
        return {**_measured(task_acc, safety_loss), "exact": [exact, 0.5, 1.0]}

    held = {"F": measured(1.0, 2.0, 1.0), "A": measured(0.5, 0.0, 0.0), "0.1": measured(1.0, 0.5, 1.0),
            "0.2": measured(0.97, 0.001, 0.7 - AUTO_TASK_EXACT_TOLERANCE), "0.3": measured(0.96, 0.0, 0.4),
            "1": measured(0.9, 0.0, 0.2)}  # fmt: skip
    world = {"world": "a", "finetune": "full", "held_out": held,
             "evaluation": {k: _evaluation(k == "0.1") for k in held if k not in "FA"}}  # fmt: skip
    assert lambda_path.simulate({"grid": [0.1, 0.2, 0.3, 1], "worlds": [world]})["rows"][0]["safety_weight"] == 0.1
    for level in held.values():
        del level["exact"]
    assert lambda_path.simulate({"grid": [0.1, 0.2, 0.3, 1], "worlds": [world]})["rows"][0]["safety_weight"] == 0.2


def test_set_parses_config_fields_and_names_a_wrong_one(lambda_path):
    assert lambda_path._field("safety_ridge=0.01") == ("safety_ridge", 0.01)
    assert lambda_path._field("safety_tokens=answer") == ("safety_tokens", "answer")
    with pytest.raises(SystemExit, match="no_such_field"):
        lambda_path._field("no_such_field=1")


def test_rule_sweep_scores_patched_tolerances_and_restores_the_shipped_rule(lambda_path):
    """`benchmarks/suite_rule_sweep.py`: a looser task tolerance lets world b take λ = 1 (which met the target there),
    the shipped one keeps 0.1; the rule's constants are the shipped ones again afterwards."""
    import suite_rule_sweep

    from irr_callback.pipeline import auto_weight

    refs = {"F": _measured(1.0, 2.0), "A": _measured(0.5, 0.0)}
    b = {**refs, "0.1": _measured(1.0, 1.0), "0.3": _measured(0.8, 0.5), "0.5": _measured(0.7, 0.3),
         "1": _measured(0.6, 0.0)}  # fmt: skip
    payload = {"grid": [0.1, 0.3, 0.5, 1], "worlds": [
        {"world": "b", "finetune": "lora", "held_out": b,
         "evaluation": {k: _evaluation(k == "1", down=0.95 if k == "1" else 1.0) for k in b if k not in "FA"}}]}  # fmt: skip
    shipped = {k: getattr(auto_weight, k) for k in suite_rule_sweep.SWEEP}
    assert suite_rule_sweep.score([payload], shipped)["met"] == 0
    looser = suite_rule_sweep.score([payload, payload], {**shipped, "AUTO_TASK_TOLERANCE": 0.5})
    assert looser["met"] == 2 and looser["per_file"] == [1, 1] and looser["met_lora"] == 2
    assert looser["min_downstream_ratio"] == 0.95
    assert {k: getattr(auto_weight, k) for k in suite_rule_sweep.SWEEP} == shipped


def test_downward_fallback_tries_a_smaller_lambda_and_can_be_swept_off(lambda_path):
    """AUTO_FALLBACK_DOWN (0.05, shipped since issue 19's seventh round): when no coarse candidate passes and even
    the smallest breaks the task tolerance, λ = 0.05 is tried; here it keeps the task and meets the target, and 0.1
    (the rule without it) does not."""
    import suite_rule_sweep

    from irr_callback.pipeline import auto_weight

    assert auto_weight.AUTO_FALLBACK_DOWN == 0.05
    refs = {"F": _measured(1.0, 2.0), "A": _measured(0.5, 0.0)}
    held = {**refs, "0.05": _measured(0.95, 0.5), "0.1": _measured(0.8, 0.2), "0.3": _measured(0.7, 0.1),
            "1": _measured(0.6, 0.0)}  # fmt: skip
    payload = {"grid": [0.05, 0.1, 0.3, 1], "worlds": [
        {"world": "c", "finetune": "full", "held_out": held,
         "evaluation": {k: _evaluation(k == "0.05") for k in held if k not in "FA"}}]}  # fmt: skip
    shipped = {k: getattr(auto_weight, k) for k in suite_rule_sweep.SWEEP}
    assert lambda_path.simulate(payload)["rows"][0]["safety_weight"] == 0.05
    assert suite_rule_sweep.score([payload], shipped)["met"] == 1
    assert suite_rule_sweep.score([payload], {**shipped, "AUTO_FALLBACK_DOWN": None})["met"] == 0
    assert auto_weight.AUTO_FALLBACK_DOWN == 0.05  # restored after the sweep


def test_rule_sweep_replays_another_candidate_set(lambda_path, tmp_path, capsys):
    """AUTO_CANDIDATES is swept too: with (0.05, 0.2, 0.5) the coarse pass finds λ = 0.2, which restores the safety
    loss within the task tolerance and met the target; the shipped (0.1, 0.3, 1) finds no passing candidate (0.3 and
    up lose too much task accuracy) and keeps the task at 0.1. A set whose λ the path lacks: a KeyError naming the
    world."""
    import suite_rule_sweep

    from irr_callback.pipeline import auto_weight

    refs = {"F": _measured(1.0, 2.0), "A": _measured(0.5, 0.0)}
    held = {**refs, "0.05": _measured(1.0, 1.0), "0.1": _measured(1.0, 0.5), "0.2": _measured(0.99, 0.001),
            "0.3": _measured(0.8, 0.0), "0.5": _measured(0.75, 0.0), "1": _measured(0.7, 0.0)}  # fmt: skip
    payload = {"grid": [0.05, 0.1, 0.2, 0.3, 0.5, 1], "worlds": [
        {"world": "c", "finetune": "full", "held_out": held,
         "evaluation": {k: _evaluation(k == "0.2") for k in held if k not in "FA"}}]}  # fmt: skip
    shipped = {k: getattr(auto_weight, k) for k in suite_rule_sweep.SWEEP}
    assert lambda_path.simulate(payload)["rows"][0]["safety_weight"] == 0.1
    assert suite_rule_sweep.score([payload], shipped)["met"] == 0
    other = {**shipped, "AUTO_CANDIDATES": (0.05, 0.2, 0.5)}
    assert suite_rule_sweep.score([payload], other)["met"] == 1
    with suite_rule_sweep.patched(other):
        assert lambda_path.simulate(payload)["rows"][0]["safety_weight"] == 0.2
    assert auto_weight.AUTO_CANDIDATES == (0.1, 0.3, 1.0)  # restored
    with pytest.raises(KeyError, match="c: λ"):
        suite_rule_sweep.score([payload], {**shipped, "AUTO_CANDIDATES": (0.1, 0.5, 2.0)})  # 2 is not on the path
    # from the command line: a JSON list is a candidate set, one change from the shipped rule
    path = tmp_path / "path.json"
    path.write_text(json.dumps({**payload, "split": "dev"}))
    fixed = [f"{k}={json.dumps(v)}" for k, v in shipped.items() if k != "AUTO_CANDIDATES"]
    assert suite_rule_sweep.main([str(path), "--fix", *fixed, "AUTO_CANDIDATES=[0.05, 0.2, 0.5]"]) == 0
    best = capsys.readouterr().out.splitlines()[3]  # header, rule line, the shipped rule, then the best
    assert "candidates=(0.05, 0.2, 0.5), smallest_first=True | 1 | 1 (1/0)" in best
    assert best.endswith("| 1 |")  # another λ than the shipped rule's in the one world
    # the search's order changes no λ: both orders give the shipped row
    fixed = [f for f in fixed if not f.startswith("AUTO_SMALLEST_FIRST")]
    assert suite_rule_sweep.main([str(path), "--fix", *fixed, "AUTO_CANDIDATES=[0.1, 0.3, 1.0]"]) == 0
    rows = capsys.readouterr().out.splitlines()[2:]
    assert len(rows) == 3 and all(r.endswith("| 0 (0/0) | [0] | 1 | 1.00 | 1.00 | 1.00 | 0 |") for r in rows)


def test_rule_sweep_floor_drops_rules_that_give_up_the_tails(lambda_path, tmp_path, capsys):
    """--floor: a rule that meets more worlds but leaves one under the floor (here the candidate sets that take
    λ = 0.2, whose new task is 0.75×) is not ranked."""
    import suite_rule_sweep

    from irr_callback.pipeline import auto_weight

    refs = {"F": _measured(1.0, 2.0), "A": _measured(0.5, 0.0)}
    held = {**refs, "0.05": _measured(1.0, 1.0), "0.1": _measured(1.0, 0.5), "0.2": _measured(0.99, 0.001),
            "0.3": _measured(0.8, 0.0), "0.5": _measured(0.75, 0.0), "1": _measured(0.7, 0.0),
            "2": _measured(0.6, 0.0)}  # fmt: skip
    evaluation = {k: _evaluation(k == "0.2", down=0.75 if k == "0.2" else 1.0) for k in held if k not in "FA"}
    path = tmp_path / "path.json"
    path.write_text(json.dumps({"split": "dev", "grid": [0.05, 0.1, 0.2, 0.3, 0.5, 1, 2],
                                "worlds": [{"world": "c", "finetune": "full", "held_out": held,
                                            "evaluation": evaluation}]}))  # fmt: skip
    fixed = [f"{k}={json.dumps(v)}" for k, v in vars(auto_weight).items() if k in suite_rule_sweep.SWEEP]
    fixed = [f for f in fixed if not f.startswith("AUTO_CANDIDATES")]
    assert suite_rule_sweep.main([str(path), "--fix", *fixed]) == 0
    assert "candidates=(0.05, 0.2, 0.5), smallest_first=True | 1 | 1 (1/0)" in capsys.readouterr().out  # unfiltered
    assert suite_rule_sweep.main([str(path), "--fix", *fixed, "--floor", "0.8"]) == 0
    out = capsys.readouterr().out
    assert "3 of 5 rules keep the tails" in out
    assert "candidates=(0.05, 0.2, 0.5)" not in out and "candidates=(0.2, 0.5, 2.0)" not in out
