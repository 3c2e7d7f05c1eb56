"""A filesystem of a few MB for the full-disk test, and `resolver` commands run where it is mounted.

First choice, no root needed: a tmpfs mounted in a private user + mount namespace (`unshare --user --map-root-user
--mount`), held by a keeper process (`cat`, ended by closing its stdin: the namespace and the tmpfs go with the last
process in it). Commands run inside it through `nsenter`; this process reaches its files through
/proc/KEEPER/root/..., the keeper's view of the filesystem. Fallback, as root where user namespaces are off: a plain
`mount -t tmpfs` in this namespace, unmounted at the end. Neither: the test fails, saying why (never a skip).
"""

from __future__ import annotations

import os
import select
import shutil
import subprocess
import sys
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.integration.serve import ROOT, Announced, Launched

MOUNT_TIMEOUT_S = 20.0


@dataclass(frozen=True)
class SmallDisk:
    """A mounted tmpfs: `inside` is its path for commands run with `prefix`, `outside` the same directory for this
    process; `how` says which way it was made (for the report)."""

    inside: Path
    outside: Path
    prefix: tuple[str, ...]
    how: str

    def free_bytes(self) -> int:
        st = os.statvfs(self.outside)
        return st.f_bavail * st.f_frsize

    def size_bytes(self) -> int:
        st = os.statvfs(self.outside)
        return st.f_blocks * st.f_frsize

    def run(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        """`python -m resolver ARGS` where the tmpfs is mounted."""
        return subprocess.run([*self.prefix, sys.executable, "-m", "resolver", *args], capture_output=True, text=True,
                              cwd=ROOT, timeout=timeout)

    def launch(self, config: Path, data: Path, stderr: Path, *, env: Mapping[str, str] | None = None) -> Launched:
        """`resolver serve` on 127.0.0.1:0 (the network is shared) with its data directory `data` (an `inside`
        path), in its own process group; waits for its announce line (as tests.integration.serve.launch)."""
        command = [*self.prefix, sys.executable, "-m", "resolver", "serve", "--config", str(config), "--data-dir",
                   str(data), "--listen", "127.0.0.1:0"]
        with stderr.open("a") as err:
            proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=err, text=True, cwd=ROOT,
                                    env={**os.environ, **(env or {})}, start_new_session=True)
        assert proc.stdout is not None
        line = proc.stdout.readline()
        if "serving on 127.0.0.1:" not in line:
            Launched(proc, Announced(line)).kill()
            raise AssertionError(line + stderr.read_text())
        return Launched(proc, Announced(line))


def _ready(proc: subprocess.Popen[str], timeout: float) -> bool:
    """Whether the keeper printed "mounted" within `timeout` seconds."""
    assert proc.stdout is not None
    readable, _, _ = select.select([proc.stdout], [], [], timeout)
    return bool(readable) and proc.stdout.readline().strip() == "mounted"


def _stop_keeper(proc: subprocess.Popen[str]) -> None:
    for stream in (proc.stdin, proc.stdout):
        if stream is not None:
            stream.close()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=10)


@contextmanager
def _in_namespace(mountpoint: Path, size_mb: int) -> Iterator[SmallDisk | str]:
    """The tmpfs in a user + mount namespace of its own, or why it could not be made."""
    unshare, nsenter = shutil.which("unshare"), shutil.which("nsenter")
    if unshare is None or nsenter is None:
        yield "unshare/nsenter not installed (util-linux)"
        return
    script = 'mount -t tmpfs -o size="$1"m tmpfs "$0" && echo mounted && exec cat'
    keeper = subprocess.Popen([unshare, "--user", "--map-root-user", "--mount", "--", "sh", "-c", script,
                               str(mountpoint), str(size_mb)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    try:
        if not _ready(keeper, MOUNT_TIMEOUT_S):
            _stop_keeper(keeper)
            assert keeper.stderr is not None
            yield f"unshare --user --map-root-user --mount failed: {keeper.stderr.read().strip() or 'no answer'}"
            return
        prefix = (nsenter, "--target", str(keeper.pid), "--user", "--mount", "--preserve-credentials", "--")
        yield SmallDisk(mountpoint, Path(f"/proc/{keeper.pid}/root") / mountpoint.relative_to("/"), prefix,
                        "a tmpfs in a user+mount namespace (unshare, no root)")
    finally:
        if keeper.poll() is None:
            _stop_keeper(keeper)
        if keeper.stderr is not None:
            keeper.stderr.close()


@contextmanager
def _as_root(mountpoint: Path, size_mb: int) -> Iterator[SmallDisk | str]:
    """The tmpfs mounted in this namespace (root only), or why it could not be."""
    if os.geteuid() != 0:
        yield "not root, so no plain mount either"
        return
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_mb}m", "tmpfs", str(mountpoint)],
                          capture_output=True, text=True, timeout=MOUNT_TIMEOUT_S)
    if done.returncode != 0:
        yield f"mount -t tmpfs failed: {done.stderr.strip()}"
        return
    try:
        yield SmallDisk(mountpoint, mountpoint, (), "a tmpfs mounted as root")
    finally:
        subprocess.run(["umount", "-l", str(mountpoint)], capture_output=True, timeout=MOUNT_TIMEOUT_S)


@contextmanager
def small_disk(mountpoint: Path, size_mb: int) -> Iterator[SmallDisk]:
    """A tmpfs of `size_mb` MB at `mountpoint` (an existing empty directory) for the block; pytest.fail when no
    way to mount one works here."""
    mountpoint.mkdir(parents=True, exist_ok=True)
    with _in_namespace(mountpoint, size_mb) as disk:
        if isinstance(disk, SmallDisk):
            yield disk
            return
        why = [disk]
    with _as_root(mountpoint, size_mb) as disk:
        if isinstance(disk, SmallDisk):
            yield disk
            return
        why.append(disk)
    pytest.fail("the full-disk test needs a small filesystem and could not mount one: " + "; ".join(why)
                + ". Allow unprivileged user namespaces (sysctl kernel.unprivileged_userns_clone=1, "
                "user.max_user_namespaces > 0) or run the suite as root.", pytrace=False)
