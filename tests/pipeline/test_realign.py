"""The layer-by-layer driver on tiny Llama, Qwen2 and GPT-2 models built from configs."""

import pytest
import torch

import irr_callback as irr
from irr_callback import IRRConfig, realign
from irr_callback.core import realign_matrix
from irr_callback.targets import TargetError, find_targets
from tests.helpers import calibration, same_state, state, tiny_model, triple


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
def test_realign_every_architecture(arch):
    base, ft, unaligned = triple(arch)
    v = irr.safety_vector(base, unaligned)
    before = state(ft)
    report = realign(ft, base=base, safety_vector=v, calibration=calibration(), progress=False)
    _, _, targets = find_targets(ft)
    assert len(report.modules) == len(targets) > 0
    assert report.status == "ok" and report.totals["removed"] > 0
    # only target weights changed; biases, norms, embeddings, lm_head keep their fine-tuned values
    after = state(ft)
    target_names = {t.name for t in targets}
    for name in before:
        if name in target_names:
            assert not torch.equal(before[name], after[name]), name
        else:
            assert torch.equal(before[name], after[name]), name
    assert report.to_json()  # serialisable


def test_layer0_equals_realign_matrix_on_captured_hessian():
    base, ft, unaligned = triple("llama")
    v = irr.safety_vector(base, unaligned)
    calib = calibration(n=4, length=9)
    # H of the q/k/v input of layer 0, captured by hand on the fine-tuned model
    captured = []
    handle = ft.model.layers[0].self_attn.q_proj.register_forward_hook(lambda m, i, o: captured.append(i[0]))
    with torch.no_grad():
        ft(**calib[0])
    handle.remove()
    x = captured[0].reshape(-1, 32).double()
    h = 2 * x.t() @ x / x.shape[0]
    name = "model.layers.0.self_attn.q_proj.weight"
    delta = ft.state_dict()[name].double() - base.state_dict()[name].double()
    expected, _ = realign_matrix(delta, v[name].double(), hessian=h)
    realign(
        ft, base=base, safety_vector=v, calibration=calib, progress=False, config=IRRConfig(fallback_to_removal=False)
    )
    got = ft.state_dict()[name].double() - base.state_dict()[name].double()
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def test_removed_entries_equal_base_bit_for_bit_in_bf16():
    base, ft, unaligned = triple("llama", dtype=torch.bfloat16)
    v = irr.safety_vector(base, unaligned, sign_only=True)
    realign(
        ft, base=base, safety_vector=v, calibration=calibration(), progress=False, config=IRRConfig(recalibrate=False)
    )
    name = "model.layers.1.mlp.down_proj.weight"
    w, w_a = ft.state_dict()[name], base.state_dict()[name]
    conflicts = torch.sign(w.float() - w_a.float()) != torch.sign(v[name].float())
    assert conflicts.any()
    assert torch.equal(w[conflicts], w_a[conflicts])  # exact base values, after the single cast


def test_recalibrated_entries_removed_are_exactly_base():
    base, ft, unaligned = triple("llama", dtype=torch.bfloat16)
    v = irr.safety_vector(base, unaligned)
    report = realign(
        ft,
        base=base,
        safety_vector=v,
        calibration=calibration(),
        progress=False,
        config=IRRConfig(fallback_to_removal=False),
    )
    name = "model.layers.0.mlp.gate_proj.weight"
    equal_base = int((ft.state_dict()[name] == base.state_dict()[name]).sum())
    stats = next(m for m in report.modules if m.name == name)
    assert equal_base >= stats.removed > 0


def test_extra_padding_does_not_change_result():
    base, ft1, unaligned = triple("llama")
    ft2 = __import__("copy").deepcopy(ft1)
    v = irr.safety_vector(base, unaligned)
    realign(ft1, base=base, safety_vector=v, calibration=calibration(pad_right=0), progress=False)
    realign(ft2, base=base, safety_vector=v, calibration=calibration(pad_right=7), progress=False)
    for (n, a), (_, b) in zip(ft1.state_dict().items(), ft2.state_dict().items()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=n)


