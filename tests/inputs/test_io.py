"""Our safetensors files: metadata, fingerprints, and refusal of anything else (never unpickle)."""

import os
import pickle

import pytest
import torch

from irr_callback.io import IRRFileError, fingerprint, load_irr_file, save_irr_file
from irr_callback.tensors import SafetensorsMapping


def test_roundtrip_and_fingerprint_check(tmp_path):
    base = {"a.weight": torch.randn(4, 3), "b.weight": torch.randn(2, 2)}
    other = {k: v + 1 for k, v in base.items()}
    v = {"a.weight": torch.sign(torch.randn(4, 3)).to(torch.int8)}
    path = str(tmp_path / "v.safetensors")
    save_irr_file(path, v, kind="safety_vector", base_fingerprint=fingerprint(base, v.keys()), base_model="tiny")
    loaded = load_irr_file(path, kind="safety_vector", base=base)
    assert torch.equal(loaded["a.weight"], v["a.weight"])
    assert loaded.metadata["irr_callback.sign_only"] == "true"
    with pytest.raises(IRRFileError, match="another base"):
        load_irr_file(path, kind="safety_vector", base=other)
    with pytest.raises(IRRFileError, match="expected a 'fisher'"):
        load_irr_file(path, kind="fisher")
    assert [f for f in os.listdir(tmp_path) if f != "v.safetensors"] == []  # no temp file left


class _Payload:
    def __reduce__(self):
        return (open, ("PWNED_MARKER_FILE", "w"))


def test_pickled_file_is_never_executed(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for name in ("v.pt", "v.safetensors"):
        with open(name, "wb") as fh:
            pickle.dump({"x": _Payload()}, fh)
        with pytest.raises(IRRFileError, match="not a safetensors file"):
            load_irr_file(name, kind="safety_vector")
    assert not os.path.exists("PWNED_MARKER_FILE")


def test_foreign_safetensors_without_metadata_is_refused(tmp_path):
    from safetensors.torch import save_file

    path = str(tmp_path / "x.safetensors")
    save_file({"a": torch.zeros(2)}, path)
    with pytest.raises(IRRFileError, match="no irr_callback metadata"):
        load_irr_file(path, kind="safety_vector")
    assert SafetensorsMapping(path)["a"].shape == (2,)
