"""A lock file per run folder, so that two processes (bench workers, SLURM jobs, hosts sharing a file system) never
train the same run at once.

The lock is taken by hard-linking a unique file to the lock's name: link() is atomic on local file systems and on
NFS (v2 included, where O_EXCL is not), and the link count of the unique file (2) says whether it worked even when
an NFS reply was lost. The file holds `host pid`; the holder refreshes its mtime every HEARTBEAT_S. A lock is stale,
and is broken, when its holder is a dead process of this host, or when it has not been refreshed for STALE_S (a
holder on another host that died or lost its node). Waiters poll.
"""
from __future__ import annotations

import os
import socket
import threading
import time
import uuid
from pathlib import Path

HEARTBEAT_S = 30.0
STALE_S = 300.0
POLL_S = 0.5


class FileLock:
    """`with FileLock(path):` waits for the lock at `path`, holds it (with a heartbeat) and releases it."""

    def __init__(self, path, poll_s: float = POLL_S, stale_s: float = STALE_S):
        self.path = Path(path)
        self.poll_s, self.stale_s = poll_s, stale_s
        self.owner = f"{socket.gethostname()} {os.getpid()} {uuid.uuid4().hex[:8]}\n"
        self._stop = threading.Event()
        self._beat = None
        self._made: list = []       # the folders acquire() created, deepest first

    def __enter__(self) -> "FileLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def acquire(self) -> None:
        mine = self.path.with_name(f"{self.path.name}.{uuid.uuid4().hex}")
        while True:   # another lock's release may remove a folder this one just made: make it again
            self._made = missing_folders(self.path.parent)
            self.path.parent.mkdir(parents=True, exist_ok=True)
            try:
                mine.write_text(self.owner)
                break
            except FileNotFoundError:
                continue
        try:
            while True:
                try:
                    os.link(mine, self.path)
                except OSError:
                    pass   # held by another, or an NFS reply was lost: the link count decides
                if os.stat(mine).st_nlink == 2:
                    break
                holder = self._holder()
                if holder is not None and self._stale(holder):
                    self._break(holder)
                    continue
                self._sweep()
                time.sleep(self.poll_s)
        finally:
            mine.unlink()
        self._stop.clear()
        self._beat = threading.Thread(target=self._heartbeat, daemon=True)
        self._beat.start()

    def release(self) -> None:
        self._stop.set()
        if self._beat is not None:
            self._beat.join()
            self._beat = None
        if self._holder() == self.owner:
            self.path.unlink(missing_ok=True)
        for folder in self._made:   # a lock leaves no folder behind (e.g. a training refused before it wrote)
            try:
                folder.rmdir()
            except OSError:
                break               # not empty: in use

    def _heartbeat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                os.utime(self.path)
            except OSError:
                pass

    def _holder(self):
        return read_owner(self.path)

    def _stale(self, holder: str) -> bool:
        parts = holder.split()
        try:
            age = time.time() - self.path.stat().st_mtime
        except OSError:
            return False   # released meanwhile
        if len(parts) >= 2 and parts[0] == socket.gethostname() and parts[1].isdigit():
            return not alive(int(parts[1])) or age > self.stale_s
        return age > self.stale_s

    def _sweep(self) -> None:
        """Remove the `<lock>.<uuid>` files of killed waiters (a dead process of this host; another host's after
        24 h)."""
        for other in self.path.parent.glob(f"{self.path.name}.*"):
            suffix = other.name[len(self.path.name) + 1:]
            if len(suffix) != 32 or not all(c in "0123456789abcdef" for c in suffix):
                continue
            owner = (read_owner(other) or "").split()
            try:
                age = time.time() - other.stat().st_mtime
            except OSError:
                continue
            mine_host = len(owner) >= 2 and owner[0] == socket.gethostname() and owner[1].isdigit()
            if (mine_host and not alive(int(owner[1])) and age > 1.0) or (not mine_host and age > 86400):
                other.unlink(missing_ok=True)

    def _break(self, holder: str) -> None:
        """Move the stale lock aside; if another waiter took the lock meanwhile, that one is put back."""
        aside = self.path.with_name(f"{self.path.name}.stale.{uuid.uuid4().hex}")
        try:
            os.rename(self.path, aside)
        except OSError:
            return
        try:
            if read_owner(aside) != holder:
                os.link(aside, self.path)
        except OSError:
            pass
        aside.unlink(missing_ok=True)


def read_owner(path: Path):
    """The `host pid uuid` line of a lock file (undecodable bytes replaced: such a lock is judged by its age); None
    when there is no such file."""
    try:
        return path.read_bytes().decode("utf-8", errors="replace")
    except OSError:
        return None


def missing_folders(folder: Path) -> list:
    """`folder` and those of its parents that do not exist yet, deepest first."""
    found = []
    while not folder.exists() and folder != folder.parent:
        found.append(folder)
        folder = folder.parent
    return found


def alive(pid: int) -> bool:
    """Whether process `pid` of this host exists."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