def test_modules_reading_the_same_input_share_one_factorisation(monkeypatch):
    import irr_callback.core.realign as core_realign

    calls = []
    original = core_realign.factor_hessian
    monkeypatch.setattr(core_realign, "factor_hessian", lambda h, **kw: calls.append(kw["name"]) or original(h, **kw))
    base, ft, unaligned = triple("llama")
    realign(ft, base=base, safety_vector=irr.safety_vector(base, unaligned), calibration=calibration(), progress=False)
    # per Llama layer: q+k+v, o, gate+up, down
    assert len(calls) == 2 * 4
    assert (
        "model.layers.0.self_attn.q_proj.weight+model.layers.0.self_attn.k_proj.weight+"
        "model.layers.0.self_attn.v_proj.weight" in calls
    )


def test_recalibration_lowers_layer_output_error_against_finetuned():
    base, ft, unaligned = triple("llama", layers=1)
    v = irr.safety_vector(base, unaligned)
    calib = calibration(n=16, length=24)
    with torch.no_grad():
        reference = ft(**calib[0], output_hidden_states=True).hidden_states[-1]

    def error(cfg):
        model = __import__("copy").deepcopy(ft)
        realign(model, base=base, safety_vector=v, calibration=calib, progress=False, config=cfg)
        with torch.no_grad():
            out = model(**calib[0], output_hidden_states=True).hidden_states[-1]
        return float((out - reference).square().mean())

    assert error(IRRConfig(fallback_to_removal=False)) < error(IRRConfig(recalibrate=False))


def test_target_modules_by_name_and_regex():
    model = tiny_model("llama")
    _, _, by_name = find_targets(model, ["q_proj", "v_proj"])
    assert {t.name.split(".")[-2] for t in by_name} == {"q_proj", "v_proj"} and len(by_name) == 4
    _, _, by_regex = find_targets(model, [r".*layers\.1\.mlp\..*"])
    assert {t.name for t in by_regex} == {
        f"model.layers.1.mlp.{m}.weight" for m in ("gate_proj", "up_proj", "down_proj")
    }
    with pytest.raises(TargetError, match="matched no module"):
        find_targets(model, ["qkv_proj"])


def test_remove_ratio_below_one_uses_importance():
    base, ft, unaligned = triple("llama")
    v = irr.safety_vector(base, unaligned)
    importance = {k: torch.rand(t.shape) for k, t in v.items()}
    report = realign(
        ft,
        base=base,
        safety_vector=v,
        importance=importance,
        calibration=calibration(),
        progress=False,
        config=IRRConfig(remove_ratio=0.5),
    )
    totals = report.totals
    assert 0.4 < totals["removed"] / totals["conflicts"] < 0.6


# --------------------------------------------------------------------------------------------- bad input
def _bad_input_cases():
    base, ft, unaligned = triple("llama")
    v = irr.safety_vector(base, unaligned)
    name = "model.layers.1.self_attn.o_proj.weight"
    missing = {k: t for k, t in v.items() if k != name}
    wrong_shape = dict(v, **{name: torch.zeros(3, 3)})
    nan_v = dict(v, **{name: torch.full_like(v[name], float("nan"))})
    base_sd = {k: t.clone() for k, t in base.state_dict().items()}
    inf_base = dict(base_sd, **{name: torch.full_like(base_sd[name], float("inf"))})
    empty = [{"input_ids": torch.ones(2, 4, dtype=torch.long), "attention_mask": torch.zeros(2, 4, dtype=torch.long)}]
    return ft, [
        (dict(base=base, safety_vector=missing), KeyError, name),
        (dict(base=base, safety_vector=wrong_shape), ValueError, name),
        (dict(base=base, safety_vector=nan_v), ValueError, "NaN or Inf"),
        (dict(base=inf_base, safety_vector=v), ValueError, "base.*NaN or Inf"),
        (dict(base={k: t for k, t in base_sd.items() if k != name}, safety_vector=v), KeyError, "base has no entry"),
        (dict(base=base, safety_vector=v, config=IRRConfig(remove_ratio=0.5)), ValueError, "importance"),
        (
            dict(
                base=base,
                safety_vector=v,
                importance={k: torch.rand(2) for k in v},
                config=IRRConfig(remove_ratio=0.5),
            ),
            ValueError,
            "importance",
        ),
        (dict(base=base, safety_vector=v, calibration=empty), ValueError, "no tokens"),
        (dict(base=base, safety_vector=v, calibration=[{"text": "hi"}]), ValueError, "input_ids"),
        (dict(base=base, safety_vector=v, config=IRRConfig(target_modules=["nope"])), TargetError, "nope"),
        (dict(safety_vector=v), ValueError, "base is required"),
    ]


