"""Atomic outputs: a reader (or a crashed job) never sees a half-written model directory or file.

Everything is written into a temporary directory beside the target, which replaces the target with
`os.replace` only once complete. A previous directory at the target is moved aside first and
deleted only after the new one is in place.

A writer killed outright (SIGKILL, OOM killer, preemption) cannot clean up, so the sibling names
record who made them: `.<name>.tmp-<host>-<pid>-<random>` (being written) and
`.<name>.old-<host>-<pid>-<random>` (the previous output, moved aside for the final rename).
`recover_interrupted` runs before every write: siblings of dead processes on this host are removed,
and if the writer died between the two renames (target gone, previous output moved aside) the
previous output is put back. Siblings of live processes or of other hosts are left alone.

`write_output` is the one writer of a realigned model's directory (model, tokenizer, `irr_report.json`,
model card): the offline path (`pipeline/checkpoint.py`), `outputs/realigned_model.py`, `irr apply`
and `irr sweep` all call it, so it sits here, below the pipeline and the outputs alike.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import socket
import tempfile
from collections.abc import Iterator
from typing import Any

import torch
from transformers.utils import logging

from .targets import unwrap


logger = logging.get_logger(__name__)

_OWNER = re.compile(r"^(?P<host>.+)-(?P<pid>\d+)-[a-z0-9_]+$")  # mkdtemp's random part has no '-'


REPORT_FILE = "irr_report.json"


def write_output(
    directory: str,
    *,
    model: torch.nn.Module | None = None,
    state_dict: dict[str, torch.Tensor] | None = None,
    processing_class: Any = None,
    report: Any = None,
    card: Any = None,
) -> None:
    """Write into `directory` (created if needed) whatever is given: the model (`save_pretrained`, from
    `state_dict` when it was gathered), the tokenizer / processor, the report and the model card."""
    os.makedirs(directory, exist_ok=True)
    if model is not None:
        kwargs = {} if state_dict is None else {"state_dict": state_dict}
        unwrap(model).save_pretrained(directory, **kwargs)
    if processing_class is not None and hasattr(processing_class, "save_pretrained"):
        processing_class.save_pretrained(directory)
    if report is not None:
        report.save(os.path.join(directory, REPORT_FILE))
    if card is not None:
        card.save(os.path.join(directory, "README.md"))


@contextlib.contextmanager
def atomic_directory(target: str) -> Iterator[str]:
    """Yield a temp dir next to `target`; on success it becomes `target`, on error it is deleted."""
    target = os.path.abspath(target)
    parent = os.path.dirname(target)
    os.makedirs(parent, exist_ok=True)
    recover_interrupted(target)
    tmp = _sibling(target, "tmp")
    try:
        yield tmp
        umask_modes(tmp)  # mkdtemp makes it 0700, transformers' save_pretrained writes weights 0600
        fsync_tree(tmp)  # every file and directory on disk before the rename makes them visible
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if os.path.lexists(target):
        old = _sibling(target, "old")
        os.rmdir(old)  # only the unique name is needed (the target may be a file)
        os.replace(target, old)
    try:
        os.replace(tmp, target)
    except BaseException:
        if old is not None:
            os.replace(old, target)
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    fsync_path(parent)  # the rename itself
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def atomic_file(path: str, suffix: str = ".tmp") -> Iterator[str]:
    """Yield a temp file path in `path`'s directory; on success it replaces `path` (`publish_file`: umask-respecting
    mode, fsync, atomic rename, fsync of the directory), on error it is deleted."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".irr-", suffix=suffix, dir=directory)
    os.close(fd)
    try:
        yield tmp
        publish_file(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def current_umask() -> int:
    """The process umask (read by setting it and putting it back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def fsync_path(path: str) -> None:
    """fsync a file (its bytes) or a directory (its entries)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def umask_modes(path: str) -> None:
    """Give the tree under `path` the modes makedirs/open would (umask respected), whatever the writers used:
    `mkdtemp` makes directories 0700 and transformers 5 writes `model.safetensors` 0600, which teammates on a
    shared machine could not read. Links are left alone."""
    mask = current_umask()
    for root, dirs, files in os.walk(path):
        for name in files:
            if not os.path.islink(os.path.join(root, name)):
                os.chmod(os.path.join(root, name), 0o666 & ~mask)
        for name in dirs:
            if not os.path.islink(os.path.join(root, name)):
                os.chmod(os.path.join(root, name), 0o777 & ~mask)
    os.chmod(path, 0o777 & ~mask)


def fsync_tree(path: str) -> None:
    """fsync every file, then every directory bottom up (their entries), `path` last."""
    for root, _dirs, files in os.walk(path, topdown=False):
        for name in files:
            if not os.path.islink(os.path.join(root, name)):
                fsync_path(os.path.join(root, name))
        fsync_path(root)


def publish_file(tmp: str, path: str) -> None:
    """Make the complete temp file `tmp` the file `path`: the mode `open()` would give it (umask respected, not
    mkstemp's 0600), its bytes on disk, then the atomic rename, then the directory entry on disk. A power loss
    leaves the previous file or the new one, never an empty file under the final name."""
    os.chmod(tmp, 0o666 & ~current_umask())
    fsync_path(tmp)
    os.replace(tmp, path)
    fsync_path(os.path.dirname(os.path.abspath(path)))


def recover_interrupted(target: str) -> list[str]:
    """Undo what a killed writer of `target` left behind; returns what was done, one line per action.

    Safe to call at any time: only siblings made on this host by processes that no longer run are
    touched, so a concurrent writer's temp directory survives.
    """
    target = os.path.abspath(target)
    parent, name = os.path.dirname(target), os.path.basename(target)
    if not os.path.isdir(parent):
        return []
    stale: dict[str, list[str]] = {"tmp": [], "old": []}
    for entry in os.listdir(parent):
        for kind in stale:
            prefix = f".{name}.{kind}-"
            if entry.startswith(prefix) and _dead_local_owner(entry[len(prefix) :]):
                stale[kind].append(os.path.join(parent, entry))
    actions = []
    if not os.path.lexists(target) and stale["old"]:
        newest = max(stale["old"], key=os.path.getmtime)
        os.replace(newest, target)
        stale["old"].remove(newest)
        actions.append(f"restored the previous output {target} (its writer was killed while replacing it)")
    for path in stale["tmp"] + stale["old"]:
        shutil.rmtree(path, ignore_errors=True)
        actions.append(f"removed {path} left by a killed writer")
    for line in actions:
        logger.warning(f"IRR: {line}")
    return actions


def _sibling(target: str, kind: str) -> str:
    prefix = f".{os.path.basename(target)}.{kind}-{socket.gethostname()}-{os.getpid()}-"
    return tempfile.mkdtemp(prefix=prefix, dir=os.path.dirname(target))


def _dead_local_owner(suffix: str) -> bool:
    match = _OWNER.match(suffix)
    if match is None or match["host"] != socket.gethostname():
        return False  # not ours to judge (older naming, or another machine on a shared filesystem)
    return not _alive(int(match["pid"]))


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    state = _proc_state(pid)
    return state != "Z"  # a killed child not yet reaped by its parent is a zombie: dead for our purpose


def _proc_state(pid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return None
