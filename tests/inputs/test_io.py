"""Our safetensors files: metadata, fingerprints, and refusal of anything else (never unpickle)."""

import os
import pickle

import pytest
import torch

from irr_callback.inputs.irr_files import IRRFileError, fingerprint, load_irr_file, save_irr_file
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


def _with_header_length(path: str, length: int) -> None:
    """Rewrite a safetensors file so that its JSON header is exactly `length` bytes (trailing spaces: valid JSON)."""
    import struct

    with open(path, "rb") as fh:
        raw = fh.read()
    n = struct.unpack("<Q", raw[:8])[0]
    header = raw[8 : 8 + n].rstrip(b" ")
    assert length >= len(header)
    with open(path, "wb") as fh:
        fh.write(struct.pack("<Q", length) + header + b" " * (length - len(header)) + raw[8 + n :])


def test_safetensors_is_recognised_by_its_header_whatever_the_header_length(tmp_path):
    """A safetensors file starts with its header length (u64 LE); its first byte may be 0x80 (pickle's magic)."""
    import struct

    from irr_callback.inputs.irr_files import is_safetensors_file

    base = {"a.weight": torch.randn(4, 3)}
    v = {"a.weight": torch.sign(torch.randn(4, 3)).to(torch.int8)}
    fp = fingerprint(base, v.keys())
    path = str(tmp_path / "v.safetensors")
    residues = set()
    # as written (safetensors pads its header to 8 bytes): metadata lengths that give every such residue
    for pad in range(0, 512, 8):
        save_irr_file(path, v, kind="safety_vector", base_fingerprint=fp, extra={"pad": "x" * pad})
        with open(path, "rb") as fh:
            first = fh.read(1)[0]
        residues.add(first)
        assert torch.equal(load_irr_file(path, kind="safety_vector", base=base)["a.weight"], v["a.weight"])
    assert 0x80 in residues and len(residues) == 32
    # every residue mod 256 (a header padded by another writer)
    save_irr_file(path, v, kind="safety_vector", base_fingerprint=fp)
    with open(path, "rb") as fh:
        smallest = struct.unpack("<Q", fh.read(8))[0]
    for residue in range(256):
        length = smallest + (residue - smallest) % 256
        _with_header_length(path, length)
        with open(path, "rb") as fh:
            assert fh.read(1)[0] == residue
        assert is_safetensors_file(path)
        assert torch.equal(load_irr_file(path, kind="safety_vector", base=base)["a.weight"], v["a.weight"])
    # not safetensors: a header length past the end, a header that is not a JSON object, too short a file
    for raw in (
        struct.pack("<Q", 10**6) + b"{}",
        struct.pack("<Q", 2) + b"[]",
        struct.pack("<Q", 3) + b"{\xff}",
        b"{}",
    ):
        with open(path, "wb") as fh:
            fh.write(raw)
        assert not is_safetensors_file(path)
        with pytest.raises(IRRFileError, match="not a safetensors file"):
            load_irr_file(path, kind="safety_vector")


def test_foreign_safetensors_without_metadata_is_refused(tmp_path):
    from safetensors.torch import save_file

    path = str(tmp_path / "x.safetensors")
    save_file({"a": torch.zeros(2)}, path)
    with pytest.raises(IRRFileError, match="no irr_callback metadata"):
        load_irr_file(path, kind="safety_vector")
    assert SafetensorsMapping(path)["a"].shape == (2,)


