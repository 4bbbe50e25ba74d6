"""Tests for irr_callback.baselines: DARE, RESTA, Safe LoRA (tensor functions and model wrappers)."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from irr_callback.baselines import (
    BaselineReport,
    apply_resta,
    apply_safe_lora,
    dare,
    flat_cosine,
    resta_delta,
    safe_lora_delta,
    safe_lora_lora_b,
    safe_lora_projection,
)


Q0 = "model.layers.0.self_attn.q_proj.weight"
V1 = "model.layers.1.self_attn.v_proj.weight"
DOWN1 = "model.layers.1.mlp.down_proj.weight"


# ----------------------------------------------------------------------------- DARE


def test_dare_rescales_survivors_and_zeroes_the_rest():
    delta = torch.arange(1, 1001, dtype=torch.float32).reshape(10, 100)
    orig = delta.clone()
    out = dare(delta, 0.25, generator=torch.Generator().manual_seed(1))
    assert torch.equal(delta, orig)  # input untouched
    kept = out != 0
    assert torch.allclose(out[kept], delta[kept] / 0.75)
    frac_dropped = 1 - kept.float().mean().item()
    assert 0.18 < frac_dropped < 0.32


def test_dare_is_unbiased_in_expectation():
    delta = torch.full((200_000,), 2.0)
    out = dare(delta, 0.6, generator=torch.Generator().manual_seed(0))
    assert abs(out.mean().item() - 2.0) < 0.03
    assert abs((out == 0).float().mean().item() - 0.6) < 0.01


def test_dare_seeding():
    delta = torch.randn(32, 32)
    a = dare(delta, 0.5, generator=torch.Generator().manual_seed(7))
    b = dare(delta, 0.5, generator=torch.Generator().manual_seed(7))
    c = dare(delta, 0.5, generator=torch.Generator().manual_seed(8))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_dare_edge_rates():
    delta = torch.randn(4, 4)
    assert torch.equal(dare(delta, 0.0), delta)
    for bad in (1.0, -0.1, float("nan")):
        with pytest.raises(ValueError, match="drop_rate"):
            dare(delta, bad)


# ----------------------------------------------------------------------------- RESTA


def test_resta_exact_values():
    delta = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    v = torch.tensor([[0.5, -1.0], [0.0, 2.0]])
    out = resta_delta(delta, v, scale=2.0)
    assert torch.equal(out, torch.tensor([[2.0, 0.0], [3.0, 8.0]]))


def test_resta_with_dare_is_dare_plus_scaled_safety():
    delta = torch.randn(8, 8)
    v = torch.randn(8, 8)
    out = resta_delta(delta, v, scale=0.5, dare_drop_rate=0.3, generator=torch.Generator().manual_seed(3))
    ref = dare(delta, 0.3, generator=torch.Generator().manual_seed(3)) + 0.5 * v
    assert torch.equal(out, ref)


def test_resta_refuses_sign_only_safety():
    with pytest.raises(ValueError, match="sign"):
        resta_delta(torch.zeros(2, 2), torch.ones(2, 2, dtype=torch.int8))


# ----------------------------------------------------------------------------- Safe LoRA


def test_safe_lora_projection_hand_values():
    v = torch.tensor([[1.0, 0.0], [0.0, 0.0], [0.0, 1.0]])  # (out=3, in=2), ||V||_F = sqrt 2
    c = safe_lora_projection(v)
    assert torch.allclose(c, torch.diag(torch.tensor([1.0, 0.0, 1.0])) / math.sqrt(2))


def test_safe_lora_projection_symmetric_and_exact_idempotent():
    torch.manual_seed(0)
    v = torch.randn(6, 3) @ torch.randn(3, 10)  # rank 3
    c = safe_lora_projection(v)
    assert torch.allclose(c, c.T)
    p = safe_lora_projection(v, exact=True)
    assert torch.allclose(p, p.T, atol=1e-6)
    assert torch.allclose(p @ p, p, atol=1e-5)
    assert abs(torch.trace(p).item() - 3.0) < 1e-4
    # projecting twice == once, and the projected delta lies in col(V)
    d = torch.randn(6, 10)
    assert torch.allclose(p @ (p @ d), p @ d, atol=1e-5)


def test_safe_lora_paper_matrix_is_projector_only_for_unit_rank_one():
    u = torch.tensor([[1.0], [2.0], [2.0]]) / 3.0
    w = torch.tensor([[0.6, 0.8]])
    v = u @ w  # rank 1, ||V||_F = 1
    c = safe_lora_projection(v)
    assert torch.allclose(c, safe_lora_projection(v, exact=True), atol=1e-6)
    assert torch.allclose(c @ c, c, atol=1e-6)
    c2 = safe_lora_projection(2 * v)  # scales with V: not idempotent any more
    assert torch.allclose(c2, 2 * c, atol=1e-6)
    assert not torch.allclose(c2 @ c2, c2, atol=1e-3)


def test_safe_lora_threshold_behaviour():
    v = torch.tensor([[1.0, 0.0], [0.0, 0.0]])  # C = diag(1, 0)
    delta = torch.tensor([[3.0, 0.0], [4.0, 0.0]])  # C delta = [[3,0],[0,0]], cos = 9/15 = 0.6
    kept, cos, projected = safe_lora_delta(delta, v, threshold=0.5)
    assert abs(cos - 0.6) < 1e-6 and projected is False
    assert torch.equal(kept, delta)
    new, cos, projected = safe_lora_delta(delta, v, threshold=0.7)
    assert abs(cos - 0.6) < 1e-6 and projected is True
    assert torch.equal(new, torch.tensor([[3.0, 0.0], [0.0, 0.0]]))
    # a delta orthogonal to the alignment subspace is removed entirely
    orth = torch.tensor([[0.0, 0.0], [1.0, 2.0]])
    new, cos, projected = safe_lora_delta(orth, v, threshold=0.5)
    assert cos == 0.0 and projected and torch.count_nonzero(new) == 0


def test_safe_lora_refuses_zero_and_sign_only_safety():
    with pytest.raises(ValueError, match="all zeros"):
        safe_lora_projection(torch.zeros(3, 3))
    with pytest.raises(ValueError, match="sign"):
        safe_lora_projection(torch.ones(3, 3, dtype=torch.int8))


def test_flat_cosine_zero_conventions():
    z = torch.zeros(3)
    assert flat_cosine(z, z) == 1.0
    assert flat_cosine(z, torch.ones(3)) == 0.0
    assert abs(flat_cosine(torch.ones(3), -torch.ones(3)) + 1.0) < 1e-7


@pytest.mark.parametrize("exact", [False, True])
def test_safe_lora_b_projection_equals_dense_projection(exact):
    g = torch.Generator().manual_seed(5)
    a = torch.randn(4, 12, generator=g)  # (r, in)
    b = torch.randn(10, 4, generator=g)  # (out, r)
    v = torch.randn(10, 12, generator=g)
    scaling = 2.5
    new_b, cos_b, proj_b = safe_lora_lora_b(a, b, v, threshold=1.01, scaling=scaling, exact=exact)
    dense, cos_d, proj_d = safe_lora_delta(scaling * b @ a, v, threshold=1.01, exact=exact)
    assert proj_b and proj_d
    assert abs(cos_b - cos_d) < 1e-5
    assert torch.allclose(scaling * new_b @ a, dense, atol=1e-4, rtol=1e-4)
    # and below-threshold cosine keeps B
    kept_b, _, proj = safe_lora_lora_b(a, b, v, threshold=-1.01, scaling=scaling)
    assert not proj and torch.equal(kept_b, b)


# ----------------------------------------------------------------------------- model fixtures


def _tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        vocab_size=64,
    )
    return LlamaForCausalLM(cfg).eval()


def _perturbed(model: torch.nn.Module, seed: int, scale: float = 0.05) -> torch.nn.Module:
    out = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in out.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))
    return out


@pytest.fixture(scope="module")
def trio():
    """(base state, fine-tuned model, safety vector) with v = W_A - W_U for every parameter."""
    base = _tiny_llama()
    ft = _perturbed(base, 1)
    unaligned = _perturbed(base, 2)
    base_sd = {k: p.detach().clone() for k, p in base.named_parameters()}
    sv = {k: base_sd[k] - p.detach() for k, p in unaligned.named_parameters()}
    return base, base_sd, ft, sv


def _snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _assert_unchanged(model, snap):
    now = model.state_dict()
    assert now.keys() == snap.keys()
    for k, v in snap.items():
        assert torch.equal(now[k], v), k


# ----------------------------------------------------------------------------- RESTA on models


def test_apply_resta_without_dare(trio):
    _, base_sd, ft, sv = trio
    model = copy.deepcopy(ft)
    before = _snapshot(model)
    rep = apply_resta(model, base=base_sd, safety_vector=sv, scale=0.5)
    params = dict(model.named_parameters())
    assert rep.num_targets == len(params)
    for k, p in params.items():
        expected = base_sd[k] + ((before[k] - base_sd[k]) + 0.5 * sv[k])
        assert torch.equal(p, expected), k
    d = json.loads(json.dumps(rep.to_dict()))
    assert d["method"] == "RESTA" and d["totals"]["num_targets"] == len(params)
    assert d["entries"][0]["shape"] == list(params[d["entries"][0]["name"]].shape)


def test_apply_resta_base_none_and_target_subset(trio):
    _, _, ft, sv = trio
    model = copy.deepcopy(ft)
    before = _snapshot(model)
    rep = apply_resta(model, base=None, safety_vector=sv, scale=1.0, target_names=[Q0, V1])
    assert [e.name for e in rep.entries] == [Q0, V1]
    for k, p in model.named_parameters():
        if k in (Q0, V1):
            assert torch.equal(p, before[k] + sv[k])
        else:
            assert torch.equal(p, before[k])


def test_apply_resta_with_dare_seeded(trio):
    base, base_sd, ft, sv = trio
    m1, m2, m3 = copy.deepcopy(ft), copy.deepcopy(ft), copy.deepcopy(ft)
    r1 = apply_resta(m1, base=base, safety_vector=sv, dare_drop_rate=0.5, seed=11)  # base as a model
    apply_resta(m2, base=base_sd, safety_vector=sv, dare_drop_rate=0.5, seed=11)
    apply_resta(m3, base=base_sd, safety_vector=sv, dare_drop_rate=0.5, seed=12)
    p1, p2, p3 = (dict(m.named_parameters()) for m in (m1, m2, m3))
    assert all(torch.equal(p1[k], p2[k]) for k in p1)
    assert not all(torch.equal(p1[k], p3[k]) for k in p1)
    ft_p = dict(ft.named_parameters())
    w_a, delta = base_sd[Q0], ft_p[Q0].detach() - base_sd[Q0]
    kept = p1[Q0] - w_a - sv[Q0]
    dropped = kept.abs() < 1e-6
    assert torch.allclose(kept[~dropped], 2 * delta[~dropped], atol=1e-5)
    assert 0.3 < dropped.float().mean().item() < 0.7
    assert sum(e.dropped for e in r1.entries) > 0


def test_apply_resta_casts_once_from_float32(trio):
    _, base_sd, ft, sv = trio
    model = copy.deepcopy(ft).to(torch.bfloat16)
    w = model.get_parameter(Q0).detach().float()
    apply_resta(model, base=base_sd, safety_vector=sv, scale=1.0, target_names=[Q0])
    p = model.get_parameter(Q0)
    assert p.dtype == torch.bfloat16
    expected = (base_sd[Q0] + ((w - base_sd[Q0]) + sv[Q0])).to(torch.bfloat16)
    assert torch.equal(p, expected)


# ----------------------------------------------------------------------------- Safe LoRA on models


def test_apply_safe_lora_dense(trio):
    _, base_sd, ft, sv = trio
    model = copy.deepcopy(ft)
    before = _snapshot(model)
    rep = apply_safe_lora(model, base=base_sd, safety_vector=sv, threshold=1.01)
    names = [e.name for e in rep.entries]
    # default targets: 7 linears x 2 layers + lm_head; no embedding, no norms
    assert len(names) == 15 and "model.embed_tokens.weight" not in names
    assert not any("norm" in n for n in names)
    assert rep.num_projected == 15
    for n in names:
        c = safe_lora_projection(sv[n])
        expected = base_sd[n] + c @ (before[n] - base_sd[n])
        assert torch.allclose(model.get_parameter(n), expected, atol=1e-6), n
    assert torch.equal(model.get_parameter("model.embed_tokens.weight"), before["model.embed_tokens.weight"])
    json.dumps(rep.to_dict())


def test_apply_safe_lora_dense_threshold_none_projected(trio):
    _, base_sd, ft, sv = trio
    model = copy.deepcopy(ft)
    before = _snapshot(model)
    rep = apply_safe_lora(model, base=base_sd, safety_vector=sv, threshold=-1.01)
    assert rep.num_projected == 0 and rep.num_targets == 15
    assert all(-1.0 <= e.cosine <= 1.0 for e in rep.entries)
    _assert_unchanged(model, before)


def _peft_model(ft_or_base, init_weights=False):
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=init_weights)
    torch.manual_seed(3)
    return get_peft_model(copy.deepcopy(ft_or_base), cfg)


def test_apply_safe_lora_on_peft_projects_b(trio):
    base, base_sd, _, sv = trio
    pm = _peft_model(base)
    layers = {n: m for n, m in pm.named_modules() if hasattr(m, "lora_B") and "default" in m.lora_B}
    old_delta = {n: m.get_delta_weight("default").detach().clone() for n, m in layers.items()}
    old_a = {n: m.lora_A["default"].weight.detach().clone() for n, m in layers.items()}
    base_w = {n: m.base_layer.weight.detach().clone() for n, m in layers.items()}

    rep = apply_safe_lora(pm, safety_vector=sv, threshold=1.01)  # no base needed
    assert rep.num_targets == 4 and rep.num_projected == 4
    assert all(e.kind == "lora" for e in rep.entries)
    assert {e.name for e in rep.entries} == {
        f"model.layers.{i}.self_attn.{p}_proj.weight" for i in (0, 1) for p in ("q", "v")
    }
    for n, m in layers.items():
        plain = n.replace("base_model.model.", "") + ".weight"
        c = safe_lora_projection(sv[plain])
        assert torch.allclose(m.get_delta_weight("default"), c @ old_delta[n], atol=1e-6)
        assert torch.equal(m.lora_A["default"].weight, old_a[n])
        assert torch.equal(m.base_layer.weight, base_w[n])


def test_peft_safe_lora_matches_dense_on_merged_model(trio):
    base, base_sd, _, sv = trio
    pm = _peft_model(base)
    merged = copy.deepcopy(pm).merge_and_unload()
    targets = [f"model.layers.{i}.self_attn.{p}_proj.weight" for i in (0, 1) for p in ("q", "v")]
    rep_d = apply_safe_lora(merged, base=base_sd, safety_vector=sv, threshold=0.9, target_names=targets)
    rep_l = apply_safe_lora(pm, safety_vector=sv, threshold=0.9)
    cos_d = {e.name: (e.cosine, e.projected) for e in rep_d.entries}
    for e in rep_l.entries:
        assert abs(e.cosine - cos_d[e.name][0]) < 1e-4 and e.projected == cos_d[e.name][1]
    merged2 = pm.merge_and_unload()
    for n in targets:
        assert torch.allclose(merged2.get_parameter(n), merged.get_parameter(n), atol=1e-5), n


def test_peft_zero_init_lora_is_not_projected(trio):
    base, _, _, sv = trio
    pm = _peft_model(base, init_weights=True)  # B = 0: delta is zero, cosine defined as 1
    before = _snapshot(pm)
    rep = apply_safe_lora(pm, safety_vector=sv, threshold=0.5)
    assert rep.num_projected == 0 and all(e.cosine == 1.0 for e in rep.entries)
    _assert_unchanged(pm, before)


def test_apply_resta_on_peft_without_dare_adds_to_base_layer(trio):
    base, base_sd, _, sv = trio
    pm = _peft_model(base)
    rep = apply_resta(pm, base=None, safety_vector=sv, target_names=[Q0, "model.norm.weight"])
    assert [e.name for e in rep.entries] == [Q0, "model.norm.weight"]
    q = pm.get_submodule("base_model.model.model.layers.0.self_attn.q_proj")
    assert torch.equal(q.base_layer.weight, base_sd[Q0] + sv[Q0])
    with pytest.raises(ValueError, match="merge"):
        apply_resta(pm, base=base_sd, safety_vector=sv, dare_drop_rate=0.5)


# ----------------------------------------------------------------------------- bad input: all-or-nothing


def test_missing_target_name_raises_and_leaves_model(trio):
    _, base_sd, ft, sv = trio
    model = copy.deepcopy(ft)
    before = _snapshot(model)
    sv_missing = {k: v for k, v in sv.items() if k != DOWN1}
    with pytest.raises(KeyError, match=DOWN1):
        apply_resta(model, base=base_sd, safety_vector=sv_missing, target_names=[Q0, DOWN1])
    with pytest.raises(KeyError, match="not.a.param"):
        apply_safe_lora(model, base=base_sd, safety_vector=sv, target_names=[Q0, "not.a.param"])
    base_missing = {k: v for k, v in base_sd.items() if k != DOWN1}
    with pytest.raises(KeyError, match=DOWN1):
        apply_safe_lora(model, base=base_missing, safety_vector=sv)
    _assert_unchanged(model, before)


def _run(method, model, **kw):
    # threshold > 1: every Safe LoRA layer would be projected, so a partial write would show
    if method == "resta":
        return apply_resta(model, **kw)
    return apply_safe_lora(model, threshold=1.01, **kw)


@pytest.mark.parametrize("method", ["resta", "safe_lora"])
def test_shape_mismatch_raises_naming_parameter(trio, method):
    _, base_sd, ft, sv = trio
    model = copy.deepcopy(ft)
    before = _snapshot(model)
    bad = dict(sv)
    bad[DOWN1] = sv[DOWN1][:, :-1].clone()  # a late parameter: earlier ones were already computed
    with pytest.raises(ValueError, match=DOWN1.replace(".", r"\.") + ".*shape"):
        _run(method, model, base=base_sd, safety_vector=bad)
    _assert_unchanged(model, before)


@pytest.mark.parametrize("where", ["safety", "base"])
@pytest.mark.parametrize("method", ["resta", "safe_lora"])
def test_nan_raises_naming_parameter(trio, where, method):
    _, base_sd, ft, sv = trio
    model = copy.deepcopy(ft)
    before = _snapshot(model)
    sv2, base2 = dict(sv), dict(base_sd)
    target = sv2 if where == "safety" else base2
    t = target[DOWN1].clone()
    t[0, 0] = float("nan")
    target[DOWN1] = t
    with pytest.raises(ValueError, match=DOWN1.replace(".", r"\.") + ".*NaN"):
        _run(method, model, base=base2, safety_vector=sv2)
    _assert_unchanged(model, before)


def test_sign_only_safety_vector_refused(trio):
    _, base_sd, ft, sv = trio
    model = copy.deepcopy(ft)
    before = _snapshot(model)
    signs = {k: torch.sign(v).to(torch.int8) for k, v in sv.items()}
    with pytest.raises(ValueError, match="sign"):
        apply_resta(model, base=base_sd, safety_vector=signs)
    with pytest.raises(ValueError, match="sign"):
        apply_safe_lora(model, base=base_sd, safety_vector=signs)
    with pytest.raises(ValueError, match="sign"):
        apply_safe_lora(_peft_model(ft), safety_vector=signs)
    _assert_unchanged(model, before)


def test_zero_safety_layer_and_non_lora_peft_target(trio):
    base, base_sd, ft, sv = trio
    model = copy.deepcopy(ft)
    before = _snapshot(model)
    sv2 = dict(sv)
    sv2[DOWN1] = torch.zeros_like(sv[DOWN1])
    with pytest.raises(ValueError, match=DOWN1.replace(".", r"\.") + ".*all zeros"):
        apply_safe_lora(model, base=base_sd, safety_vector=sv2, threshold=1.01)
    _assert_unchanged(model, before)
    pm = _peft_model(base)
    pm_before = _snapshot(pm)
    with pytest.raises(ValueError, match=DOWN1.replace(".", r"\.") + ".*base="):
        apply_safe_lora(pm, safety_vector=sv, target_names=[Q0, DOWN1], threshold=1.01)
    _assert_unchanged(pm, pm_before)


def test_safe_lora_rejects_1d_target(trio):
    _, base_sd, ft, sv = trio
    with pytest.raises(ValueError, match=r"model\.norm\.weight.*2-D"):
        apply_safe_lora(copy.deepcopy(ft), base=base_sd, safety_vector=sv, target_names=["model.norm.weight"])


def test_report_totals():
    rep = BaselineReport(method="x")
    totals = rep.to_dict()["totals"]
    assert totals == {"num_targets": 0, "num_projected": 0, "total_numel": 0, "total_change_norm": 0.0}


def test_safe_lora_conv1d_orientation_dense_and_lora():
    """GPT-2 Conv1D weights are (in, out): the projection acts on the output dimension."""
    from peft import LoraConfig, get_peft_model
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    base = GPT2LMHeadModel(GPT2Config(n_embd=16, n_layer=1, n_head=2, vocab_size=64, n_positions=16)).eval()
    name = "transformer.h.0.attn.c_attn.weight"  # (16, 48) = (in, out)
    base_sd = {k: p.detach().clone() for k, p in base.named_parameters()}
    sv = {name: torch.randn(16, 48)}
    ft = _perturbed(base, 1)
    w_ft = ft.get_parameter(name).detach().clone()
    rep = apply_safe_lora(ft, base=base_sd, safety_vector=sv, threshold=1.01)
    assert [e.name for e in rep.entries] == [name]
    c = safe_lora_projection(sv[name].T)  # (48, 48) on outputs
    expected = base_sd[name] + (c @ (w_ft - base_sd[name]).T).T
    assert torch.allclose(ft.get_parameter(name), expected, atol=1e-6)

    cfg = LoraConfig(r=2, target_modules=["c_attn"], fan_in_fan_out=True, init_lora_weights=False)
    pm = get_peft_model(copy.deepcopy(base), cfg)
    layer = pm.get_submodule("base_model.model.transformer.h.0.attn.c_attn")
    old = layer.get_delta_weight("default").detach().clone()  # (in, out)
    rep = apply_safe_lora(pm, safety_vector=sv, threshold=1.01)
    assert rep.num_projected == 1 and rep.entries[0].name == name
    assert torch.allclose(layer.get_delta_weight("default"), (c @ old.T).T, atol=1e-6)
