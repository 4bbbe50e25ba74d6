"""The harmful fine-tune (`harmful_dataset` / `irr safety-vector --harmful-data`) runs on the live model,
not on a deep copy: the same sign(v) as the former copy-based fine-tune, and the model left exactly as
it was (module tree, Parameter objects, values, flags, modes, adapter), also when it fails midway."""

from __future__ import annotations

import copy
import itertools

import pytest
import torch
from torch import nn

import irr_callback.inputs.unaligned as unaligned
from irr_callback.config import IRRConfig
from irr_callback.inputs.data import batches
from irr_callback.targets import find_targets, unwrap
from tests.helpers import VOCAB, fail_at_call, tiny_model


ADAPTER_MODULES = ["q_proj", "v_proj", "down_proj"]


def _examples(n: int = 6, length: int = 9) -> list[dict]:
    g = torch.Generator().manual_seed(3)
    out = []
    for i in range(n):
        ids = torch.randint(3, VOCAB, (length - i % 3,), generator=g).tolist()
        out.append({"input_ids": ids, "attention_mask": [1] * len(ids), "labels": [-100] * 3 + ids[3:]})
    return out


def _config(rank: int) -> IRRConfig:
    return IRRConfig(unaligned_steps=4, unaligned_learning_rate=1e-2, unaligned_lora_rank=rank, unaligned_batch_size=4)


def _peft(model: nn.Module) -> nn.Module:
    """A user's LoRA run: its adapter moved away from zero (so leaking it into the harmful fine-tune shows),
    and a fully trained `modules_to_save` head."""
    from peft import LoraConfig, get_peft_model

    peft = get_peft_model(
        model, LoraConfig(r=4, lora_dropout=0.1, target_modules=ADAPTER_MODULES, modules_to_save=["lm_head"])
    )
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in peft.named_parameters():
            if "lora_B" in name:
                p.add_(0.3 * torch.randn(p.shape, generator=g))
    return peft


def _model(kind: str) -> nn.Module:
    model = tiny_model("llama")
    return _peft(model) if kind == "peft" else model


def _targets(model: nn.Module):
    targets = find_targets(model)[2]
    return [t for t in targets if t.kind == "lora"] if hasattr(model, "peft_config") else targets


def _former(model, examples, targets, config, *, pad_token_id=0):
    """The former implementation, kept as the reference: a deep copy of the base, its adapter unloaded,
    `get_peft_model` on it (or a full fine-tune), the same loop."""
    from peft import LoraConfig, get_peft_model

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.irr_seed)
        clone = copy.deepcopy(model)
        if hasattr(clone, "peft_config") and hasattr(clone, "unload"):
            clone = clone.unload()
        student = unwrap(clone)
        names = {t.name: t.name.rsplit(".", 1)[0] for t in targets}
        base = {n: dict(student.named_parameters())[n].detach().to("cpu", copy=True) for n in names}
        if config.unaligned_lora_rank == 0:
            student.requires_grad_(True)
        else:
            student = get_peft_model(
                student,
                LoraConfig(
                    r=config.unaligned_lora_rank,
                    lora_alpha=2 * config.unaligned_lora_rank,
                    lora_dropout=0.0,
                    target_modules=sorted(set(names.values())),
                ),
            )
        params = [p for p in student.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=config.unaligned_learning_rate, weight_decay=0.0)
        data = batches(examples, config.unaligned_batch_size, pad_token_id)
        student.train()
        for _, batch in zip(range(config.unaligned_steps), itertools.cycle(data)):
            student(**batch, use_cache=False).loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        out = {}
        with torch.no_grad():
            if config.unaligned_lora_rank > 0:
                lora = {n: m for n, m in unwrap(student).named_modules() if hasattr(m, "get_delta_weight")}
                for name, module_name in names.items():
                    out[name] = torch.sign(-lora[module_name].get_delta_weight("default").float()).to(torch.int8)
            else:
                trained = dict(student.named_parameters())
                for name in names:
                    out[name] = torch.sign(base[name].float() - trained[name].detach().float()).to(torch.int8)
    return out


