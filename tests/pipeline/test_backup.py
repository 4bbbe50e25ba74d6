"""The all-or-nothing backup (RAM or disk) restores every written weight bit for bit."""

import pytest
import torch

import irr_callback as irr
from irr_callback import IRRConfig, realign
from tests.helpers import calibration, fail_at_call, same_state, state, triple


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
