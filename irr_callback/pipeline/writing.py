"""Step 4 of the data path: writing realigned weights, and the all-or-nothing backup of what was written.

A weight is backed up right before it is first written; on any failure the loop restores every
backed-up tensor (the backends restore through their own gathers) before the error propagates.
"""

from __future__ import annotations

import os
import tempfile

import torch
from transformers.utils import logging

from ..targets import Target


logger = logging.get_logger(__name__)


def write_weight(target: Target, new_weight: torch.Tensor, backup: Backup) -> None:
    """W' = W_A + Δ' computed in float32, cast once; a LoRA layer's adapter is switched off (B = 0)."""
    param = target.weight
    backup.save(param)
    param.data.copy_(target.from_out_in(new_weight).to(dtype=param.dtype, device=param.device))
    if target.kind == "lora":
        switch_off_adapter(target, backup)


def switch_off_adapter(target: Target, backup: Backup) -> None:
    """B = 0: the LoRA layer's output is its (realigned) frozen weight's alone."""
    lora_b = target.module.lora_B[target.adapter].weight
    backup.save(lora_b)
    lora_b.data.zero_()


def make_backup(where: str) -> Backup:
    """The all-or-nothing backup: 'cpu' (RAM), 'disk' (a temp file: no RAM) or 'none' (callers that
    discard the model on failure, e.g. the offline path)."""
    if where == "cpu":
        return Backup()
    if where == "disk":
        return DiskBackup()
    if where == "none":
        return NoBackup()
    raise ValueError(f"backup must be 'cpu', 'disk' or 'none', got {where!r}")


class Backup:
    """Original values of every tensor written, on CPU, to restore on failure."""

    def __init__(self) -> None:
        self._saved: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._ids: set[int] = set()

    def save(self, param: torch.Tensor) -> None:
        if id(param) not in self._ids:
            self._ids.add(id(param))
            self._saved.append((param, param.detach().to("cpu", copy=True)))

    def originals(self):
        """(param, original CPU tensor) pairs, last written first: what `restore` puts back."""
        yield from reversed(self._saved)

    def restore(self) -> None:
        with torch.no_grad():
            for param, original in self.originals():
                param.data.copy_(original.to(param.device))
        self.close()

    def close(self) -> None:
        self._saved.clear()
        self._ids.clear()


class DiskBackup(Backup):
    """Like `Backup`, but the originals are written as raw bytes to an unlinked-on-close temp file
    (under $TMPDIR), so the backup costs disk, not RAM. The writes run on a background thread while
    the next module is computed; each snapshot stays in RAM until its write succeeded (at most
    `in_flight` pending), and one whose write failed (disk full) is kept in RAM, so a restore never
    depends on a write that did not happen."""

    def __init__(self, in_flight: int = 1) -> None:
        super().__init__()
        from concurrent.futures import ThreadPoolExecutor

        self._file = tempfile.TemporaryFile(prefix="irr-backup-")
        # [param, offset, size, shape, dtype, snapshot kept in RAM until written (or if the write failed)]
        self._entries: list[list] = []
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="irr-backup")
        self._pending: list = []
        self._in_flight = in_flight
        self._offset = 0

    def save(self, param: torch.Tensor) -> None:
        if id(param) in self._ids:
            return
        self._ids.add(id(param))
        value = param.detach().to("cpu", copy=True).contiguous()  # a snapshot: param is overwritten next
        size = value.numel() * value.element_size()
        # the shape at save time: a ZeRO-3 parameter is only full-shaped while gathered
        entry = [param, self._offset, size, value.shape, value.dtype, value]
        self._entries.append(entry)
        self._offset += size
        while len(self._pending) >= self._in_flight:
            self._pending.pop(0).result()
        self._pending.append(self._writer.submit(self._write, entry))

    def _write(self, entry: list) -> None:
        raw = memoryview(entry[5].view(-1).view(torch.uint8).numpy())
        try:
            written = 0
            while written < len(raw):
                written += os.pwrite(self._file.fileno(), raw[written:], entry[1] + written)
        except OSError as exc:  # keep the RAM snapshot instead
            logger.warning(f"IRR backup: writing to the temp file failed ({exc}); keeping that tensor in RAM")
            return
        entry[5] = None

    def _drain(self) -> None:
        while self._pending:
            self._pending.pop(0).result()

    def originals(self):
        self._drain()
        for param, offset, size, shape, dtype, in_ram in reversed(self._entries):
            if in_ram is not None:
                yield param, in_ram
                continue
            buffer = bytearray(size)
            view, done = memoryview(buffer), 0
            while done < size:  # pread may return less than asked (2 GiB per call on Linux)
                chunk = os.preadv(self._file.fileno(), [view[done:]], offset + done)
                if chunk <= 0:
                    raise OSError(f"IRR backup: the temp file ended early at byte {offset + done}")
                done += chunk
            yield param, torch.frombuffer(buffer, dtype=torch.uint8).view(dtype).view(shape)

    def close(self) -> None:
        try:
            self._drain()
        finally:
            self._writer.shutdown(wait=True)
            self._entries.clear()
            self._ids.clear()
            self._file.close()


class NoBackup(Backup):
    """No rollback: for callers whose model copy is thrown away on failure."""

    def save(self, param: torch.Tensor) -> None:
        pass
