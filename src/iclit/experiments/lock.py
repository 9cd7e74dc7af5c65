"""One writer per run directory: a lock file created atomically (``O_CREAT | O_EXCL``).

``RUN/.iclit.lock`` holds the holder's host, pid, start time and command as JSON. A second
process that wants to write ``RUN`` (``iclit run``, ``iclit merge``) finds the file and is
refused with :class:`RunLocked`, which names the holder, before it does any work. A lock left
by a process that was killed (same host, pid no longer alive, or a zombie) is stale: it is
taken over under a short-lived takeover file (also ``O_EXCL``), so two processes that find the
same stale lock never both win. A lock of another host is never taken over (its pid means
nothing here): the message says how to remove it by hand.

Shards (``iclit run … --shard I/N``) lock their own directory (``RUN/shards/I-of-N``), never
``RUN`` itself, so the shards of a run need no locking between them.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

__all__ = ["LOCK_NAME", "RunDirError", "RunLocked", "RunLock", "lock_holder"]

LOCK_NAME = ".iclit.lock"
_TAKEOVER_STALE_S = 60.0
"""A takeover file older than this was left by a process killed while taking a lock over."""


class RunDirError(ValueError):
    """A run directory that is a file, or cannot be created or written."""


class RunLocked(RuntimeError):
    """The run directory is being written by another live process (named in the message)."""


def _pid_alive(pid: int) -> bool:
    """The process ``pid`` of this host runs (a zombie, killed but not yet reaped, does not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def lock_holder(run_dir: str | Path) -> dict[str, Any] | None:
    """What the lock file of ``run_dir`` says of its holder (host, pid, started, command);
    None when there is no lock; ``{}`` when the file cannot be read as one."""
    path = Path(run_dir) / LOCK_NAME
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except OSError:
        return {}
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        return {}
    return data if isinstance(data, dict) else {}


def _describe(holder: dict[str, Any]) -> str:
    if not holder:
        return "an unreadable lock file (a process killed while writing it)"
    return f"host {holder.get('host', '?')}, pid {holder.get('pid', '?')}, started {holder.get('started', '?')}" + (
        f" ({holder['command']})" if holder.get("command") else ""
    )


def _is_stale(holder: dict[str, Any], age: float) -> bool:
    if not holder:  # a lock file never filled in: stale once the writer had ample time
        return age > _TAKEOVER_STALE_S
    if holder.get("host") != socket.gethostname():
        return False
    pid = holder.get("pid")
    return isinstance(pid, int) and not _pid_alive(pid)


@dataclass
class RunLock:
    """The lock on one run directory, held by this process until :meth:`release`.

    Example (not run: it needs a model or a run directory)::

        with RunLock.acquire("runs/smoke"):
            ...   # write the run directory

    """

    path: Path
    token: str
    created: list[Path] = field(default_factory=list)
    """Directories :meth:`acquire` created (deepest last); :meth:`release` removes those left empty."""

    @classmethod
    def acquire(cls, run_dir: str | Path) -> RunLock:
        """Create ``run_dir`` (and its parents) if needed and take its lock.

        Raises :class:`RunLocked` naming the live holder, or :class:`RunDirError` when the
        directory cannot be created or written (nothing is left behind).
        """
        run_dir = Path(run_dir)
        created = _make_dirs(run_dir)
        lock = cls(run_dir / LOCK_NAME, f"{socket.gethostname()}:{os.getpid()}:{time.time_ns()}", created)
        try:
            lock._take()
        except BaseException:
            lock._remove_created()
            raise
        return lock

    def _take(self) -> None:
        record = {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "started": datetime.now(UTC).isoformat(timespec="seconds"),
            "command": " ".join(Path(a).name if i == 0 else a for i, a in enumerate(sys.argv))[:300],
            "token": self.token,
        }
        for _ in range(3):
            if self._create(record):
                return
            holder = lock_holder(self.path.parent)
            if holder is None:  # released meanwhile: try again
                continue
            try:
                age = time.time() - self.path.stat().st_mtime
            except FileNotFoundError:
                continue
            if not _is_stale(holder, age):
                hint = (
                    "wait for it to finish"
                    if holder.get("host") == socket.gethostname() or not holder
                    else f"if that process is gone, remove {self.path}"
                )
                raise RunLocked(
                    f"{self.path.parent}: is being written by another iclit process: {_describe(holder)}; "
                    f"{hint} (or choose another --out)"
                )
            self._take_over(holder)
        raise RunLocked(f"{self.path.parent}: could not take the lock {self.path} (other processes keep taking it)")

    def _create(self, record: dict[str, Any]) -> bool:
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        except OSError as e:
            raise RunDirError(f"{self.path.parent}: cannot write the run directory ({e.strerror or e})") from e
        try:
            os.write(fd, json.dumps(record).encode("utf-8"))
            os.fsync(fd)
        finally:
            os.close(fd)
        return True

    def _take_over(self, stale: dict[str, Any]) -> None:
        """Remove a stale lock, under a takeover file so that only one process removes it."""
        guard = self.path.with_name(LOCK_NAME + ".takeover")
        try:
            fd = os.open(guard, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                if time.time() - guard.stat().st_mtime > _TAKEOVER_STALE_S:
                    guard.unlink(missing_ok=True)
            except FileNotFoundError:
                pass
            time.sleep(0.05)
            return
        os.close(fd)
        try:
            if lock_holder(self.path.parent) == stale:  # still the same stale lock
                self.path.unlink(missing_ok=True)
        finally:
            guard.unlink(missing_ok=True)

    def release(self) -> None:
        """Remove the lock if it is still this process's, and the directories :meth:`acquire`
        created that are still empty."""
        holder = lock_holder(self.path.parent)
        if holder and holder.get("token") == self.token:
            self.path.unlink(missing_ok=True)
        self._remove_created()

    def _remove_created(self) -> None:
        for d in reversed(self.created):
            try:
                d.rmdir()
            except OSError:  # not empty (the run wrote there) or gone
                break
        self.created = []

    def __enter__(self) -> RunLock:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()


def _make_dirs(run_dir: Path) -> list[Path]:
    """Create ``run_dir`` and missing parents; the ones created, outermost first."""
    missing: list[Path] = []
    here = run_dir
    while not here.exists():
        missing.append(here)
        if here.parent == here:
            break
        here = here.parent
    if run_dir.exists() and not run_dir.is_dir():
        raise RunDirError(
            f"{run_dir}: exists and is not a directory (a run directory is a folder; choose another --out)"
        )
    created: list[Path] = []
    for d in reversed(missing):
        try:
            d.mkdir()
        except FileExistsError:
            continue
        except OSError as e:
            for c in reversed(created):
                try:
                    c.rmdir()
                except OSError:
                    break
            raise RunDirError(f"{run_dir}: cannot be created ({e.strerror or e}: {d}); choose another --out") from e
        created.append(d)
    return created
