"""Hessian collection of a layer: the pass stops after the last target with identical Hessians."""

import torch

from tests.helpers import calibration


def _hessians(model, targets_layer, batches, stop_plan):
    from irr_callback.pipeline.capture import capture_layer_inputs
    from irr_callback.pipeline.hessians import collect_stream
    from irr_callback.targets import find_targets

    _, layers, targets = find_targets(model, None)
    with torch.no_grad():
        hidden, layer_args = capture_layer_inputs(model, layers, batches)
        out = collect_stream(
            layers[targets_layer],
            [t for t in targets if t.layer == targets_layer],
            hidden,
            layer_args[targets_layer],
            [b["attention_mask"] for b in batches],
            stop_plan=stop_plan,
        )
    return {tuple(t.name for t in group): h for group, (h, _) in out}


def test_hessian_pass_stops_after_the_last_target_with_identical_hessians():
    from tests.helpers import tiny_model

    model = tiny_model("llama", layers=2)
    batches = list(calibration(n=6, length=10))
    batches = (
        [{k: v[i : i + 2] for k, v in batches[0].items()} for i in range(0, 6, 2)] if len(batches) == 1 else batches
    )
    down_calls = {"n": 0}
    model.model.layers[1].mlp.down_proj.register_forward_hook(
        lambda *a: down_calls.__setitem__("n", down_calls["n"] + 1)
    )
    full = _hessians(model, 1, batches, stop_plan=None)
    assert down_calls["n"] == len(batches)
    down_calls["n"] = 0
    plan: dict = {}
    first = _hessians(model, 1, batches, stop_plan=plan)  # learns the order on batch 0, stops on later batches
    assert down_calls["n"] == 1 and list(plan.values()) == ["mlp.down_proj"]
    down_calls["n"] = 0
    again = _hessians(model, 1, batches, stop_plan=plan)  # a known shape: stops from batch 0 on
    assert down_calls["n"] == 0
    assert full.keys() == first.keys() == again.keys() and len(full) == 4
    for k in full:
        assert torch.equal(full[k], first[k]) and torch.equal(full[k], again[k])


def test_hessian_pass_never_stops_when_a_target_runs_twice():
    from tests.helpers import tiny_model

    model = tiny_model("llama", layers=1)
    mlp = model.model.layers[0].mlp
    inner = mlp.forward
    mlp.forward = lambda x: inner(x) + 0.0 * mlp.down_proj(mlp.act_fn(mlp.gate_proj(x)) * mlp.up_proj(x))
    batches = list(calibration(n=4, length=8))
    plan: dict = {}
    stopped = _hessians(model, 0, batches, stop_plan=plan)
    assert list(plan.values()) == [None]
    full = _hessians(model, 0, batches, stop_plan=None)
    for k in full:
        assert torch.equal(full[k], stopped[k])
