"""Named input streams: a second stream ("safety") travels beside "calibration" through the one layer
loop, gets its own H per group from the same collection code, and leaves today's result unchanged."""

import copy

import torch

import irr_callback as irr
from irr_callback import IRRConfig
from irr_callback.distributed import SingleProcess
from irr_callback.pipeline.hessians import collect_stream
from irr_callback.pipeline.inputs import SafetyInputs
from irr_callback.pipeline.loop import run_layers
from irr_callback.pipeline.solve import GroupSolver
from irr_callback.pipeline.streams import CALIBRATION, Stream, prepare_calibration
from irr_callback.pipeline.writing import make_backup
from irr_callback.targets import find_targets
from tests.helpers import calibration, state, triple


class RecordingSolver(GroupSolver):
    """The group solver, recording which streams' H each group was handed (and the safety H of layer 0)."""

    seen: list

    def __call__(self, group, hessians):
        self.seen.append(({t.name for t in group}, dict(hessians)))
        super().__call__(group, hessians)


def _run(model, base, v, streams_of):
    config = IRRConfig()
    prefix, layers, targets = find_targets(model)
    inputs = SafetyInputs.resolve(config, base, v, None)
    batches, report = prepare_calibration(calibration(), config, model.config, len(layers))
    solver = RecordingSolver(inputs, config.realign_settings(), make_backup("none"), report)
    solver.seen = []
    streams = streams_of(batches)
    with torch.no_grad():
        for stream in streams:
            stream.capture(model, layers, stubs=True)
        layer0 = {s.name: (list(s.hidden), s.args[0], list(s.masks)) for s in streams}
        run_layers(prefix, layers, targets, streams, solver, SingleProcess(), progress=False)
    return solver.seen, layer0, layers, targets


def test_a_second_stream_gets_its_own_hessians_and_changes_nothing_today():
    base, ft, unaligned = triple("llama")
    v = irr.safety_vector(base, unaligned)
    one = copy.deepcopy(ft)
    _run(one, base, v, lambda batches: [Stream(CALIBRATION, batches)])
    two = copy.deepcopy(ft)
    safety_batches = list(calibration(n=4, length=7, seed=3, pad_right=2))
    seen, layer0, layers, targets = _run(
        two, base, v, lambda batches: [Stream(CALIBRATION, batches), Stream("safety", safety_batches)]
    )

    assert all(set(hessians) == {CALIBRATION, "safety"} for _, hessians in seen)
    real_safety_tokens = sum(int(b["attention_mask"].sum()) for b in safety_batches)
    assert all(hessians["safety"][1] == real_safety_tokens for _, hessians in seen)  # padding masked
    # layer 0's safety H is what the same collection code gives on that stream alone (unmodified layer)
    fresh = copy.deepcopy(ft)
    _, fresh_layers, fresh_targets = find_targets(fresh)
    hidden, args, masks = layer0["safety"]
    with torch.no_grad():
        expected = collect_stream(fresh_layers[0], [t for t in fresh_targets if t.layer == 0], hidden, args, masks)
    first_layer = [(names, h) for names, h in seen if any(".layers.0." in n for n in names)]
    assert len(first_layer) == len(expected)
    for (group, (h, tokens)), (names, hessians) in zip(expected, first_layer):
        assert {t.name for t in group} == names
        torch.testing.assert_close(hessians["safety"][0], h, rtol=0, atol=0)
        assert hessians["safety"][1] == tokens
    # the solver uses the calibration stream only: the same weights as with one stream
    a, b = state(one), state(two)
    assert all(torch.equal(a[k], b[k]) for k in a)
