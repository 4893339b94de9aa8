"""One trainer per workdir: ``<workdir>/lock`` names its holder (host, pid, start time).

The holder keeps an exclusive ``fcntl.flock`` on the file for the life of the run, so the
kernel decides who holds it: of two trainers starting together exactly one wins, and a
holder that dies (SIGKILL, reboot) leaves a lock anyone can take. A second trainer refuses
to start, naming the holder. A lock file that names a process no longer running on this
host, or that cannot be read (empty or garbled: a kill or a full disk while it was
written), is stale and taken over with a warning. A file naming a live process is
respected even without a flock (written by an older version). Readers (load, sample.py)
never take or look at the lock.
"""

from __future__ import annotations

import fcntl
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


def _parse(text: str) -> dict | None:
    """The holder's info of a lock file's text; None if it is not a valid lock record."""
    try:
        info = json.loads(text)
    except ValueError:
        return None
    if not isinstance(info, dict) or not isinstance(info.get("host"), str):
        return None
    pid = info.get("pid")
    if isinstance(pid, bool) or not isinstance(pid, int) or pid <= 0:
        return None
    return info


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
        self._fd: int | None = None

    def _refuse(self, holder: dict | None) -> WorkdirLockedError:
        h = holder or {}
        return WorkdirLockedError(
            f"{self.path.parent} is in use by another trainer (host {h.get('host', '?')}, "
            f"pid {h.get('pid', '?')}, started {h.get('started', '?')}); wait for it to "
            f"finish, or delete {self.path} if you are sure it is not running"
        )

    def _open(self) -> tuple[int, bool]:
        """(fd, created) of the lock file, creating it if absent."""
        while True:
            try:
                return os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644), True
            except FileExistsError:
                pass
            try:
                return os.open(self.path, os.O_RDWR), False
            except FileNotFoundError:
                continue  # released meanwhile

    def _open_locked(self) -> tuple[int, bool] | None:
        """(fd holding the exclusive flock, created); None if a live process holds it."""
        for _ in range(100):
            fd, created = self._open()
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                return None
            try:  # the path may have been unlinked (released) and recreated meanwhile
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                return fd, created
            os.close(fd)
        raise WorkdirLockedError(f"could not take the lock {self.path} (it keeps changing)")

    def _read_holder(self) -> dict | None:
        """The current holder's record, waiting briefly for a winner that is still writing it."""
        for _ in range(50):
            try:
                info = _parse(self.path.read_text())
            except OSError:
                info = None
            if info is not None and info.get("pid") != os.getpid():
                return info
            time.sleep(0.02)
        return None

    def _check_stale(self, text: str) -> None:
        """Allow taking over an unlocked lock file's record (warning if stale), else raise."""
        holder = _parse(text)
        if holder is None:
            warnings.warn(f"taking over the unreadable lock {self.path} ({text[:80]!r}): a "
                          "trainer was stopped while writing it", stacklevel=4)  # fmt: skip
            return
        here, pid = holder["host"] == self.info["host"], holder["pid"]
        if here and pid == os.getpid():
            return
        if here and not _alive(pid):
            warnings.warn(
                f"taking over the stale lock {self.path} of pid {pid} (no longer running, "
                f"started {holder.get('started')})",
                stacklevel=4,
            )
            return
        raise self._refuse(holder)

    def _write(self, fd: int) -> None:
        """Replace the file's content with this process's record (the flock is held)."""
        data = json.dumps(self.info).encode()
        os.ftruncate(fd, 0)
        os.pwrite(fd, data, 0)
        os.fsync(fd)

    def acquire(self) -> None:
        """Take the lock, taking over a stale one; raise WorkdirLockedError if held."""
        opened = self._open_locked()
        if opened is None:
            raise self._refuse(self._read_holder())
        fd, created = opened
        try:
            with open(fd, closefd=False) as f:
                text = f.read()
            if not created:
                self._check_stale(text)
            self._write(fd)
        except BaseException:
            os.close(fd)
            raise
        self._fd, self.held = fd, True

    def release(self) -> None:
        """Remove the lock file and drop the flock if this process holds it."""
        if self.held and self._fd is not None:
            self.path.unlink(missing_ok=True)  # unlink first: a waiter re-checks the inode
            os.close(self._fd)
        self._fd, self.held = None, False

    def __enter__(self) -> WorkdirLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()
