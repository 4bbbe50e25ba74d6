"""The fast paths give the same results as the simple ones (no timing here: see benchmarks/)."""

import pytest
import torch

import irr_callback as irr
from irr_callback import IRRConfig, realign
from irr_callback.core import obs
from irr_callback.core.identify import removal_mask
from irr_callback.core.realign import realign_group, realign_matrix
from tests.helpers import calibration, fail_at_call, same_state, state, triple


def _spd(n, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, n + 7, generator=g, dtype=dtype)
    return x @ x.t() / n + 0.05 * torch.eye(n, dtype=dtype)


def test_upper_factor_equals_reference_chain():
    h = _spd(300)
    reference = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    torch.testing.assert_close(obs.upper_cholesky_of_inverse(h), reference, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("cols,block", [(700, 512), (64, 512), (300, 128)])
def test_symmetric_output_error_equals_dense(cols, block):
    g = torch.Generator().manual_seed(1)
    change = torch.randn(33, cols, generator=g, dtype=torch.float64)
    h = _spd(cols, seed=2)
    dense = ((change @ h) * change).sum(dim=1)
    torch.testing.assert_close(obs.output_error(change, h, blocksize=block), dense, rtol=1e-10, atol=1e-10)


def _right_looking_sweep(delta, upper, safety, blocksize):
    """The textbook form: explicit U = chol(H⁻¹), every column's error pushed onto all later columns."""
    w = delta.clone()
    removed_all = torch.zeros_like(w, dtype=torch.bool)
    for i1 in range(0, w.shape[1], blocksize):
        i2 = min(i1 + blocksize, w.shape[1])
        removed = removal_mask(w[:, i1:i2], safety[:, i1:i2])
        removed_all[:, i1:i2] = removed
        for c in range(i1, i2):
            e = w[:, c] * removed[:, c - i1] / upper[c, c]
            w[:, c + 1 :] -= torch.outer(e, upper[c, c + 1 :])
        w[:, i1:i2][removed] = 0.0
    return w, removed_all


@pytest.mark.parametrize("blocksize", [1, 16, 128])
def test_left_looking_sweep_with_reversed_cholesky_equals_right_looking_with_inverse(blocksize):
    g = torch.Generator().manual_seed(3)
    delta = torch.randn(40, 300, generator=g, dtype=torch.float64)
    safety = torch.sign(torch.randn(40, 300, generator=g)).to(torch.int8)
    h = _spd(300, seed=4)
    expected, expected_mask = _right_looking_sweep(delta, obs.upper_cholesky_of_inverse(h), safety, blocksize)

    def select(i1, i2, block):
        return removal_mask(block, safety[:, i1:i2])

    before = delta.clone()
    new, err_sq, change_sq, mask = obs.obs_sweep(delta, obs.reversed_cholesky(h), select, blocksize=blocksize)
    torch.testing.assert_close(new, expected, rtol=1e-9, atol=1e-11)
    assert torch.equal(mask, expected_mask) and torch.equal(new[mask], torch.zeros(int(mask.sum()), dtype=new.dtype))
    assert torch.equal(delta, before)  # the input is never modified
    torch.testing.assert_close(change_sq, (new - delta).square().sum(dim=1), rtol=1e-10, atol=1e-14)


def test_reversed_cholesky_and_its_inverse():
    h = _spd(300, seed=8)
    root = obs.reversed_cholesky(h)
    assert torch.equal(root, root.triu())
    torch.testing.assert_close(root @ root.t(), h, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(
        obs.upper_cholesky_of_inverse(h) @ root, torch.eye(300, dtype=h.dtype), rtol=0, atol=1e-9
    )


def test_group_results_equal_single_matrix_results_and_errors():
    """Stacked sweeps (one factorisation) equal per-module `realign_matrix`, errors included."""
    g = torch.Generator().manual_seed(5)
    h = _spd(96, seed=6)
    deltas = [torch.randn(r, 96, generator=g, dtype=torch.float64) for r in (32, 16, 16)]
    safeties = [torch.sign(torch.randn(d.shape, generator=g)).to(torch.int8) for d in deltas]
    grouped = realign_group(deltas, safeties, [None] * 3, h, names=["q", "k", "v"], fallback_to_removal=True)
    for d, s, (new, stats) in zip(deltas, safeties, grouped):
        single, single_stats = realign_matrix(d, s, None, h, fallback_to_removal=True)
        torch.testing.assert_close(new, single, rtol=1e-10, atol=1e-12)
        assert stats.error_removal == pytest.approx(single_stats.error_removal, rel=1e-9)
        assert stats.error_recalibrated == pytest.approx(single_stats.error_recalibrated, rel=1e-9, abs=1e-12)
        dense_removal = float(obs.output_error(d * (torch.sign(d) != torch.sign(s.double())), h).sum())
        assert stats.error_removal == pytest.approx(dense_removal, rel=1e-9)


@pytest.mark.parametrize("where", ["disk", "cpu"])
def test_backup_restores_every_weight_bit_for_bit(monkeypatch, where):
    import irr_callback.pipeline.solve as solve_step

    base, ft, unaligned = triple("llama", dtype=torch.bfloat16)
    v = irr.safety_vector(base, unaligned, sign_only=True)
    before = state(ft)
    calls = fail_at_call(monkeypatch, solve_step, "realign_group", 7)
    with pytest.raises(RuntimeError, match="boom"):
        realign(
            ft, base=base, safety_vector=v, calibration=calibration(), config=IRRConfig(backup=where), progress=False
        )
    assert calls["n"] == 7
    assert same_state(before, state(ft))


def test_backup_field_is_validated():
    with pytest.raises(irr.IRRConfigError, match="backup"):
        IRRConfig(backup="gpu")


@pytest.mark.parametrize("cols,block", [(700, 256), (96, 256), (300, 64)])
def test_upper_block_triangle_hessian_equals_dense(cols, block):
    from irr_callback.core import HessianAccumulator

    g = torch.Generator().manual_seed(9)
    x = torch.randn(3, 11, cols, generator=g, dtype=torch.float64)
    mask = (torch.rand(3, 11, generator=g) > 0.2).long()
    acc = HessianAccumulator(cols, dtype=torch.float64, block=block)
    acc.add(x[:2], mask[:2])
    acc.add(x[2:], mask[2:])
    real = x[mask.bool()]
    h = acc.finalize()
    torch.testing.assert_close(h, 2.0 * real.t() @ real / real.shape[0], rtol=1e-12, atol=1e-12)


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


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
def test_capture_with_stub_layers_records_the_same_layer_arguments(arch):
    from irr_callback.pipeline.capture import capture_layer_inputs, capture_with_stub_layers
    from irr_callback.targets import find_targets
    from tests.helpers import tiny_model

    model = tiny_model(arch, layers=3)
    batches = calibration(n=4, length=9, pad_right=3)
    _, layers, _ = find_targets(model, None)
    with torch.no_grad():
        real_hidden, real_args = capture_layer_inputs(model, layers, batches)
        stub_hidden, stub_args = capture_with_stub_layers(model, layers, batches)
    assert all(
        isinstance(layer, type(model.model.layers[0] if arch != "gpt2" else model.transformer.h[0]))
        for layer in layers
    )  # the real layers are back
    assert all(torch.equal(a, b) for a, b in zip(real_hidden, stub_hidden))

    def same(a, b):
        if isinstance(a, torch.Tensor):
            return isinstance(b, torch.Tensor) and a.shape == b.shape and torch.equal(a, b)
        if isinstance(a, (tuple, list)):
            return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
        if isinstance(a, dict):
            return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
        return a == b or type(a) is type(b)  # e.g. cache objects: same kind

    for per_layer_real, per_layer_stub in zip(real_args, stub_args):
        for real, stub in zip(per_layer_real, per_layer_stub):
            assert same(real, stub)


def test_disk_backup_keeps_a_tensor_in_ram_when_its_write_fails(monkeypatch):
    """Writes are asynchronous: a failed one (disk full) must not make the restore lose that tensor."""
    import os as _os

    import irr_callback.pipeline.solve as solve_step
    import irr_callback.pipeline.writing as writing

    base, ft, unaligned = triple("llama", dtype=torch.bfloat16)
    v = irr.safety_vector(base, unaligned, sign_only=True)
    before = state(ft)
    real_pwrite, writes = _os.pwrite, {"n": 0}

    def flaky_pwrite(fd, data, offset):
        writes["n"] += 1
        if writes["n"] == 2:
            raise OSError(28, "No space left on device")
        return real_pwrite(fd, data, offset)

    monkeypatch.setattr(writing.os, "pwrite", flaky_pwrite)
    fail_at_call(monkeypatch, solve_step, "realign_group", 6)
    with pytest.raises(RuntimeError, match="boom"):
        realign(
            ft, base=base, safety_vector=v, calibration=calibration(), config=IRRConfig(backup="disk"), progress=False
        )
    assert writes["n"] >= 3 and same_state(before, state(ft))


def test_group_given_as_row_blocks_of_one_buffer_is_not_copied_and_gives_the_same_result():
    from irr_callback.core.realign import _one_matrix

    g = torch.Generator().manual_seed(11)
    h = _spd(64, seed=12)
    buffer = torch.randn(48, 64, generator=g, dtype=torch.float64)
    views = [buffer[0:32], buffer[32:48]]
    copies = [v.clone() for v in views]
    assert _one_matrix(views, torch.float64, "cpu") is buffer
    assert _one_matrix(copies, torch.float64, "cpu") is not buffer
    assert _one_matrix([buffer[32:48], buffer[0:32]], torch.float64, "cpu").data_ptr() != buffer.data_ptr()
    safeties = [torch.sign(torch.randn(v.shape, generator=g)).to(torch.int8) for v in views]
    from_views = realign_group(views, safeties, [None, None], h, names=["gate", "up"], fallback_to_removal=True)
    from_copies = realign_group(copies, safeties, [None, None], h, names=["gate", "up"], fallback_to_removal=True)
    for (a, sa), (b, sb) in zip(from_views, from_copies):
        assert torch.equal(a, b) and sa.error_removal == sb.error_removal
    assert torch.equal(buffer, torch.cat(copies))  # never written


@pytest.mark.parametrize("remove_ratio", [1.0, 0.5])
def test_group_counts_per_module_match_the_masks(remove_ratio):
    """The per-module counts are taken from row blocks of column-major masks (no int64 widening):
    they must equal plain counts on each module's own tensors."""
    g = torch.Generator().manual_seed(3)
    deltas = [torch.randn(r, 48, generator=g) for r in (20, 36)]
    safeties = [torch.sign(torch.randn(d.shape, generator=g)).to(torch.int8) for d in deltas]
    scores = [torch.rand(d.shape, generator=g) for d in deltas]
    x = torch.randn(300, 48, generator=g)
    h = 2 * x.t() @ x / 300
    results = realign_group(
        deltas,
        safeties,
        scores,
        h,
        names=["a", "b"],
        remove_ratio=remove_ratio,
        blocksize=16,
        fallback_to_removal=False,
    )
    for d, s, (new, stats) in zip(deltas, safeties, results):
        assert stats.conflicts == int((torch.sign(d) != torch.sign(s)).sum())
        assert stats.removed == int(((new == 0) & (d != 0)).sum()) > 0  # removed entries are exactly 0
        assert stats.dead_columns == 0
