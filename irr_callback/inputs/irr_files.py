"""Our safetensors files (safety vectors, Fisher scores, snapshots): metadata in, metadata checked out.

Only safetensors are ever read, so no user file can execute code on load. Every file carries the
fingerprint of the base weights it was made for; loading it against another base is refused.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Mapping

import torch

from ..saving import atomic_file
from ..tensors import SafetensorsMapping


FORMAT_VERSION = "1"
KINDS = ("safety_vector", "fisher", "snapshot")
_MAX_HEADER = 100_000_000  # safetensors' own limit on the JSON header


class IRRFileError(ValueError):
    """A file is not one of ours, is of the wrong kind, or was made for another base model."""


_FINGERPRINT = "irr2"
_FINGERPRINT_SAMPLES = 2048  # values sampled over all the tensors, at most 256 per tensor, at least 8


def fingerprint(tensors: Mapping[str, torch.Tensor], names: Iterable[str] | None = None) -> str:
    """Identifies a base model cheaply, whatever its dtype or device: `irr2:<hash of the names and shapes>:<a strided
    sample of the values rounded to bfloat16, base64>`. The same weights held in float32, bfloat16 or float16 give
    fingerprints that `same_base` accepts (their samples agree within one bfloat16 step); another base's do not."""
    import base64

    names = sorted(names if names is not None else tensors.keys())
    per_tensor = max(8, min(256, _FINGERPRINT_SAMPLES // max(1, len(names))))
    structure = hashlib.sha256()
    values = []
    for name in names:
        t = tensors[name].detach()
        structure.update(f"{name}|{tuple(t.shape)}|".encode())
        flat = t.reshape(-1)
        step = max(1, flat.numel() // per_tensor)
        sample = flat[::step][:per_tensor].to(torch.float32).cpu().to(torch.bfloat16).contiguous()
        values.append(sample.view(torch.int16).numpy().tobytes())
    return f"{_FINGERPRINT}:{structure.hexdigest()[:24]}:{base64.b64encode(b''.join(values)).decode()}"


def fingerprint_id(fp: str) -> str:
    """A short, filename-safe name for a fingerprint (cache directories, reports, messages)."""
    if not fp.startswith(f"{_FINGERPRINT}:"):
        return fp  # a version-1 fingerprint is already 32 hex digits
    return hashlib.sha256(fp.encode()).hexdigest()[:32]


def _fingerprint_values(fp: str) -> tuple[str, torch.Tensor] | None:
    import base64
    import binascii

    parts = fp.split(":")
    if len(parts) != 3 or parts[0] != _FINGERPRINT:
        return None
    try:
        raw = bytearray(base64.b64decode(parts[2], validate=True))
    except (binascii.Error, ValueError):
        return None
    if len(raw) % 2:
        return None
    return parts[1], torch.frombuffer(raw, dtype=torch.int16).view(torch.bfloat16).to(torch.float32)


def same_base(recorded: str | None, computed: str) -> bool:
    """Whether two fingerprints are of the same weights: the same names and shapes, and every sampled value within
    one bfloat16 step (what rounding float32 weights to bfloat16 or float16 can change), so a base loaded in another
    dtype or on another device still matches. A version-1 fingerprint (dtype-dependent) must match exactly."""
    if recorded is None:
        return False
    if recorded == computed:
        return True
    a, b = _fingerprint_values(recorded), _fingerprint_values(computed)
    if a is None or b is None or a[0] != b[0] or a[1].shape != b[1].shape:
        return False
    x, y = a[1], b[1]
    tolerance = 2.0**-7 * torch.maximum(x.abs(), y.abs()) * 1.01 + 2.0**-23  # + float16's subnormal step
    return bool(((x - y).abs() <= tolerance).all())


def _fingerprint_v1(tensors: Mapping[str, torch.Tensor], names: Iterable[str], sample: int = 256) -> str:
    """The version-1 fingerprint (files written before `irr2`): exact float32 values, so dtype-dependent."""
    digest = hashlib.sha256()
    for name in sorted(names):
        t = tensors[name].detach()
        flat = t.reshape(-1)
        step = max(1, flat.numel() // sample)
        values = flat[::step][:sample].to(torch.float32).cpu().contiguous()
        digest.update(f"{name}|{tuple(t.shape)}|".encode())
        digest.update(values.numpy().tobytes())
    return digest.hexdigest()[:32]


def matches_base(recorded: str | None, base: Mapping[str, torch.Tensor], names: Iterable[str]) -> tuple[bool, str]:
    """(whether `recorded` is the fingerprint of `base` over `names`, the fingerprint of `base` as recorded files
    write it). Reads files of both fingerprint versions."""
    names = list(names)
    if recorded is not None and not recorded.startswith(f"{_FINGERPRINT}:"):
        legacy = _fingerprint_v1(base, names)
        return recorded == legacy, legacy
    computed = fingerprint(base, names)
    return same_base(recorded, computed), computed


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


def is_safetensors_file(path: str) -> bool:
    """Whether `path` has the safetensors layout: a little-endian u64 header length n, then n bytes of a
    UTF-8 JSON object. Decided by parsing, never by the first byte: n's low byte is anything (0x80, pickle's
    first byte, included), while a pickle or zip (torch.save) file read this way gives an impossible n."""
    size = os.path.getsize(path)
    with open(path, "rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            return False
        length = int.from_bytes(head, "little")
        if not 2 <= length <= min(_MAX_HEADER, size - 8):
            return False
        header = fh.read(length)
    try:
        return isinstance(json.loads(header.decode("utf-8")), dict)
    except ValueError:  # UnicodeDecodeError and JSONDecodeError both are
        return False


def load_irr_file(path: str, *, kind: str, base: Mapping[str, torch.Tensor] | None = None) -> SafetensorsMapping:
    """Open one of our files lazily after checking it: safetensors, our metadata, the right kind and,
    when `base` is given, made for that base (fingerprint over the tensors the file holds)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{kind} file '{path}' does not exist")
    if not path.endswith(".safetensors") or not is_safetensors_file(path):
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
    recorded = meta.get("irr_callback.base_fingerprint")
    ok, expected_fingerprint = matches_base(recorded, base, mapping.keys())
    if not ok:
        raise IRRFileError(
            f"{kind} file '{path}' was made for another base model (fingerprint "
            f"{fingerprint_id(recorded or '')} of {meta.get('irr_callback.base_model') or 'unknown'}, "
            f"this base: {fingerprint_id(expected_fingerprint)})"
        )
    return mapping
