"""`resolver serve` as a real process for tests: started on a blueprint, its announce line read, stopped with SIGTERM
(it must exit 0), its stderr kept in a file for the test to read."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


class Announced(str):
    """The serve command's first line ("resolver: serving on HOST:PORT (...)"), with what tests read from it."""

    def after(self, marker: str) -> str:
        """The word after `marker` (`after("metrics on ")` -> the URL), trailing `,` and `)` dropped."""
        assert marker in self, self
        return self.split(marker, 1)[1].split()[0].rstrip(",)")

    @property
    def port(self) -> int:
        return int(self.after("serving on 127.0.0.1:"))


@contextmanager
def serving(config: Path, data: Path, stderr: Path, *, workers: int | None = None,
            env: Mapping[str, str] | None = None) -> Iterator[Announced]:
    """Serve `data` under the blueprint `config` on 127.0.0.1:0 until the block ends; its stderr goes to `stderr`."""
    command = [sys.executable, "-m", "resolver", "serve", "--config", str(config), "--data-dir", str(data),
               "--listen", "127.0.0.1:0"] + (["--workers", str(workers)] if workers else [])
    with stderr.open("w") as err:
        proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=err, text=True, cwd=ROOT,
                                env={**os.environ, **(env or {})})
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert "serving on 127.0.0.1:" in line, line + stderr.read_text()
        yield Announced(line)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0, stderr.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        assert proc.stdout is not None
        proc.stdout.close()