def _picture(model: nn.Module) -> dict:
    """Everything the harmful fine-tune must leave as it found."""
    root = unwrap(model)
    peft = hasattr(model, "peft_config")
    return {
        "state": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "params": [(n, id(p), p.requires_grad, p.grad) for n, p in model.named_parameters()],
        "modules": [(n, id(m), type(m), m.training) for n, m in model.named_modules()],
        "hooks": [(len(m._forward_hooks), len(m._forward_pre_hooks)) for m in model.modules()],
        "attrs": [sorted(vars(m)) for m in model.modules()],  # no attribute left behind (peft_config, flags)
        "peft_config": id(getattr(root, "peft_config", None)),
        "adapters": (list(model.active_adapters), sorted(model.peft_config)) if peft else None,
        "rng": torch.get_rng_state(),
    }


def _assert_same(before: dict, after: dict) -> None:
    assert before["state"].keys() == after["state"].keys()
    assert all(torch.equal(before["state"][k], after["state"][k]) for k in before["state"])  # bit-identical
    assert after["params"] == before["params"]  # same objects, flags, grads
    assert after["modules"] == before["modules"]  # same tree, same module types, same train/eval modes
    assert after["hooks"] == before["hooks"]
    assert after["attrs"] == before["attrs"] and after["peft_config"] == before["peft_config"]
    assert after["adapters"] == before["adapters"]
    assert torch.equal(after["rng"], before["rng"])  # the training run's random stream is untouched


def _as_in_training(model: nn.Module) -> nn.Module:
    """The state a Trainer hands over at train begin: train mode (one module in eval, to see modes kept
    per module) and an optimizer over the trainable parameters."""
    model.train()
    unwrap(model).model.layers[1].eval()
    return model


@pytest.mark.parametrize("rank", [8, 0])
@pytest.mark.parametrize("kind", ["plain", "peft"])
def test_vector_equals_the_former_deep_copy_fine_tune(kind, rank):
    examples, config = _examples(), _config(rank)
    model = _as_in_training(_model(kind))
    targets = _targets(model)
    expected = _former(model, examples, targets, config)
    got = unaligned.harmful_finetune_vector(model, examples, targets, config, progress=False)
    assert got.keys() == expected.keys() and len(got) == len(targets)
    assert all(torch.equal(got[n], expected[n]) for n in got)
    assert all(got[n].dtype == torch.int8 and got[n].abs().sum() > 0 for n in got)  # the fine-tune moved them
    if kind == "peft":  # the user's adapter took no part: the same vector as on the bare base
        plain = tiny_model("llama")
        bare_targets = _targets_like(plain, targets)
        bare = unaligned.harmful_finetune_vector(plain, examples, bare_targets, config, progress=False)
        assert all(torch.equal(got[n], bare[n]) for n in got)


def _targets_like(plain: nn.Module, targets) -> list:
    names = {t.name for t in targets}
    return [t for t in find_targets(plain)[2] if t.name in names]


@pytest.mark.parametrize("fail_at", [None, 3])
@pytest.mark.parametrize("rank", [8, 0])
@pytest.mark.parametrize("kind", ["plain", "peft"])
def test_live_model_is_left_exactly_as_found(kind, rank, fail_at, monkeypatch):
    model = _as_in_training(_model(kind))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    held = [id(p) for group in optimizer.param_groups for p in group["params"]]
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    before = _picture(model)
    if fail_at is not None:  # the harmful fine-tune raises at its third optimizer step
        fail_at_call(monkeypatch, torch.optim.AdamW, "step", fail_at)
        with pytest.raises(RuntimeError, match="boom"):
            unaligned.harmful_finetune_vector(model, _examples(), _targets(model), _config(rank), progress=False)
    else:
        unaligned.harmful_finetune_vector(model, _examples(), _targets(model), _config(rank), progress=False)
    _assert_same(before, _picture(model))
    params = dict(model.named_parameters())
    assert [id(p) for p in params.values() if p.requires_grad] == held  # the Trainer's optimizer still holds them
    if kind == "peft":  # the user's adapter is back: active, trainable (lora + modules_to_save), in the forward
        assert model.active_adapters == ["default"]
        assert trainable == {n for n, p in params.items() if p.requires_grad}
        assert any("lora_A.default" in n for n in trainable) and any("modules_to_save" in n for n in trainable)


