"""The dataset, the imported data directory and one `resolver serve` per variant."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from bench import procstat
from bench.run import Proc

ROOT = Path(__file__).resolve().parents[2]
PY = sys.executable


def log(msg: str) -> None:
    print(f"[wvr {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# -- data ------------------------------------------------------------------------------------------------------


def prepare(work: Path, customers: int, config: str) -> tuple[Path, Path]:
    """The dataset and an imported data directory under `work` (made once, reused)."""
    ds, data = work / "dataset", work / "data"
    if not (ds / "dataset.json").exists():
        from bench.dataset import generate

        log(f"dataset: {customers} customers -> {ds}")
        generate(ds, customers, 50_000, 20_000)
    if not (data / "data.mdb").exists() or not (work / "imported").exists():
        shutil.rmtree(data, ignore_errors=True)
        log(f"resolver import -> {data} (a few minutes)")
        subprocess.run([str(Path(PY).parent / "resolver"), "import", str(ds / "customers.jsonl"), "--config",
                        config, "--data-dir", str(data), "--no-progress"], cwd=ROOT, check=True)
        (work / "imported").write_text("ok\n")
    return ds, data


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# -- servers ---------------------------------------------------------------------------------------------------


@dataclass
class Variant:
    name: str
    tree: str = ""
    preload: str = ""
    env: dict[str, str] = field(default_factory=dict)
    workers: int = 0

    @classmethod
    def parse(cls, spec: str) -> Variant:
        name, _, rest = spec.partition(":")
        v = cls(name)
        for item in filter(None, rest.split(";")):
            k, _, val = item.partition("=")
            if k == "tree":
                v.tree = val
            elif k == "preload":
                v.preload = val
            elif k.startswith("env."):
                v.env[k[4:]] = val
            elif k == "workers":
                v.workers = int(val)
            else:
                raise SystemExit(f"unknown variant key {k!r} in {spec!r}")
        return v


class Server:
    """One `resolver serve` of a variant, on its own copy of the data; stopped with SIGTERM at the end."""

    def __init__(self, v: Variant, work: Path, data: Path, config: str) -> None:
        self.v = v
        vdir = work / "variants" / v.name
        self.data = vdir / "data"
        if self.data.exists():
            shutil.rmtree(self.data)
        self.data.mkdir(parents=True)
        for f in ("data.mdb",):
            subprocess.run(["cp", "--sparse=always", str(data / f), str(self.data / f)], check=True)
            # write the copy back now: left dirty, the server's first synced commit (fdatasync of the whole file)
            # would flush hundreds of MB and stall every call for ~1.5 s (seen: 90-210 MB/s pgpgout in the first
            # mixed window, Resolve p99 1.2-1.3 s, before this fsync was added)
            fd = os.open(self.data / f, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        text = Path(config).read_text()
        text = re.sub(r'(?m)^http_listen\s*=.*$', f'http_listen = "127.0.0.1:{free_port()}"', text)
        self.config = vdir / "blueprint.toml"
        self.config.write_text(text)
        self.port = free_port()
        env = dict(os.environ)
        if v.tree:
            env["PYTHONPATH"] = v.tree + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        if v.preload:
            env["LD_PRELOAD"] = v.preload
        env.update(v.env)
        cmd = [PY, "-m", "resolver", "serve", "--config", str(self.config), "--data-dir", str(self.data),
               "--listen", f"127.0.0.1:{self.port}"]
        if v.workers:
            cmd += ["--workers", str(v.workers)]
        self.logfile = vdir / "server.log"
        self.proc = Proc(cmd, "serving on", self.logfile, env=env, cwd=v.tree or ROOT)
        self.p = self.proc.p

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.proc.stop()


def pin(server_pid: int) -> None:
    """Every thread of the server's process tree on CPU 0; this process (and the clients it starts) on CPU 1."""
    for pid in procstat.tree(server_pid, procstat.snapshot()):
        for task in Path(f"/proc/{pid}/task").iterdir():
            os.sched_setaffinity(int(task.name), {0})
    os.sched_setaffinity(0, {1})
