"""The run directory: the files a training run writes, a lock that keeps a second writer out, and
what is left when something goes wrong.

A run directory holds ``config.json``, ``metrics.jsonl`` / ``metrics.csv``, ``best.safetensors``, the
resumable ``checkpoint/`` (see :mod:`pushforward.checkpoint`) and what the commands add
(``eval.json``, pictures). While :func:`pushforward.train.fit` writes into it, it holds
:class:`RunLock`: the file ``.pushforward.lock`` records the holder's PID, host and command, and an
exclusive ``flock`` on it keeps a second process out (:class:`RunInUseError`, naming the PID). The
operating system drops the ``flock`` when its holder dies however it dies, so a lock file left by a
killed process is recognised as stale and taken over; on file systems without ``flock`` the PID is
checked instead.

This module imports neither torch nor numpy.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import socket
import sys
import time
from pathlib import Path
from typing import Any

__all__ = [
    "FILESYSTEM_ERRNOS",
    "LOCK_FILE",
    "RUN_DIRS",
    "RUN_FILES",
    "RunInUseError",
    "RunLock",
    "RunWriteError",
    "clear_run",
    "file_mode",
    "last_checkpoint",
    "write_failure",
]

#: The files a training run writes into its directory (:func:`clear_run` removes these and nothing else).
RUN_FILES = ("best.safetensors", "metrics.jsonl", "metrics.csv", "config.json", "eval.json")
RUN_DIRS = ("checkpoint", ".checkpoint-old")
LOCK_FILE = ".pushforward.lock"


class RunInUseError(FileExistsError):
    """Another process holds the run directory's lock; the message names its PID."""


class RunWriteError(OSError):
    """The run directory could not be written (a full disk, a read-only file system, no permission);
    the message names the file and the last intact checkpoint."""


#: The errors of the file system rather than of the input: a full disk, a read-only file system, ...
FILESYSTEM_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EIO,
                     errno.EFBIG)


def write_failure(error: OSError, run_dir: str | os.PathLike, started: bool = True) -> RunWriteError:
    """A :class:`RunWriteError` for ``error`` met while writing ``run_dir``: which file, why, what is intact
    and how to go on (``started``: the run had begun writing; else nothing in ``run_dir`` changed)."""
    what = error.strerror or type(error).__name__
    where = f" ({error.filename})" if error.filename else ""
    if not started:
        return RunWriteError(f"cannot write in the run directory {run_dir}: {what}{where}; nothing in it was "
                             "changed")
    return RunWriteError(f"could not write in the run directory {run_dir}: {what}{where}; "
                         f"{last_checkpoint(run_dir)}; once that is fixed, continue with: "
                         f"pushforward train --resume --run-dir {run_dir}")


def clear_run(run_dir: str | os.PathLike) -> None:
    """Removes the files a previous run wrote into ``run_dir`` (and nothing else)."""
    run_dir = Path(run_dir)
    for name in RUN_DIRS:
        shutil.rmtree(run_dir / name, ignore_errors=True)
    for name in RUN_FILES:
        (run_dir / name).unlink(missing_ok=True)


def _umask() -> int:
    """The process's umask, read without changing it where the system allows."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)  # pragma: no cover - systems without /proc
    os.umask(mask)
    return mask


def file_mode(directory: bool = False) -> int:
    """The mode a new file (``0o666``) or directory (``0o777``) gets under the current umask: what
    files written under a temporary name and renamed into place are given, like every other file."""
    return (0o777 if directory else 0o666) & ~_umask()


def last_checkpoint(run_dir: str | os.PathLike) -> str:
    """Where the last intact checkpoint of ``run_dir`` is and its step, for error messages."""
    from .checkpoint import CHECKPOINT, JSON_FILE, checkpoint_dir

    ckpt = checkpoint_dir(run_dir)
    try:
        step = json.loads((ckpt / JSON_FILE).read_text()).get("step")
    except (OSError, ValueError, AttributeError):
        return f"no checkpoint has been written in {run_dir} yet"
    if ckpt.name != CHECKPOINT:
        return f"the last intact checkpoint is {ckpt} (step {step}; it is used on --resume)"
    return f"the last intact checkpoint is {ckpt} (step {step})"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # pragma: no cover - another user's process
        return True
    return True


def _read(fd: int) -> dict[str, Any]:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        text = os.read(fd, 1 << 16).decode("utf-8", "replace")
        record = json.loads(text) if text.strip() else {}
        return record if isinstance(record, dict) else {}
    except (OSError, ValueError):
        return {}


def _holder(record: dict[str, Any]) -> str:
    parts = [f"PID {record.get('pid', '?')}"]
    if record.get("host"):
        parts.append(f"on {record['host']}")
    if record.get("started"):
        parts.append(f"since {record['started']}")
    text = " ".join(parts)
    if record.get("command"):
        text += f": {record['command']}"
    return text


class RunLock:
    """An exclusive lock on a run directory, held while a process writes into it.

    ``acquire()`` creates ``run_dir/.pushforward.lock`` with this process's PID, host, start time and
    command, and holds an exclusive ``flock`` on it; ``release()`` removes it. Usable as a context
    manager. A lock file whose ``flock`` is free was left by a process that died: it is taken over,
    and :attr:`stale` describes the dead holder.

    Raises (``acquire``):
        RunInUseError: another live process holds it (the message names its PID and command).
        OSError: the directory cannot be written (read-only, full, missing permissions).
    """

    def __init__(self, run_dir: str | os.PathLike):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_FILE
        self.fd: int | None = None
        self.stale: str | None = None

    def _busy(self, record: dict[str, Any]) -> RunInUseError:
        pid = record.get("pid", "?")
        return RunInUseError(
            f"{self.run_dir} is in use by another pushforward process ({_holder(record)}); wait for it to "
            f"finish or stop it (kill {pid}), or choose another run directory"
        )

    def acquire(self) -> RunLock:
        import fcntl

        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                record = _read(fd)
                os.close(fd)
                raise self._busy(record) from None
            except OSError as e:  # pragma: no cover - a file system without flock: trust the PID
                if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                    os.close(fd)
                    raise
                record = _read(fd)
                pid = record.get("pid")
                if (isinstance(pid, int) and pid != os.getpid() and record.get("host") == socket.gethostname()
                        and _alive(pid)):
                    os.close(fd)
                    raise self._busy(record) from None
            try:  # the holder we waited for may have removed the file: lock the file that is there now
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if not same:
                os.close(fd)
                continue
            previous = _read(fd)
            if previous.get("pid") is not None:
                self.stale = f"{_holder(previous)}, no longer running"
            record = {"pid": os.getpid(), "host": socket.gethostname(),
                      "started": time.strftime("%Y-%m-%d %H:%M:%S"), "command": " ".join(sys.argv)}
            os.ftruncate(fd, 0)
            os.lseek(fd, 0, os.SEEK_SET)
            os.write(fd, json.dumps(record).encode())
            self.fd = fd
            return self

    def release(self) -> None:
        if self.fd is None:
            return
        with contextlib.suppress(OSError):
            self.path.unlink()
        with contextlib.suppress(OSError):
            os.close(self.fd)
        self.fd = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
