"""`task_term="fine-tuned"`: the calibration (and retain) stream's fine-tuned twin through the layer loop.

The core solve is checked against literal least squares in `tests/core/test_retain.py`; here, that the pipeline
hands it the right pairs: each calibration token's input in the fine-tuned model (x_F) beside its input in the model
being realigned (x_d). Offline and LoRA runs: `test_safety_stream.py` (`OPTIONS`); two processes:
`tests/distributed/test_backends.py::test_objective_options_two_processes_equal_one`.
"""

import copy

import pytest
import torch

from irr_callback import IRRConfig, IRRConfigError, realign
from irr_callback.pipeline import solve
from tests.helpers import calibration, same_state, state, triple
from tests.pipeline.test_safety_stream import safety_rows


def target_inputs(model, module_name: str, batches) -> torch.Tensor:
    """Every real token's input to `module_name` when `model` runs `batches` (tokens, columns)."""
    module = dict(model.named_modules())[module_name]
    seen = []
    handle = module.register_forward_pre_hook(lambda m, args: seen.append(args[0].detach()))
    try:
        with torch.no_grad():
            for b in batches:
                model(input_ids=b["input_ids"], attention_mask=b["attention_mask"])
    finally:
        handle.remove()
    masks = [b["attention_mask"].bool() for b in batches]
    return torch.cat([x[m] for x, m in zip(seen, masks)])


def recorded_terms(monkeypatch) -> dict:
    """{group name: the `fine_tuned` terms the solver was handed}, filled while a run solves."""
    seen, original = {}, solve.realign_group

    def spy(*args, names, **kwargs):
        seen[names[0]] = kwargs.get("fine_tuned")
        return original(*args, names=names, **kwargs)

    monkeypatch.setattr(solve, "realign_group", spy)
    return seen


def test_each_calibration_token_is_paired_with_its_input_in_the_fine_tuned_model(monkeypatch):
    """Layer 1's q_proj (its input depends on nothing but the layer's input and an untouched norm): C_d and H_F are
    the Grams of the realigned model's and the fine-tuned model's own inputs to it, token for token. At layer 0
    nothing has drifted yet: C_d = H_d."""
    base, ft, _ = triple("llama")
    cal = calibration(n=16, length=10)
    seen = recorded_terms(monkeypatch)
    model = copy.deepcopy(ft)
    cfg = IRRConfig.recommended(safety_weight=0.5, task_term="fine-tuned")
    realign(model, base=base, calibration=cal, safety_calibration=safety_rows(), config=cfg, progress=False)

    name = "model.layers.1.self_attn.q_proj.weight"
    x_d = target_inputs(model, "model.layers.1.self_attn.q_proj", cal).double()
    x_f = target_inputs(ft, "model.layers.1.self_attn.q_proj", cal).double()
    n = x_d.shape[0]
    assert (x_d - x_f).abs().max() > 1e-3  # layer 0 was realigned: the inputs drifted
    terms = seen[name]
    torch.testing.assert_close(terms.cross.double(), 2 * x_f.t() @ x_d / n, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(terms.hessian.double(), 2 * x_f.t() @ x_f / n, rtol=1e-4, atol=1e-6)
    assert terms.retain_cross is None  # no retain term in this run
    layer0 = seen["model.layers.0.self_attn.q_proj.weight"]
    torch.testing.assert_close(layer0.cross, layer0.hessian, rtol=1e-6, atol=1e-7)


def test_the_retain_stream_gets_its_fine_tuned_pair_too(monkeypatch):
    base, ft, _ = triple("llama")
    seen = recorded_terms(monkeypatch)
    retain = calibration(n=16, length=10, seed=3)
    cfg = IRRConfig.recommended(safety_weight=0.5, task_term="fine-tuned", retain_weight=0.3)
    model = copy.deepcopy(ft)
    realign(model, base=base, calibration=calibration(n=16, length=10), safety_calibration=safety_rows(),
            retain_calibration=retain, config=cfg, progress=False)  # fmt: skip
    x_r = target_inputs(model, "model.layers.1.self_attn.q_proj", retain).double()
    x_f = target_inputs(ft, "model.layers.1.self_attn.q_proj", retain).double()
    terms = seen["model.layers.1.self_attn.q_proj.weight"]
    torch.testing.assert_close(terms.retain_cross.double(), 2 * x_f.t() @ x_r / x_r.shape[0], rtol=1e-4, atol=1e-6)


def test_it_moves_the_weights_and_keeps_the_task_closer_to_the_fine_tuned_model():
    """Against `task_term="delta"` at the same λ, the realigned model's calibration outputs are closer to the
    fine-tuned model's (the term's purpose), and layer 0 (no drift yet) is solved the same."""
    base, ft, _ = triple("llama", layers=3)
    cal = calibration(n=16, length=10)
    out = {}
    for term in ("delta", "fine-tuned"):
        model = copy.deepcopy(ft)
        cfg = IRRConfig.recommended(safety_weight=2.0, task_term=term, safety_ridge=0.01)
        realign(model, base=base, calibration=cal, safety_calibration=safety_rows(), config=cfg, progress=False)
        out[term] = model
    s = {k: state(m) for k, m in out.items()}
    layer0 = [k for k in s["delta"] if ".layers.0." in k]
    assert all(torch.equal(s["delta"][k], s["fine-tuned"][k]) for k in layer0)
    assert not same_state(s["delta"], s["fine-tuned"])
    with torch.no_grad():
        reference = ft(**{k: cal[0][k] for k in ("input_ids", "attention_mask")}).logits
        gaps = {k: float((m(**{k2: cal[0][k2] for k2 in ("input_ids", "attention_mask")}).logits - reference).norm())
                for k, m in out.items()}  # fmt: skip
    assert gaps["fine-tuned"] < gaps["delta"]


def test_the_term_needs_a_safety_weight():
    with pytest.raises(IRRConfigError, match="task_term"):
        IRRConfig(task_term="fine-tuned")
    with pytest.raises(IRRConfigError, match="task_term"):
        IRRConfig.recommended(task_term="own")
