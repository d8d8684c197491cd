"""Ownership of a run directory: one trainer at a time, claimed atomically.

The owner holds an exclusive operating-system lock on ``<run_dir>/.lock`` (``filelock.FileLock``: ``flock`` on
Linux and macOS, ``LockFileEx`` on Windows) for as long as it runs. The operating system drops that lock when the
process dies (kill -9 included), so a lock left by a dead process is simply taken by the next claimant; nothing
has to decide whether a pid is still alive. Who holds the lock (``pid host``) is written beside it, to
``<run_dir>/.lock.owner``, for the message a second trainer prints. The lock file itself cannot carry it:
Windows refuses other processes reads of its locked byte, and filelock 3.x truncates it on every attempt to
take it. Release removes the owner note; ``.lock`` stays (on Windows filelock deletes it). A fresh run claims
``<save_path>/<exp_name>`` (or the first free ``<exp_name>_K``) by taking that lock *and* finding the directory
empty under it (but for these two files), so two runs started together with the same ``exp_name`` get two
directories.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

from filelock import FileLock, Timeout

from srrl.errors import LoadError

LOCK_NAME = ".lock"
OWNER_NAME = ".lock.owner"
_LOCK_FILES = frozenset({LOCK_NAME, OWNER_NAME})


class RunLock:
    """An exclusive lock on one run directory; released by :meth:`release` or when the process ends."""

    def __init__(self, run_dir: Path, lock: FileLock) -> None:
        self.run_dir, self._lock = run_dir, lock

    @classmethod
    def try_acquire(cls, run_dir: Path) -> RunLock | None:
        """The lock of ``run_dir`` (its lock file created if needed), or None when another live process holds it.

        Another ``RunLock`` of the same directory in this process counts as another holder, as it did with
        ``flock`` on two descriptors. An ``OSError`` (an unwritable directory) propagates.
        """
        # thread_local=False: the lock is the process's, released from whichever thread ends the run.
        lock = FileLock(run_dir / LOCK_NAME, thread_local=False)
        try:
            lock.acquire(blocking=False)
        except Timeout:
            return None
        try:
            (run_dir / OWNER_NAME).write_text(f"{os.getpid()} {socket.gethostname()}\n")
        except BaseException:
            lock.release()
            raise
        return cls(run_dir, lock)

    def __del__(self) -> None:
        self.release()

    def release(self) -> None:
        """Drop the lock (idempotent). The owner note goes first, while no other claimant can have written one."""
        lock = getattr(self, "_lock", None)
        if lock is None or not lock.is_locked:
            return
        try:
            (self.run_dir / OWNER_NAME).unlink(missing_ok=True)
        except OSError:
            pass  # a stale note only makes a later message name a finished process
        lock.release()


def holder(run_dir: Path) -> str:
    """Who holds the lock of ``run_dir``, as written by its holder (``pid host``), for messages."""
    try:
        return (run_dir / OWNER_NAME).read_text().strip() or "another process"
    except OSError:
        return "another process"


def _is_fresh(run_dir: Path) -> bool:
    return all(entry.name in _LOCK_FILES for entry in run_dir.iterdir())


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
