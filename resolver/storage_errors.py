"""Storage errors: what an LMDB error of a write transaction means to a caller, and the commit and abort of the
store's write transactions (resolver.store: `Store.write`, `Store.nested`) that raise it.

The one place that turns storage errors into what a caller is told: a full map or a full disk becomes
resolver.errors.StorageFull (reason MAP_FULL or DISK_FULL), raised from the LMDB error; nothing of the transaction
is stored. Any other LMDB error goes on as it is.
"""

from __future__ import annotations

import os

import lmdb

from resolver.errors import StorageFull

# A commit that fails with this little room left on the filesystem failed for want of room (`storage_full`).
DISK_FULL_MARGIN = 2**20


def storage_full(env: lmdb.Environment, exc: lmdb.Error, *, committing: bool) -> StorageFull | None:
    """The StorageFull that an LMDB error of a write transaction in `env` means, None when it means something else.

    MDB_MAP_FULL (at a put or at the commit): the map is full. ENOSPC at the commit (`committing`: the commit that
    writes the disk): the disk is. LMDB reports a short write of the commit as EIO, not ENOSPC (a filesystem that
    took part of the pages), so an error of the commit without a class of its own, with the filesystem (nearly)
    full, is a full disk too.
    """
    if isinstance(exc, lmdb.MapFullError):
        mb = env.info()["map_size"] // 2**20
        return StorageFull(
            f"the LMDB map is full ([storage] map_size_mb = {mb}): nothing of this write was stored; raise "
            "[storage] map_size_mb in the blueprint (a server takes it when restarted; the data file is sparse: "
            "a larger map costs no disk until it is used)", reason="MAP_FULL", limit="[storage] map_size_mb")
    if not committing or not (isinstance(exc, lmdb.DiskError) or type(exc) is lmdb.Error):
        return None
    try:
        st = os.statvfs(env.path())
    except OSError:
        return None
    free = st.f_bavail * st.f_frsize
    if not isinstance(exc, lmdb.DiskError) and free >= DISK_FULL_MARGIN:
        return None
    return StorageFull(
        f"the disk holding the data directory is full ({free / 2**20:.1f} MiB free): nothing of this write was "
        "stored; free space on that filesystem or grow it: writes resume without a restart", reason="DISK_FULL")


def commit(env: lmdb.Environment, txn: lmdb.Transaction[bytes], *, durable: bool) -> None:
    """Commit `txn` (a failed commit has aborted it); a full map, or with `durable` (a top-level transaction: its
    commit writes the disk; a nested one only merges into its parent) a full disk, raised as StorageFull."""
    try:
        txn.commit()
    except lmdb.Error as error:
        full = storage_full(env, error, committing=durable)
        if full is None:
            raise
        raise full from error


def abort(env: lmdb.Environment, txn: lmdb.Transaction[bytes], exc: object) -> None:
    """Abort `txn`, whose block ended with `exc`: a full map at a put is raised as StorageFull from it; any other
    exception is left to go on as it is."""
    txn.abort()
    if isinstance(exc, lmdb.Error) and (full := storage_full(env, exc, committing=False)) is not None:
        raise full from exc