def test_fingerprint_does_not_depend_on_dtype_or_device_but_on_the_weights(tmp_path):
    from irr_callback.inputs.irr_files import _fingerprint_v1, fingerprint_id, same_base
    from tests.helpers import perturbed, tiny_model

    model = tiny_model()
    names = [n for n, _ in model.named_parameters() if ".layers." in n]
    fp32 = fingerprint(model.state_dict(), names)
    for dtype in (torch.bfloat16, torch.float16):
        other = {k: t.to(dtype) for k, t in model.state_dict().items()}
        assert same_base(fp32, fingerprint(other, names)), dtype
        assert same_base(fingerprint(other, names), fp32), dtype
    # bf16 -> fp16 (double rounding) still the same base
    twice = {k: t.to(torch.bfloat16).to(torch.float16) for k, t in model.state_dict().items()}
    assert same_base(fp32, fingerprint(twice, names))
    if torch.cuda.is_available():
        assert same_base(fp32, fingerprint({k: t.cuda() for k, t in model.state_dict().items()}, names))
    # another base of the same architecture: a fine-tune-sized change, another initialisation, one tensor moved
    for different in (perturbed(model, 0.005, seed=1), tiny_model(seed=1)):
        assert not same_base(fp32, fingerprint(different.state_dict(), names))
    moved = dict(model.state_dict())
    moved[names[0]] = moved[names[0]] * 1.05
    assert not same_base(fp32, fingerprint(moved, names))
    assert not same_base(fp32, fingerprint(model.state_dict(), names[1:]))  # other tensors
    assert not same_base(None, fp32) and not same_base("garbage", fp32)
    assert len(fingerprint_id(fp32)) == 32 and fingerprint_id(fp32).isalnum()

    # a file made from the fp32 weights loads against the bf16 ones, and is refused for another base
    v = {n: torch.ones_like(model.state_dict()[n], dtype=torch.int8) for n in names}
    path = str(tmp_path / "v.safetensors")
    save_irr_file(path, v, kind="safety_vector", base_fingerprint=fp32)
    load_irr_file(path, kind="safety_vector", base={k: t.to(torch.bfloat16) for k, t in model.state_dict().items()})
    with pytest.raises(IRRFileError, match="another base"):
        load_irr_file(path, kind="safety_vector", base=tiny_model(seed=1).state_dict())
    # files written before (version-1 fingerprints) still load against their own base, exactly
    save_irr_file(path, v, kind="safety_vector", base_fingerprint=_fingerprint_v1(model.state_dict(), names))
    load_irr_file(path, kind="safety_vector", base=model.state_dict())
    with pytest.raises(IRRFileError, match="another base"):
        load_irr_file(path, kind="safety_vector", base=tiny_model(seed=1).state_dict())


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_outputs_respect_the_umask_and_are_fsynced_before_the_rename(tmp_path, monkeypatch, umask):
    """Directories and files get the mode open()/makedirs would give them (not mkdtemp's 0700 / mkstemp's 0600),
    and every file and directory is fsynced before the rename that publishes it (power loss: no empty file)."""
    import stat

    from irr_callback import saving
    from irr_callback.saving import atomic_directory

    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(
        os, "fsync", lambda fd: events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}"))) or real_fsync(fd)
    )
    monkeypatch.setattr(os, "replace", lambda a, b: events.append(("replace", str(a), str(b))) or real_replace(a, b))
    before = os.umask(umask)
    try:
        with atomic_directory(str(tmp_path / "out")) as tmp:
            os.makedirs(os.path.join(tmp, "adapter"))
            with open(os.path.join(tmp, "adapter", "w.bin"), "w") as fh:
                fh.write("x")
            os.chmod(os.path.join(tmp, "adapter"), 0o700)  # as mkdtemp makes directories
            with open(os.path.join(tmp, "model.safetensors"), "w") as fh:
                fh.write("x")
            os.chmod(os.path.join(tmp, "model.safetensors"), 0o600)  # as transformers 5's save_pretrained writes
        path = str(tmp_path / "v.safetensors")
        save_irr_file(path, {"a": torch.ones(2, dtype=torch.int8)}, kind="safety_vector", base_fingerprint="f")
    finally:
        os.umask(before)
    assert stat.S_IMODE(os.stat(tmp_path / "out").st_mode) == 0o777 & ~umask
    assert stat.S_IMODE(os.stat(tmp_path / "out" / "adapter").st_mode) == 0o777 & ~umask
    assert stat.S_IMODE(os.stat(tmp_path / "out" / "model.safetensors").st_mode) == 0o666 & ~umask
    assert stat.S_IMODE(os.stat(tmp_path / "out" / "adapter" / "w.bin").st_mode) == 0o666 & ~umask
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o666 & ~umask
    assert saving.current_umask() == before
    renamed = [e for e in events if e[0] == "replace"]
    dir_rename = next(i for i, e in enumerate(events) if e[0] == "replace" and e[2].endswith("/out"))
    synced_before = {e[1] for e in events[:dir_rename] if e[0] == "fsync"}
    tmp_dir = renamed[[e[2] for e in renamed].index(str(tmp_path / "out"))][1]
    assert {tmp_dir, os.path.join(tmp_dir, "adapter"), os.path.join(tmp_dir, "adapter", "w.bin")} <= synced_before
    assert ("fsync", str(tmp_path)) in events[dir_rename:]  # the parent, after the rename
    file_rename = next(i for i, e in enumerate(events) if e[0] == "replace" and e[2] == path)
    tmp_file = events[file_rename][1]
    assert ("fsync", tmp_file) in events[:file_rename] and ("fsync", str(tmp_path)) in events[file_rename:]
