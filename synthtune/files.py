"""Crash-safe file operations: atomic replaces, directory publishing, and directory locks.

Long jobs get killed (``kill -9``, OOM, preemption, a full disk) at arbitrary moments, and several
ranks or runs may share one cache or output directory. The rules everything here follows:

* a file that already exists is never rewritten in place: the new content goes to a temporary
  file in the same directory (so the rename cannot cross filesystems), is fsynced, and then
  replaces the old one with ``os.replace``; readers see the old file or the new one, never half;
* a directory is built under a unique temporary name and renamed into place when whole, and a
  complete directory that someone else published is never deleted under them;
* a directory a run writes is locked with ``flock``, which the kernel releases when the process
  dies, however it dies, so a crash never leaves a stale lock behind.

This module is POSIX-first: on Windows ``os.replace`` is still atomic, but directories cannot be
fsynced and ``fcntl`` is missing, so locks are skipped there.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

from synthtune.errors import DirectoryInUse

__all__ = ["LOCK_NAME", "DirectoryInUse", "atomic_write_text", "file_lock", "fsync_dir", "lock_dir",
           "publish_dir", "replace_dir"]

#: The lock file :func:`lock_dir` keeps in a locked directory (left in place: see lock_dir).
LOCK_NAME = ".synthtune.lock"


def fsync_dir(directory: str | os.PathLike[str]) -> None:
    """Make renames and new entries in ``directory`` durable (a no-op where dirs can't be opened)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def current_umask() -> int:
    # The only portable way to read the umask is to set it and put it back.
    current = os.umask(0)
    os.umask(current)
    return current


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Replace ``path`` with ``data`` atomically and durably; parent directories are created."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        # mkstemp creates files as 0600; give the result the permissions a plain open() would have.
        mode = path.stat().st_mode & 0o777 if path.exists() else 0o666 & ~current_umask()
        os.chmod(tmp_name, mode)
        os.replace(tmp_name, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_name)
        raise
    fsync_dir(path.parent)


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    """:func:`atomic_write_bytes` for UTF-8 text (newlines written as ``\\n`` on every platform)."""
    atomic_write_bytes(path, text.encode("utf-8"))


def _aside(path: Path, tag: str) -> Path:
    return path.with_name(f".{path.name}.{tag}-{uuid.uuid4().hex[:8]}")


def replace_dir(built: str | os.PathLike[str], target: str | os.PathLike[str]) -> Path:
    """Put the finished directory ``built`` at ``target``, replacing what is there.

    POSIX cannot rename a directory over a non-empty one, so the old one is first renamed aside,
    then ``built`` is renamed in, then the old one is deleted: ``target`` is never a mix of the
    two or half-written, only absent for the instant between the two renames (and a crash right
    there leaves the old copy under ``.NAME.old-*`` next to it, not lost). Both must be on one
    filesystem: build next to the target.
    """
    built, target = Path(built), Path(target)
    old = None
    if target.exists():
        old = _aside(target, "old")
        os.rename(target, old)
    os.rename(built, target)
    fsync_dir(target.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return target


def publish_dir(built: str | os.PathLike[str], target: str | os.PathLike[str],
                is_complete: Callable[[Path], bool]) -> Path:
    """Publish the finished directory ``built`` at ``target`` unless a complete one is there already.

    For caches that several processes (ranks of one job, or separate jobs) fill at once: the first
    complete directory wins and stays; a later builder discards its own copy and never deletes the
    winner, which other processes may be reading. An *incomplete* ``target`` (left by an older
    version that built in place) is moved aside and replaced. Callers serialize builders with
    :func:`file_lock` to save the duplicate work; correctness does not depend on it, since
    ``os.rename`` onto an existing non-empty directory fails instead of replacing it.
    """
    built, target = Path(built), Path(target)
    if is_complete(target):
        shutil.rmtree(built, ignore_errors=True)
        return target
    if target.exists():
        with contextlib.suppress(FileNotFoundError):  # another builder moved it first
            stale = _aside(target, "stale")
            os.rename(target, stale)
            shutil.rmtree(stale, ignore_errors=True)
    try:
        os.rename(built, target)
    except OSError:
        # ENOTEMPTY/EEXIST: someone published between our check and our rename; theirs wins.
        if not is_complete(target):
            raise
        shutil.rmtree(built, ignore_errors=True)
        return target
    fsync_dir(target.parent)
    return target


@contextlib.contextmanager
def file_lock(path: str | os.PathLike[str]) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``path`` (created if absent), waiting for it if needed."""
    try:
        import fcntl
    except ImportError:  # Windows: no flock; publish_dir stays correct without it, only slower
        yield
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing the last descriptor releases the lock


def _holder(path: Path) -> str:
    try:
        info = json.loads(path.read_text(encoding="utf-8") or "{}")
    except (OSError, ValueError):
        info = {}
    if not isinstance(info, dict) or "pid" not in info:
        return "a process whose PID is not recorded yet (it is starting)"
    host = f" on {info['host']}" if info.get("host") and info["host"] != socket.gethostname() else ""
    what = f" ({info['what']}, since {info.get('since', '?')})" if info.get("what") else ""
    return f"PID {info['pid']}{host}{what}"


@contextlib.contextmanager
def lock_dir(directory: str | os.PathLike[str], what: str) -> Iterator[Path]:
    """Lock ``directory`` for one writer; a second one gets :class:`DirectoryInUse` at once.

    The lock is an ``flock`` on ``DIRECTORY/.synthtune.lock``: the kernel drops it when the holder
    exits or is killed (``kill -9`` included), so there is never a stale lock to clean up. The
    holder writes its PID, host and ``what`` into the file for the error message. The file itself
    stays: deleting it on exit would let a waiting process lock the old inode while a new one locks
    a fresh file, and both would think they hold the directory.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / LOCK_NAME
    try:
        import fcntl
    except ImportError:  # Windows: no flock, no lock
        yield path
        return
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise DirectoryInUse(
                f"{directory} is in use by another {what}: {_holder(path)} holds {path}. Wait for it to "
                f"finish or stop it, or use another output directory. (The lock is released when that "
                f"process exits, even if it is killed, so there is nothing to delete.)") from None
        info = {"pid": os.getpid(), "host": socket.gethostname(), "what": what,
                "since": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
        yield path
    finally:
        os.close(fd)
