"""Ownership of a run directory: one trainer at a time, claimed atomically.

The owner holds an exclusive ``flock`` on ``<run_dir>/.lock`` for as long as it runs. The kernel drops the lock
when the process dies (kill -9 included), so a lock left by a dead process is simply taken by the next claimant;
nothing has to decide whether a pid is still alive. A fresh run claims ``<save_path>/<exp_name>`` (or the first
free ``<exp_name>_K``) by taking that lock *and* finding the directory empty under it, so two runs started
together with the same ``exp_name`` get two directories.
"""

from __future__ import annotations

import errno
import fcntl
import os
import socket
from pathlib import Path

from srrl.errors import LoadError

LOCK_NAME = ".lock"


class RunLock:
    """An exclusive lock on one run directory; released by :meth:`release` or when the process ends."""

    def __init__(self, run_dir: Path, fd: int) -> None:
        self.run_dir, self._fd = run_dir, fd

    @classmethod
    def try_acquire(cls, run_dir: Path) -> RunLock | None:
        """The lock of ``run_dir`` (created if needed), or None when another live process holds it."""
        path = run_dir / LOCK_NAME
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            os.close(fd)
            if err.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                return None
            raise
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()} {socket.gethostname()}\n".encode())
        return cls(run_dir, fd)

    def __del__(self) -> None:
        self.release()

    def release(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)  # closing the descriptor drops the flock
            self._fd = -1


def holder(run_dir: Path) -> str:
    """Who holds the lock of ``run_dir``, as written by its holder (``pid host``), for messages."""
    try:
        return (run_dir / LOCK_NAME).read_text().strip() or "another process"
    except OSError:
        return "another process"


def _is_fresh(run_dir: Path) -> bool:
    return all(entry.name == LOCK_NAME for entry in run_dir.iterdir())


def _mkdir(path: Path, field: str) -> None:
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise LoadError(f"{field}={str(path.parent)!r}: cannot create the run directory {path} "
                        f"({err.strerror or err}); choose a writable --config.save_path") from None


def claim_fresh(save_path: Path, exp_name: str) -> RunLock:
    """Claim ``save_path/exp_name``, or the first ``exp_name_K`` (K = 1, 2, ...) that is empty and unclaimed."""
    k = 0
    while True:
        run_dir = save_path / (exp_name if k == 0 else f"{exp_name}_{k}")
        k += 1
        if run_dir.is_dir() and not _is_fresh(run_dir):  # a run's directory: never touched by a fresh run
            continue
        _mkdir(run_dir, "save_path")
        lock = _try(run_dir)
        if lock is not None and _is_fresh(run_dir):
            return lock
        if lock is not None:
            lock.release()


def claim_existing(run_dir: Path) -> RunLock:
    """Claim the run directory ``run_dir`` to resume it; a one-line LoadError when another trainer has it."""
    lock = _try(run_dir)
    if lock is None:
        raise LoadError(f"resume_from={str(run_dir)!r}: the run directory is in use by process {holder(run_dir)}; "
                        "wait for that trainer to finish or stop it")
    return lock


def _try(run_dir: Path) -> RunLock | None:
    try:
        return RunLock.try_acquire(run_dir)
    except OSError as err:
        raise LoadError(f"cannot lock the run directory {run_dir} ({err.strerror or err}); it must be writable") from None