def test_bad_input_is_named_and_nothing_changes():
    ft, cases = _bad_input_cases()
    before = state(ft)
    for kwargs, error, match in cases:
        kwargs.setdefault("calibration", calibration())
        with pytest.raises(error, match=match):
            realign(ft, progress=False, **kwargs)
        assert same_state(before, state(ft)), kwargs


def test_failure_midway_restores_every_weight(monkeypatch):
    import irr_callback.pipeline.solve as solve_step

    base, ft, unaligned = triple("llama")
    v = irr.safety_vector(base, unaligned)
    before = state(ft)
    original = solve_step.realign_group
    calls = {"n": 0}

    def failing(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 6:  # in layer 1, after layer 0 was written
            raise RuntimeError("boom")
        return original(*args, **kwargs)

    monkeypatch.setattr(solve_step, "realign_group", failing)
    with pytest.raises(RuntimeError, match="boom"):
        realign(ft, base=base, safety_vector=v, calibration=calibration(), progress=False)
    assert same_state(before, state(ft))
    assert not ft.training


def test_config_validation_names_field():
    with pytest.raises(ValueError, match="remove_ratio"):
        IRRConfig(remove_ratio=1.5)
    with pytest.raises(ValueError, match="blocksize"):
        IRRConfig(blocksize=0)
    with pytest.raises(ValueError, match="identify_mode"):
        IRRConfig(identify_mode="magic")


def test_config_parses_with_hfargumentparser():
    from transformers import HfArgumentParser

    (cfg,) = HfArgumentParser(IRRConfig).parse_args_into_dataclasses(
        ["--remove_ratio", "0.5", "--target_modules", "q_proj", "v_proj", "--recalibrate", "false"]
    )
    assert cfg.remove_ratio == 0.5 and cfg.target_modules == ["q_proj", "v_proj"] and cfg.recalibrate is False


def test_fisher_leaves_model_as_found_and_matches_manual():
    model = tiny_model("llama")
    model.train()
    ids = torch.randint(3, 90, (2, 6))
    labels = ids.clone()
    labels[:, :3] = -100
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    name = "model.layers.0.mlp.up_proj.weight"
    f = irr.fisher(model, [batch, batch], names=[name], progress=False)
    assert model.training and all(p.grad is None for p in model.parameters())
    assert all(p.requires_grad for p in model.parameters())
    model.eval()
    model.zero_grad()
    model(**batch).loss.backward()
    manual = dict(model.named_parameters())[name].grad.square()
    torch.testing.assert_close(f[name], manual)


def test_safety_vector_sign_only_and_values():
    base, _, unaligned = triple("llama")
    values = irr.safety_vector(base, unaligned)
    signs = irr.safety_vector(base, unaligned, sign_only=True)
    name = "model.layers.0.self_attn.q_proj.weight"
    assert signs[name].dtype == torch.int8
    torch.testing.assert_close(values[name], base.state_dict()[name] - unaligned.state_dict()[name])
    assert torch.equal(signs[name], torch.sign(values[name]).to(torch.int8))
