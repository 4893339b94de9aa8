"""One trainer per workdir: ``<workdir>/lock`` names its holder (host, pid, start time).

A second trainer refuses to start, naming the holder. A lock left by a process that no
longer exists on this host (killed with SIGKILL, machine rebooted) is taken over with a
warning. Readers (load, sample.py) never take or look at the lock.
"""

from __future__ import annotations

import json
import os
import socket
import time
import warnings
from pathlib import Path

__all__ = ["WorkdirLock", "WorkdirLockedError"]


class WorkdirLockedError(RuntimeError):
    """Another trainer holds the workdir."""


def _alive(pid: int) -> bool:
    """Whether a process with this pid exists on this host."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class WorkdirLock:
    """Context manager holding <workdir>/lock for the life of a training run."""

    def __init__(self, workdir: str | Path):
        self.path = Path(workdir) / "lock"
        self.info = {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        }
        self.held = False

    def _create(self) -> bool:
        """Create the lock file exclusively; False if it exists."""
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(self.info))
        return True

    def _holder(self) -> dict | None:
        """The holder's info, or None if the lock vanished or is unreadable."""
        try:
            return json.loads(self.path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return {}

    def acquire(self) -> None:
        """Take the lock, taking over a stale one; raise WorkdirLockedError if held."""
        for _ in range(3):
            if self._create():
                self.held = True
                return
            holder = self._holder()
            if holder is None:
                continue
            here = holder.get("host") == self.info["host"]
            pid = int(holder.get("pid", -1))
            if here and pid == os.getpid():
                self.held = True
                return
            if here and pid > 0 and not _alive(pid):
                warnings.warn(
                    f"taking over the stale lock {self.path} of pid {pid} (no longer running, "
                    f"started {holder.get('started')})",
                    stacklevel=2,
                )
                self.path.unlink(missing_ok=True)
                continue
            raise WorkdirLockedError(
                f"{self.path.parent} is in use by another trainer (host {holder.get('host')}, "
                f"pid {holder.get('pid')}, started {holder.get('started')}); wait for it to "
                f"finish, or delete {self.path} if you are sure it is not running"
            )
        raise WorkdirLockedError(f"could not take the lock {self.path}")

    def release(self) -> None:
        """Remove the lock if this process holds it."""
        if self.held and (self._holder() or {}).get("pid") == os.getpid():
            self.path.unlink(missing_ok=True)
        self.held = False

    def __enter__(self) -> WorkdirLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()
