"""A throwaway PostgreSQL 15 cluster on 127.0.0.1: install (apt-get) if missing, initdb, start, stop.

    python -m bench.peers.postgres.cluster start DIR   # prints the DSN; DIR is created (owned by postgres)
    python -m bench.peers.postgres.cluster stop DIR

We run as root, so the server runs as the `postgres` user (created by the Debian package). fsync is off: the
cluster holds nothing but benchmark data that is reloaded on every run, and only reads are measured.
"""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

BIN = Path("/usr/lib/postgresql/15/bin")
USER = "postgres"


def ensure_installed() -> None:
    """apt-get install postgresql-15 when its binaries are missing (Debian 12 ships 15)."""
    if (BIN / "initdb").exists():
        return
    env = os.environ | {"DEBIAN_FRONTEND": "noninteractive"}
    sudo = [] if os.geteuid() == 0 else ["sudo"]
    install = [*sudo, "apt-get", "install", "-y", "-q", "--no-install-recommends", "postgresql-15"]
    if subprocess.run(install, env=env).returncode != 0:
        subprocess.run([*sudo, "apt-get", "update", "-q"], env=env, check=True)
        subprocess.run(install, env=env, check=True)
    if not (BIN / "initdb").exists():
        raise RuntimeError(f"postgresql-15 installed but {BIN / 'initdb'} is missing")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _as_postgres(cmd: list[str]) -> subprocess.CompletedProcess[str]:
    if os.geteuid() == 0:
        cmd = ["runuser", "-u", USER, "--", *cmd]
    return subprocess.run(cmd, check=True, capture_output=True, text=True)


def dsn(directory: Path) -> str:
    port = (directory / "port").read_text().strip()
    return f"host=127.0.0.1 port={port} user={USER} dbname=postgres"


def start(directory: Path, *, shared_buffers: str = "1GB") -> str:
    """Create (fresh) and start a cluster in `directory`; return its DSN."""
    ensure_installed()
    stop(directory)
    if directory.exists():
        shutil.rmtree(directory)
    directory.mkdir(parents=True)
    pg = pwd.getpwnam(USER) if os.geteuid() == 0 else None
    if pg is not None:
        os.chown(directory, pg.pw_uid, pg.pw_gid)
        for parent in directory.resolve().parents:  # postgres must be able to reach the directory
            if parent.stat().st_mode & 0o001 == 0:
                raise RuntimeError(f"{parent} is not traversable by {USER}: pick a directory under /tmp")
    data = directory / "pgdata"
    _as_postgres([str(BIN / "initdb"), "-D", str(data), "-A", "trust", "-U", USER, "--no-sync", "-E", "UTF8"])
    port = free_port()
    (directory / "port").write_text(str(port))
    opts = (f"-c listen_addresses=127.0.0.1 -c port={port} -c unix_socket_directories={directory} -c fsync=off "
            f"-c synchronous_commit=off -c full_page_writes=off -c shared_buffers={shared_buffers} "
            "-c max_connections=200 -c jit=off")
    _as_postgres([str(BIN / "pg_ctl"), "-D", str(data), "-l", str(directory / "postgres.log"), "-o", opts, "-w", "start"])
    return dsn(directory)


def stop(directory: Path) -> None:
    data = directory / "pgdata"
    if (data / "postmaster.pid").exists():
        try:
            _as_postgres([str(BIN / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop"])
        except subprocess.CalledProcessError:
            time.sleep(1)


def main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[0] not in ("start", "stop"):
        print(__doc__, file=sys.stderr)
        return 2
    directory = Path(argv[1])
    if argv[0] == "start":
        print(start(directory))
    else:
        stop(directory)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
