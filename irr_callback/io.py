"""Our safetensors files (safety vectors, Fisher scores, snapshots): metadata in, metadata checked out.

Only safetensors are ever read, so no user file can execute code on load. Every file carries the
fingerprint of the base weights it was made for; loading it against another base is refused.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Mapping

import torch

from .saving import atomic_file
from .tensors import SafetensorsMapping


FORMAT_VERSION = "1"
KINDS = ("safety_vector", "fisher", "snapshot")
_PICKLE_MAGIC = (b"\x80", b"PK\x03\x04")  # pickle protocol 2+, zip archives (torch.save)


class IRRFileError(ValueError):
    """A file is not one of ours, is of the wrong kind, or was made for another base model."""


def fingerprint(tensors: Mapping[str, torch.Tensor], names: Iterable[str] | None = None, sample: int = 256) -> str:
    """Short hash of names, shapes and a strided sample of values (as float32, so loading a bf16
    checkpoint in float32 keeps the fingerprint): identifies a base model cheaply."""
    digest = hashlib.sha256()
    for name in sorted(names if names is not None else tensors.keys()):
        t = tensors[name].detach()
        flat = t.reshape(-1)
        step = max(1, flat.numel() // sample)
        values = flat[::step][:sample].to(torch.float32).cpu().contiguous()
        digest.update(f"{name}|{tuple(t.shape)}|".encode())
        digest.update(values.numpy().tobytes())
    return digest.hexdigest()[:32]


def save_irr_file(
    path: str,
    tensors: Mapping[str, torch.Tensor],
    *,
    kind: str,
    base_fingerprint: str,
    base_model: str = "",
    extra: dict[str, str] | None = None,
) -> None:
    """Write atomically (temp file in the same directory, then rename): never a half-written file."""
    from safetensors.torch import save_file

    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if not tensors:
        raise ValueError(f"{path}: refusing to write an empty {kind} file")
    sign_only = all(t.dtype == torch.int8 for t in tensors.values())
    metadata = {
        "irr_callback.format": FORMAT_VERSION,
        "irr_callback.kind": kind,
        "irr_callback.base_fingerprint": base_fingerprint,
        "irr_callback.base_model": base_model,
        "irr_callback.sign_only": "true" if sign_only else "false",
        **(extra or {}),
    }
    with atomic_file(path, suffix=".safetensors.tmp") as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp, metadata=metadata)


def load_irr_file(path: str, *, kind: str, base: Mapping[str, torch.Tensor] | None = None) -> SafetensorsMapping:
    """Open one of our files lazily after checking it: safetensors, our metadata, the right kind and,
    when `base` is given, made for that base (fingerprint over the tensors the file holds)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{kind} file '{path}' does not exist")
    with open(path, "rb") as fh:
        head = fh.read(8)
    if any(head.startswith(m) for m in _PICKLE_MAGIC) or not path.endswith(".safetensors"):
        raise IRRFileError(
            f"{kind} file '{path}' is not a safetensors file; pickled files (.pt/.bin/.pkl) are "
            "never loaded. Re-create it with `irr safety-vector` / `irr fisher`."
        )
    try:
        mapping = SafetensorsMapping(path)
    except ValueError as exc:
        raise IRRFileError(str(exc)) from exc
    meta = mapping.metadata
    if meta.get("irr_callback.format") != FORMAT_VERSION:
        raise IRRFileError(
            f"{kind} file '{path}' has no irr_callback metadata (format "
            f"{meta.get('irr_callback.format')!r}); write it with irr_callback's tools"
        )
    if meta.get("irr_callback.kind") != kind:
        raise IRRFileError(f"'{path}' holds a {meta.get('irr_callback.kind')!r}, expected a {kind!r}")
    if base is None:
        return mapping
    absent = [k for k in mapping if k not in base]
    if absent:
        raise IRRFileError(f"{kind} file '{path}' has tensors the base model lacks, e.g. {absent[:3]}")
    expected_fingerprint = fingerprint(base, mapping.keys())
    if meta.get("irr_callback.base_fingerprint") != expected_fingerprint:
        raise IRRFileError(
            f"{kind} file '{path}' was made for another base model (fingerprint "
            f"{meta.get('irr_callback.base_fingerprint')} of {meta.get('irr_callback.base_model') or 'unknown'}, "
            f"this base: {expected_fingerprint})"
        )
    return mapping
