"""Who is using a data directory: the locks `resolver compact` takes before it may replace data.mdb.

Replacing data.mdb under a process that has the LMDB environment open would split the store: that process
keeps reading and writing the old file (its mmap and descriptor), every later one the new file. So `compact`
makes sure no process has the environment open, and keeps it so until the new file is in place. Two locks:

1. `serve.lock`, a flock: the parent of `resolver serve` holds it shared for its lifetime (several servers may
   share a directory); `compact` takes it exclusive without waiting. While a server runs, compact refuses; while
   compact runs, a server refuses to start. Each says why in one sentence.
2. LMDB's own lock file: every process with the environment open holds a shared fcntl lock on byte 0 of
   lock.mdb from open to close (LMDB's first-opener protocol, `mdb_env_excl_lock`). That covers what
   serve.lock cannot see: `import`, `check`, `dlq`, workers left behind by a killed supervisor, a server built in
   a process of its own (tests, embedding), a Python shell. We query and take it as an open file description
   lock (F_OFD_*, Linux; the POSIX calls elsewhere). While `replacing` holds it exclusive, a process opening
   the environment waits inside LMDB; lock.mdb is emptied before the lock is released, so that process then
   fails to open (LMDB cannot map an empty lock file) instead of running on the old file or on a lock file
   nobody else uses. This process's own opens are found in /proc/self/fd (Linux; elsewhere they go unseen),
   never by opening lock.mdb: closing any descriptor of a file drops every POSIX lock the process holds on it,
   LMDB's included.

Not LMDB's reader table (`Environment.readers()`): it lists processes that hold a reader slot, so a process
that has the environment open and has only written, or not read yet, is missing from it; and the slot of a
reader that crashed stays listed until `reader_check`.
"""

from __future__ import annotations

import fcntl
import logging
import os
import shutil
import struct
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from resolver.errors import StoreError

LOCK_FILE = "serve.lock"
LMDB_LOCK_FILE = "lock.mdb"
# What a rewrite builds inside the data directory before renaming it over data.mdb: `resolver compact`'s copy and
# an initial load's (resolver.importer.staged). One left by a process that was killed is removed by whoever next
# takes serve.lock, shared or exclusive: while either is held, no rewrite runs.
COPY_PREFIXES = (".compact-", ".load-")

log = logging.getLogger("resolver.datalock")

_GETLK = getattr(fcntl, "F_OFD_GETLK", fcntl.F_GETLK)
_SETLK = getattr(fcntl, "F_OFD_SETLK", fcntl.F_SETLK)
# struct flock {short l_type, l_whence; off_t l_start, l_len; pid_t l_pid;}, padded as the C compiler pads it
_FLOCK = struct.Struct("@hhqqi")
_FLOCK_PAD = b"\0" * (-_FLOCK.size % 8)


@contextmanager
def serving(data_dir: Path, *, then: str = "start the server") -> Iterator[None]:
    """Held by `resolver serve` while it runs, and by `resolver backup` while it copies (shared: they do not
    exclude each other). StoreError if `resolver compact` is rewriting the store (`then` says what to do after)."""
    fd = _open(Path(data_dir) / LOCK_FILE, os.O_RDONLY, mkdir=True)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            raise StoreError(f"{data_dir} is being rewritten (by `resolver compact`, `reindex` or an initial load): "
                             f"{then} once it has finished") from None
        _remove_left_copies(Path(data_dir))
        yield
    finally:
        os.close(fd)


@contextmanager
def exclusive(data_dir: Path, *, doing: str = "compacting") -> Iterator[None]:
    """Held by `resolver compact` (and `reindex`): no server runs on `data_dir`, and none starts, while it is
    held. StoreError if a server runs (`doing` names the command's work in the message)."""
    fd = _open(Path(data_dir) / LOCK_FILE, os.O_RDONLY, mkdir=False)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise StoreError(f"{data_dir} is in use by a running server (`resolver serve`): "
                             f"stop it before {doing}") from None
        _remove_left_copies(Path(data_dir))
        yield
    finally:
        os.close(fd)


