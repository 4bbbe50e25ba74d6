"""`IRRConfig(realign_checkpoints=True)`: every `checkpoint-N/irr` is realigned from the checkpoint's files
(`irr_callback.outputs.trainer_checkpoints`), equals `realign` of that checkpoint loaded in memory with the train-end inputs,
and is made without a copy of the model and without touching it (full fine-tuning and LoRA)."""

from __future__ import annotations

import copy
import json
import os

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM

from irr_callback import IRRCallback, IRRConfig, IRRConfigError, realign
from irr_callback.inputs.data import calibration_examples
from irr_callback.tensors import SafetensorsMapping
from tests import callback_world as world
from tests.callback.test_callback import _one_thread, run, unaligned_dir  # noqa: F401  (module fixtures)
from tests.callback.test_safety_stream import refusals


@pytest.fixture
def watched(monkeypatch):
    """Around every `IRRCallback.on_save`: no `copy.deepcopy` of a module, the live model's state unchanged,
    and the inputs the callback holds then (to realign the checkpoint in memory with the same ones)."""
    seen = {"copies": [], "changed": [], "inputs": {}}
    deepcopy, on_save = copy.deepcopy, IRRCallback.on_save

    def guarded(x, memo=None, _nil=[]):  # noqa: B006  (copy.deepcopy's own signature)
        if isinstance(x, nn.Module):
            seen["copies"].append(type(x).__name__)
        return deepcopy(x, memo, _nil)

    def watch(self, args, state, control, model=None, **kwargs):
        before = {k: v.detach().clone() for k, v in model.state_dict().items()}
        seen["inputs"][state.global_step] = dict(
            base=None if self._snapshot is None else {k: self._snapshot[k].clone() for k in self._snapshot},
            safety_vector=self._safety,
            importance=self._importance,
            safety_calibration=self._safety_calibration,
            retain_calibration=self._retain_calibration,
            config=self._run_config,
        )
        with monkeypatch.context() as m:
            m.setattr(copy, "deepcopy", guarded)
            on_save(self, args, state, control, model=model, **kwargs)
        after = model.state_dict()
        seen["changed"] += [k for k, v in before.items() if not torch.equal(v, after[k])]

    monkeypatch.setattr(IRRCallback, "on_save", watch)
    return seen


def _calibration(config: IRRConfig) -> list[dict]:
    return calibration_examples(
        world.attack_dataset(),
        world.tokenizer(),
        num_samples=config.num_calibration_samples,
        max_length=config.calibration_max_length,
    )


def _assert_checkpoint_equals_in_memory(checkpoint, expected: nn.Module, report) -> None:
    written = SafetensorsMapping(str(checkpoint / "irr"))
    state = expected.state_dict()
    assert set(written) <= set(state) and any(".layers." in k for k in written)
    for key in written:
        torch.testing.assert_close(written[key], state[key], rtol=1e-5, atol=1e-6, msg=key)
    saved = json.loads((checkpoint / "irr" / "irr_report.json").read_text())
    assert saved["status"] == "ok" and saved["safety_weight"] == report.safety_weight
    assert saved["totals"]["removed"] == report.totals["removed"]
    # the copy describes itself like the train-end output: its safety inputs and base in the report, a card
    assert {"safety_inputs", "base_fingerprint"} <= set(saved["extra"])
    card = (checkpoint / "irr" / "README.md").read_text()
    assert f"Setting: **{saved['setting']}**" in card
    reloaded = AutoModelForCausalLM.from_pretrained(checkpoint / "irr")  # a plain model directory
    assert torch.equal(
        reloaded.model.layers[0].self_attn.q_proj.weight, written["model.layers.0.self_attn.q_proj.weight"]
    )


@pytest.mark.parametrize("setting", ["paper", "recommended"])
def test_full_finetune_checkpoint_equals_realign_of_it_in_memory(tmp_path, unaligned_dir, watched, setting):  # noqa: F811
    common = dict(cache_dir=str(tmp_path / "c"), num_calibration_samples=16, realign_checkpoints=True)
    if setting == "paper":
        cfg, kwargs = IRRConfig(unaligned_model=unaligned_dir, **common), {}
    else:  # safety_weight="auto": the checkpoint's λ is searched offline, as realign searches it
        cfg, kwargs = IRRConfig.recommended(**common), {"safety_dataset": refusals()}
    _, cb, _ = run(
        tmp_path, world.aligned_model(), cfg, steps=4, save_strategy="steps", save_steps=2, callback_kwargs=kwargs
    )
    assert watched["copies"] == [] and watched["changed"] == []  # no model copy; the live model untouched
    assert cb.report.status == "ok"
    for step in (2, 4):
        checkpoint = tmp_path / "run" / f"checkpoint-{step}"
        inputs = watched["inputs"][step]
        expected = AutoModelForCausalLM.from_pretrained(checkpoint)
        report = realign(expected, calibration=_calibration(inputs["config"]), progress=False, **inputs)
        assert (report.auto is not None) == (setting == "recommended")
        _assert_checkpoint_equals_in_memory(checkpoint, expected, report)
        assert (checkpoint / "irr" / "tokenizer.json").exists() and not (
            checkpoint / "irr" / "trainer_state.json"
        ).exists()


