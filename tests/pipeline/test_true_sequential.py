"""`true_sequential`: a pass of the layer per group of targets, each with the groups before it already realigned.

With one pass of the unmodified layer, o_proj is fit on the attention the fine-tuned q/k/v give, though the realigned
model feeds it the attention of the realigned q/k/v (and down_proj the realigned gate/up). The aligned-target safety
term then corrects for drift the run does not have. These tests pin what each group sees, and the consequence that
makes the option right: at λ → ∞ the aligned term reproduces the aligned model on the safety rows exactly.
Offline and LoRA runs: `test_safety_stream.py` (`OPTIONS`); two processes:
`tests/distributed/test_backends.py::test_objective_options_two_processes_equal_one`.
"""

import copy

import pytest
import torch

from irr_callback import IRRConfig, realign
from irr_callback.pipeline import solve
from tests.helpers import calibration, triple
from tests.pipeline.test_fine_tuned_target import target_inputs
from tests.pipeline.test_safety_stream import safety_rows


def recorded_hessians(monkeypatch) -> dict:
    """{group name: the calibration H the solver was handed}."""
    seen, original = {}, solve.realign_group

    def spy(deltas, safeties, importances, hessian, *, names, **kwargs):
        seen[names[0]] = hessian.clone()
        return original(deltas, safeties, importances, hessian, names=names, **kwargs)

    monkeypatch.setattr(solve, "realign_group", spy)
    return seen


@pytest.mark.parametrize("sequential", [True, False])
def test_each_group_sees_the_layer_with_the_groups_before_it_realigned(monkeypatch, sequential):
    """Layer 0 (its input, the embedding, does not drift): with `true_sequential` o_proj's and down_proj's H are the
    Grams of their inputs in the realigned model; with one pass, those of the fine-tuned model. q/k/v see the same
    input either way."""
    base, ft, _ = triple("llama")
    cal = calibration(n=16, length=10)
    seen = recorded_hessians(monkeypatch)
    model = copy.deepcopy(ft)
    cfg = IRRConfig.recommended(safety_weight=0.5, true_sequential=sequential)
    realign(model, base=base, calibration=cal, safety_calibration=safety_rows(), config=cfg, progress=False)
    for module in ("self_attn.q_proj", "self_attn.o_proj", "mlp.down_proj"):
        name = f"model.layers.0.{module}"
        source = model if sequential or module.endswith("q_proj") else ft
        x = target_inputs(source, name, cal).double()
        torch.testing.assert_close(seen[f"{name}.weight"].double(), 2 * x.t() @ x / x.shape[0], rtol=1e-4, atol=1e-6)
    if sequential:  # the realigned model's o_proj input is not the fine-tuned one's: the option changes something
        realigned, fine = (target_inputs(m, "model.layers.0.self_attn.o_proj", cal) for m in (model, ft))
        assert (realigned - fine).abs().max() > 1e-4


def test_an_overwhelming_aligned_term_reproduces_the_aligned_model_on_the_safety_rows():
    """λ → ∞ (every safety token, no ridge, tiny damping): each layer is asked for the aligned layer's outputs on the
    aligned model's activations. With a pass per group the asks compose, and the realigned model gives the aligned
    model's logits on the safety rows. (The fine-tune here moves the targets only: weights IRR does not touch,
    embeddings, norms and head, would keep their fine-tuned values.)"""
    base, _, _ = triple("llama")
    ft = copy.deepcopy(base)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in ft.named_parameters():
            if name.endswith("proj.weight"):
                p.add_(0.05 * torch.randn(p.shape, generator=g))
    cal, rows = calibration(n=16, length=10), safety_rows()
    model = copy.deepcopy(ft)
    cfg = IRRConfig.recommended(
        safety_weight=1e6, safety_tokens="all", safety_ridge=0.0, percdamp=1e-9, retain_weight=0.0,
        calibration_filter="none", true_sequential=True,
    )  # fmt: skip
    realign(model, base=base, calibration=cal, safety_calibration=rows, config=cfg, progress=False)
    ids = torch.stack([r["input_ids"] for r in rows])
    with torch.no_grad():
        got, want, fine = (m(input_ids=ids).logits for m in (model, base, ft))
    assert float((got - want).abs().max()) < 1e-3 * float((fine - want).abs().max())


def test_it_cannot_be_combined_with_the_fine_tuned_task_term():
    from irr_callback import IRRConfigError

    with pytest.raises(IRRConfigError, match="true_sequential"):
        IRRConfig.recommended(true_sequential=True, task_term="fine-tuned")