def test_live_model_is_left_as_found_when_the_adapter_cannot_be_injected(monkeypatch):
    model = _as_in_training(_model("peft"))
    before = _picture(model)
    fail_at_call(monkeypatch, unaligned, "_add_lora", 1, "injection failed")
    with pytest.raises(RuntimeError, match="injection failed"):
        unaligned.harmful_finetune_vector(model, _examples(), _targets(model), _config(8), progress=False)
    _assert_same(before, _picture(model))


@pytest.mark.parametrize("rank", [8, 0])
@pytest.mark.parametrize("kind", ["plain", "peft"])
def test_no_deep_copy_of_the_model(kind, rank, monkeypatch):
    deepcopy = copy.deepcopy

    def refuse(obj, *args, **kwargs):
        if isinstance(obj, nn.Module):
            raise AssertionError(f"deepcopy of a {type(obj).__name__}")
        return deepcopy(obj, *args, **kwargs)

    model = _model(kind)
    targets = _targets(model)
    monkeypatch.setattr(copy, "deepcopy", refuse)
    v = unaligned.harmful_finetune_vector(model, _examples(), targets, _config(rank), progress=False)
    assert len(v) == len(targets)


def test_freed_heap_is_handed_back_after_the_fine_tune(monkeypatch):
    """The fine-tune's activations and optimizer state are freed before training starts, and the heap is
    trimmed, so glibc does not keep them (benchmarks/bench_memory.py, the harmful row)."""
    model = _model("plain")
    targets = _targets(model)
    calls = []
    real = unaligned._finetune
    monkeypatch.setattr(unaligned, "_finetune", lambda *a: calls.append("finetune") or real(*a))
    monkeypatch.setattr(unaligned, "release_free_memory", lambda: calls.append("trim"))
    unaligned.harmful_finetune_vector(model, _examples(), targets, _config(8), progress=False)
    assert calls == ["finetune", "trim"]


def test_gradient_checkpointing_keeps_the_vector_and_leaves_no_hook():
    """Reentrant checkpoints with a frozen base need the embeddings' output to require grad (what
    get_peft_model arranged on the copy): a temporary hook, removed afterwards."""
    examples, config = _examples(), _config(8)
    model = _as_in_training(tiny_model("llama"))
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    targets = _targets(model)
    expected = _former(model, examples, targets, config)
    before = _picture(model)
    got = unaligned.harmful_finetune_vector(model, examples, targets, config, progress=False)
    assert all(torch.equal(got[n], expected[n]) for n in got) and all(got[n].abs().sum() > 0 for n in got)
    _assert_same(before, _picture(model))


def test_sharded_weights_keep_the_copy(monkeypatch):
    """No temporary adapter can be injected into FSDP/ZeRO-3 shards here: the former copy, same vector."""
    examples, config = _examples(), _config(8)
    model = _model("peft")
    targets = _targets(model)
    expected = _former(model, examples, targets, config)
    copies = []
    monkeypatch.setattr(unaligned.distributed, "sharding_kind", lambda *a: "fsdp1")
    monkeypatch.setattr(unaligned, "plain_copy", lambda m, f=unaligned.plain_copy: copies.append(1) or f(m))
    got = unaligned.harmful_finetune_vector(model, examples, targets, config, progress=False)
    assert copies == [1] and all(torch.equal(got[n], expected[n]) for n in got)


def test_bf16_base_gets_an_fp32_adapter_like_get_peft_model():
    """get_peft_model casts the adapter of a bf16 base to fp32; the temporary adapter is cast the same way."""
    examples, config = _examples(), _config(8)
    model = _as_in_training(tiny_model("llama", dtype=torch.bfloat16))
    targets = _targets(model)
    expected = _former(model, examples, targets, config)
    got = unaligned.harmful_finetune_vector(model, examples, targets, config, progress=False)
    assert all(torch.equal(got[n], expected[n]) for n in got) and all(got[n].abs().sum() > 0 for n in got)