def _remove_left_copies(data_dir: Path) -> None:
    """Remove the copies (COPY_PREFIXES) a killed rewrite left in `data_dir`; the caller holds serve.lock."""
    for prefix in COPY_PREFIXES:
        for left in data_dir.glob(prefix + "*"):
            try:
                size = sum(f.stat().st_size for f in left.iterdir() if f.is_file())
            except OSError:
                continue  # removed meanwhile by another process holding the lock shared
            shutil.rmtree(left, ignore_errors=True)
            log.warning("removed %s (%d MB), left by a `resolver compact` or initial load that was stopped",
                        left, size >> 20)


def refuse_if_open(data_dir: Path) -> None:
    """StoreError, in one sentence, if any process (this one included) has the LMDB environment in `data_dir`
    open. A snapshot: `replacing` is what keeps it so."""
    path = Path(data_dir) / LMDB_LOCK_FILE
    if _open_here(path):
        raise StoreError(_in_use(data_dir, os.getpid()))
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return  # LMDB makes it on open: nobody has the environment open
    try:
        pid = _holder(fd)
    finally:
        os.close(fd)
    if pid is not None:
        raise StoreError(_in_use(data_dir, pid))


@contextmanager
def replacing(data_dir: Path, *, doing: str = "compacting") -> Iterator[None]:
    """Keep every process out of the LMDB environment while its data.mdb is replaced (StoreError at once if one
    has it open). On leaving, whatever happened inside, lock.mdb is emptied and removed: the next open makes a new
    one, and a process that waited on the lock fails to open rather than trust a lock file that may describe
    the file replaced. `resolver reindex` holds it while it rewrites the store in place (opened without LMDB's
    lock: no other process can be in it)."""
    path = Path(data_dir) / LMDB_LOCK_FILE
    if _open_here(path):
        raise StoreError(_in_use(data_dir, os.getpid(), doing))
    fd = _open(path, os.O_RDWR, mkdir=False)  # created if missing: an opener would otherwise slip past us
    try:
        try:
            fcntl.fcntl(fd, _SETLK, _FLOCK.pack(fcntl.F_WRLCK, os.SEEK_SET, 0, 1, 0) + _FLOCK_PAD)
        except (BlockingIOError, PermissionError):  # EAGAIN or EACCES: a shared lock is held
            raise StoreError(_in_use(data_dir, _holder(fd), doing)) from None
        try:
            yield
        finally:
            os.ftruncate(fd, 0)
            path.unlink(missing_ok=True)
            sync_dir(Path(data_dir))
    finally:
        os.close(fd)


def sync_dir(path: Path) -> None:
    """fsync a directory, so that a rename or unlink in it survives a crash."""
    _sync(path, os.O_RDONLY | os.O_DIRECTORY)


def sync_file(path: Path) -> None:
    """fsync a file written by another handle (an LMDB copy), before it is renamed into place."""
    _sync(path, os.O_RDONLY)


def _sync(path: Path, flags: int) -> None:
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _open_here(path: Path) -> bool:
    """Whether this process has `path` open (Linux: its descriptors in /proc/self/fd; elsewhere False)."""
    try:
        target = os.stat(path)
        fds = os.listdir("/proc/self/fd")
    except FileNotFoundError:
        return False
    for fd in fds:
        try:
            st = os.stat(f"/proc/self/fd/{fd}")
        except OSError:  # closed since, or the listing's own descriptor
            continue
        if (st.st_dev, st.st_ino) == (target.st_dev, target.st_ino):
            return True
    return False


def _holder(fd: int) -> int | None:
    """Who holds a lock on byte 0 of the lock file open as `fd` that excludes a write lock (None: nobody)."""
    probe = fcntl.fcntl(fd, _GETLK, _FLOCK.pack(fcntl.F_WRLCK, os.SEEK_SET, 0, 1, 0) + _FLOCK_PAD)
    kind, _, _, _, pid = _FLOCK.unpack_from(probe)
    if kind == fcntl.F_UNLCK:
        return None
    return pid


def _in_use(data_dir: Path, pid: int | None, doing: str = "compacting") -> str:
    who = "this process" if pid == os.getpid() else f"process {pid}" if pid and pid > 0 else "another process"
    return f"{data_dir} is in use by {who}, which has the store open: stop it before {doing}"


def _open(path: Path, mode: int, *, mkdir: bool) -> int:
    """Open (creating) a lock file. flock needs no write access: serve.lock opens read-only, so a server
    running as another user than the compact that made it can still take it."""
    if mkdir:
        path.parent.mkdir(parents=True, exist_ok=True)
    return os.open(path, mode | os.O_CREAT, 0o644)