def test_lora_checkpoint_is_realigned_as_the_merged_model(tmp_path, unaligned_dir, watched):  # noqa: F811
    from peft import LoraConfig, PeftModel, get_peft_model

    model = get_peft_model(world.aligned_model(), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    cfg = IRRConfig(
        unaligned_model=unaligned_dir,
        cache_dir=str(tmp_path / "c"),
        num_calibration_samples=16,
        realign_checkpoints=True,
        lora_output="adapter",
    )
    run(tmp_path, model, cfg, steps=2, save_strategy="steps", save_steps=2, learning_rate=5e-3)
    assert watched["copies"] == [] and watched["changed"] == []
    checkpoint = tmp_path / "run" / "checkpoint-2"
    assert (checkpoint / "adapter_model.safetensors").exists()  # the Trainer's checkpoint: the adapter alone
    out = checkpoint / "irr"
    assert (out / "config.json").exists() and not (out / "adapter_config.json").exists()
    inputs = watched["inputs"][2]
    merged = PeftModel.from_pretrained(world.aligned_model(), checkpoint).merge_and_unload()
    assert not torch.equal(
        merged.model.layers[0].self_attn.q_proj.weight, world.aligned_model().model.layers[0].self_attn.q_proj.weight
    )
    inputs["base"] = world.aligned_model()
    report = realign(merged, calibration=_calibration(inputs["config"]), progress=False, **inputs)
    assert report.totals["removed"] > 0
    _assert_checkpoint_equals_in_memory(checkpoint, merged, report)


def test_a_failing_checkpoint_warns_and_training_goes_on(tmp_path, unaligned_dir, monkeypatch, caplog):  # noqa: F811
    import irr_callback.outputs.trainer_checkpoints as checkpoints

    def boom(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(checkpoints, "realign_checkpoint", boom)
    cfg = IRRConfig(
        unaligned_model=unaligned_dir,
        cache_dir=str(tmp_path / "c"),
        num_calibration_samples=16,
        realign_checkpoints=True,
    )
    with caplog.at_level("WARNING"):
        _, cb, _ = run(tmp_path, world.aligned_model(), cfg, steps=2, save_strategy="steps", save_steps=1)
    assert "realigned copy of" in caplog.text and "RuntimeError: disk full" in caplog.text
    assert cb.report.status == "ok" and (tmp_path / "run" / "irr_report.json").is_file()
    assert not (tmp_path / "run" / "checkpoint-1" / "irr").exists()


def test_a_stale_copy_is_replaced(tmp_path, unaligned_dir):  # noqa: F811
    cfg = IRRConfig(
        unaligned_model=unaligned_dir,
        cache_dir=str(tmp_path / "c"),
        num_calibration_samples=16,
        realign_checkpoints=True,
    )
    stale = tmp_path / "run" / "checkpoint-1" / "irr"
    stale.mkdir(parents=True)
    (stale / "old.txt").write_text("from an earlier run")
    run(tmp_path, world.aligned_model(), cfg, steps=1, save_strategy="steps", save_steps=1)
    assert not (stale / "old.txt").exists() and (stale / "model.safetensors.index.json").exists()


def test_sharded_weights_refuse_realign_checkpoints_at_train_begin(tmp_path, unaligned_dir, monkeypatch):  # noqa: F811
    from irr_callback import distributed

    monkeypatch.setattr(distributed, "sharding_kind", lambda model, targets: "fsdp2")
    model = world.aligned_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = IRRConfig(unaligned_model=unaligned_dir, cache_dir=str(tmp_path / "c"), realign_checkpoints=True)
    with pytest.raises(
        IRRConfigError, match=r"IRRConfig.realign_checkpoints=True is not supported with weights sharded by fsdp2"
    ):
        run(tmp_path, model, cfg, steps=1)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not os.path.exists(tmp_path / "run" / "_irr_run")


def test_live_tensors_are_copied_on_access():
    """The offline path realigns the layers it loads in place: what it reads from the live model is a copy."""
    from irr_callback.outputs.trainer_checkpoints import LiveTensors

    live = {"w": torch.ones(2, 3)}
    mapping = LiveTensors(live)
    mapping["w"].add_(1)
    assert torch.equal(live["w"], torch.ones(2, 3)) and mapping.shape("w") == (2, 3) and list(mapping) == ["w"]
