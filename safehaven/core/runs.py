"""Which pipeline runs are alive: one lock file per run, held while its process lives.

Rules (the project's "no human after a crash" rule):

* A run holds ``store/runs/<run id>.lock`` with an exclusive ``flock`` for as long as its
  process lives. The kernel drops the lock when the process dies, even by ``kill -9``, so a
  lock file that nobody holds is the trace of a dead run: its Dagster run can be marked
  failed and its pool slots freed (``assets.runner``) with no person deciding.
* Key rotation refuses to start while any run is alive (``live_runs``): a rotation rewrites
  the store under the run's feet (``safehaven.protect.rotation``).
* A lock file holds no data (it is empty); a dead run's file is removed once its run has
  been dealt with (``forget``).
"""

from __future__ import annotations

import fcntl
import os
import re
from pathlib import Path

from safehaven.core.home import Home

#: A run id as Dagster writes it (a UUID); anything else is not a run lock file.
RUN_ID = re.compile(r"[0-9a-f-]{8,64}")


def runs_dir(home: Home) -> Path:
    return home.store_dir / "runs"


def lock_path(home: Home, run_id: str) -> Path:
    if not RUN_ID.fullmatch(run_id):
        raise ValueError("not a run id")
    return runs_dir(home) / f"{run_id}.lock"


def hold(home: Home, run_id: str) -> int:
    """Take this run's lock (never blocks: a run id is unique); returns the descriptor to close."""
    folder = runs_dir(home)
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd = os.open(lock_path(home, run_id), os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    return fd


def release(home: Home, run_id: str, fd: int) -> None:
    """End of a run: remove its lock file, then drop the lock."""
    lock_path(home, run_id).unlink(missing_ok=True)
    os.close(fd)


def is_alive(home: Home, run_id: str) -> bool | None:
    """True if the run's process holds its lock, False if the lock is left by a dead process,
    None if the run never took a lock here (not a run of this haven, or it has not started)."""
    path = lock_path(home, run_id)
    try:
        fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW)
    except FileNotFoundError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


def live_runs(home: Home) -> list[str]:
    """Ids of the runs whose process is alive now."""
    folder = runs_dir(home)
    if not folder.is_dir():
        return []
    ids = sorted(p.stem for p in folder.glob("*.lock") if RUN_ID.fullmatch(p.stem))
    return [run_id for run_id in ids if is_alive(home, run_id)]


def forget(home: Home, run_id: str) -> None:
    """Remove a dead run's lock file (once its run has been marked failed and its slots freed)."""
    if is_alive(home, run_id) is False:
        lock_path(home, run_id).unlink(missing_ok=True)
