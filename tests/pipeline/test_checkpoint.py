"""`realign_checkpoint` (one layer in memory at a time, from safetensors) equals in-memory `realign`."""

import copy
import json
import os

import pytest
import torch

import irr_callback as irr
from irr_callback import IRRConfig, realign, realign_checkpoint
from irr_callback.tensors import SafetensorsMapping
from tests.helpers import calibration, fail_at_call, triple


def _save(model, path):
    model.save_pretrained(path)
    return path


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_offline_equals_in_memory_realign(tmp_path, arch):
    base, ft, unaligned = triple(arch, layers=3)
    v = irr.safety_vector(base, unaligned, sign_only=True)
    ft_dir = _save(ft, str(tmp_path / "ft"))
    base_dir = _save(base, str(tmp_path / "base"))
    (tmp_path / "ft" / "tokenizer_config.json").write_text("{}")
    (tmp_path / "ft" / "trainer_state.json").write_text("{}")
    cfg = IRRConfig(fallback_to_removal=True)
    out = str(tmp_path / "out")

    report = realign_checkpoint(
        ft_dir,
        base=base_dir,
        safety_vector=v,
        calibration=calibration(pad_right=3),
        output_dir=out,
        config=cfg,
        progress=False,
    )
    expected = copy.deepcopy(ft)
    expected_report = realign(
        expected, base=base, safety_vector=v, calibration=calibration(pad_right=3), config=cfg, progress=False
    )

    written = SafetensorsMapping(out)
    reference = {k: t for k, t in expected.state_dict().items()}
    on_disk = SafetensorsMapping(ft_dir)
    assert set(written) == set(on_disk)  # same tensors as the fine-tuned checkpoint (tied weights stay tied)
    for key in written:
        assert torch.equal(written[key], reference[key]), key
    changed = [k for k in written if not torch.equal(written[k], on_disk[k])]
    assert changed and all(".layers." in k for k in changed)
    assert [m.to_dict() | {"seconds": 0} for m in report.modules] == [
        m.to_dict() | {"seconds": 0} for m in expected_report.modules
    ]
    assert os.path.exists(os.path.join(out, "config.json"))
    assert os.path.exists(os.path.join(out, "tokenizer_config.json"))
    assert not os.path.exists(os.path.join(out, "trainer_state.json"))
    assert json.load(open(os.path.join(out, "irr_report.json")))["status"] == "ok"
    assert [p for p in os.listdir(tmp_path) if "irr-tmp" in p] == []
    reloaded = type(ft).from_pretrained(out)
    for name, p in expected.named_parameters():
        assert torch.equal(reloaded.state_dict()[name], p), name


def test_offline_failure_leaves_no_output(tmp_path, monkeypatch):
    import irr_callback.pipeline.solve as solve_step

    base, ft, unaligned = triple("llama", layers=2)
    v = irr.safety_vector(base, unaligned)
    ft_dir = _save(ft, str(tmp_path / "ft"))
    fail_at_call(monkeypatch, solve_step, "realign_group", 6)
    with pytest.raises(RuntimeError, match="boom"):
        realign_checkpoint(
            ft_dir,
            base=base,
            safety_vector=v,
            calibration=calibration(),
            output_dir=str(tmp_path / "out"),
            progress=False,
        )
    assert sorted(os.listdir(tmp_path)) == ["ft"]


def test_offline_refuses_bad_inputs_before_writing(tmp_path):
    base, ft, unaligned = triple("llama", layers=2)
    v = irr.safety_vector(base, unaligned)
    ft_dir = _save(ft, str(tmp_path / "ft"))
    missing = {k: t for k, t in v.items() if "layers.1.mlp.down_proj" not in k}
    with pytest.raises(KeyError, match="safety_vector has no entry for target 'model.layers.1.mlp.down_proj.weight'"):
        realign_checkpoint(
            ft_dir,
            base=base,
            safety_vector=missing,
            calibration=calibration(),
            output_dir=str(tmp_path / "out"),
            progress=False,
        )
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "x").write_text("x")
    with pytest.raises(FileExistsError, match="output_dir"):
        realign_checkpoint(
            ft_dir,
            base=base,
            safety_vector=v,
            calibration=calibration(),
            output_dir=str(tmp_path / "busy"),
            progress=False,
        )
    assert sorted(os.listdir(tmp_path)) == ["busy", "ft"]


@pytest.mark.parametrize("where", ["embeddings", "layer_output"])
def test_both_paths_share_the_finiteness_check(tmp_path, where):
    """One layer loop: a NaN/Inf on real tokens stops `realign` and `realign_checkpoint` at the same place."""
    from irr_callback.core import NumericalError

    base, ft, unaligned = triple("llama", layers=2)
    v = irr.safety_vector(base, unaligned)
    cfg = IRRConfig(target_modules=["q_proj", "k_proj", "v_proj"])
    with torch.no_grad():
        if where == "embeddings":
            ft.model.embed_tokens.weight[:] = float("inf")
            match = r"input of decoder layer 'model\.layers\.0' \(the embedding output\) contains NaN or Inf"
        else:  # a non-target weight of layer 0 overflows its output
            ft.model.layers[0].mlp.down_proj.weight[:] = float("inf")
            match = r"output of decoder layer 'model\.layers\.0' after realignment contains NaN or Inf"
    ft_dir = _save(ft, str(tmp_path / "ft"))
    with pytest.raises(NumericalError, match=match):
        realign(copy.deepcopy(ft), base=base, safety_vector=v, calibration=calibration(), config=cfg, progress=False)
    with pytest.raises(NumericalError, match=match):
        realign_checkpoint(
            ft_dir,
            base=base,
            safety_vector=v,
            calibration=calibration(),
            config=cfg,
            output_dir=str(tmp_path / "out"),
            progress=False,
        )
    assert sorted(os.listdir(tmp_path)) == ["ft"]
