"""Who may write a work folder now: one writer per output, any number of readers.

Each output has a lock file in ``<work>/.locks/``, taken with POSIX record locks (``lockf``): exclusive to
write (logits: the score store; calibrate: calibration.json and masks/; train: its own run folder), shared
to read what another command writes (calibrate reads the store, stage I the masks). A record lock belongs
to its process (data loader workers forked from it do not inherit it) and the kernel releases it when that
process ends however it ends, so a killed run's lock never blocks. A second writer is refused in one line
naming the holder, from the note each holder leaves beside the lock. Under torchrun rank 0 holds the locks
for all ranks. Locks taken by one process do not exclude each other (threads of one process share them).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import functools
import inspect
import json
import os
import socket
import sys
import time
from pathlib import Path

from pipeline.errors import UserError

FOLDER = ".locks"
WHAT = {"scores": "the score store (logits.zarr)", "masks": "calibration.json and masks/"}


def locked(command: str, resources):
    """Decorator: hold the locks ``resources(**arguments) -> (exclusive, shared)`` names, in the folder of
    the ``config`` argument's work_dir, while the function runs."""
    def wrap(fn):
        signature = inspect.signature(fn)

        @functools.wraps(fn)
        def run(*args, **kwargs):
            bound = signature.bind(*args, **kwargs)
            bound.apply_defaults()
            exclusive, shared = resources(**bound.arguments)
            with hold(bound.arguments["config"].work_dir, command, exclusive, shared):
                return fn(*args, **kwargs)
        return run
    return wrap


@contextlib.contextmanager
def hold(work: Path, command: str, exclusive=(), shared=()):
    folder = Path(work) / FOLDER
    if os.environ.get("RANK", "0") != "0" or not _writable(folder):
        yield  # another rank's job holds them; a missing or read-only folder cannot be damaged from here
        return
    opened, notes = [], []
    try:
        for name, mode in [(n, fcntl.LOCK_SH) for n in shared] + [(n, fcntl.LOCK_EX) for n in exclusive]:
            fd = os.open(folder / f"{name}.lock", os.O_RDWR | os.O_CREAT, 0o644)
            opened.append(fd)
            try:
                fcntl.lockf(fd, mode | fcntl.LOCK_NB)
            except OSError as exc:
                if exc.errno not in (errno.EACCES, errno.EAGAIN):
                    raise
                what = WHAT.get(name, name.replace("--", "/"))  # runs--<name>--stage1: that run's folder
                fix = "give another --name, " if name.startswith("runs--") else ""
                raise UserError(f"{work}: {_holders(folder, name)} is using {what}; wait until it ends, or {fix}"
                                "give another --work-dir") from None
            notes.append(_leave_note(folder, name, command))
        yield
    finally:
        for note in notes:
            note.unlink(missing_ok=True)
        for fd in opened:
            os.close(fd)


def _writable(folder: Path) -> bool:
    try:
        folder.mkdir(exist_ok=True)  # not the work folder itself: a mistyped --work-dir is not created
    except OSError:
        return False
    return os.access(folder, os.W_OK)


def _leave_note(folder: Path, name: str, command: str) -> Path:
    for old in folder.glob(f"{name}.*.json"):  # notes of processes that were killed
        if not _alive(old):
            old.unlink(missing_ok=True)
    note = folder / f"{name}.{os.getpid()}.json"
    args = " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])
    note.write_text(json.dumps({"command": command, "pid": os.getpid(), "host": socket.gethostname(),
                                "since": time.strftime("%Y-%m-%d %H:%M:%S"), "args": args[:120]}))
    return note


def _alive(note: Path) -> bool:
    try:
        os.kill(int(note.name.split(".")[-2]), 0)
    except (ValueError, ProcessLookupError):
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _holders(folder: Path, name: str) -> str:
    found = []
    for note in sorted(folder.glob(f"{name}.*.json")):
        try:
            info = json.loads(note.read_text())
        except (OSError, ValueError):
            continue
        if _alive(note):
            found.append(f"{info['command']} (pid {info['pid']}, since {info['since']}: {info['args']})")
    return " and ".join(found) or "another process"
