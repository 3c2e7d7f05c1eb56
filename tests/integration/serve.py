"""`resolver serve` as a real process for tests: started on a blueprint, its announce line read, stopped with SIGTERM
(it must exit 0), its stderr kept in a file for the test to read."""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
START_TIMEOUT_S = 120.0


class Announced(str):
    """The serve command's first line ("resolver: serving on HOST:PORT (...)"), with what tests read from it."""

    def after(self, marker: str) -> str:
        """The word after `marker` (`after("metrics on ")` -> the URL), trailing `,` and `)` dropped."""
        assert marker in self, self
        return self.split(marker, 1)[1].split()[0].rstrip(",)")

    @property
    def port(self) -> int:
        return int(self.after("serving on 127.0.0.1:"))


class Launched:
    """A started `resolver serve` process: its announce line and the process, for tests that kill it themselves."""

    def __init__(self, proc: subprocess.Popen[str], announced: Announced) -> None:
        self.proc = proc
        self.announced = announced

    @property
    def port(self) -> int:
        return self.announced.port

    def kill(self) -> None:
        """kill -9 the supervisor and every process of its group (workers, events, outbound): a power cut. Also
        what ends a served process that already exited: its group's children may still run."""
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(timeout=30)
        if self.proc.stdout is not None:
            self.proc.stdout.close()

    def terminate(self, timeout: float = 60) -> int:
        """SIGTERM, then the exit code (kill -9 after `timeout`)."""
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=timeout)
        finally:
            if self.proc.poll() is None:
                self.kill()
            elif self.proc.stdout is not None:
                self.proc.stdout.close()


def launch(config: Path | None, data: Path, stderr: Path, *, workers: int | None = None,
           env: Mapping[str, str] | None = None, extra: tuple[str, ...] = ()) -> Launched:
    """Start `resolver serve` on 127.0.0.1:0 (`config` None: without a blueprint, the defaults) in its own process
    group and wait for its announce line; its stderr is appended to the file `stderr`."""
    command = [sys.executable, "-m", "resolver", "serve", *(["--config", str(config)] if config else []),
               "--data-dir", str(data), "--listen", "127.0.0.1:0", *extra] + (["--workers", str(workers)] if workers else [])
    with stderr.open("a") as err:
        proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=err, text=True, cwd=ROOT,
                                env={**os.environ, **(env or {})}, start_new_session=True)
    assert proc.stdout is not None
    # bounded: a server that hangs before announcing itself fails the test instead of holding the suite
    ready = select.select([proc.stdout], [], [], START_TIMEOUT_S)[0]
    line = proc.stdout.readline() if ready else f"(no announce line within {START_TIMEOUT_S:g} s)\n"
    if "serving on 127.0.0.1:" not in line:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        proc.stdout.close()
        raise AssertionError(line + stderr.read_text())
    return Launched(proc, Announced(line))


@contextmanager
def launched(config: Path | None, data: Path, stderr: Path, *, workers: int | None = None,
             env: Mapping[str, str] | None = None, extra: tuple[str, ...] = ()) -> Iterator[Launched]:
    """`launch`, and kill -9 of the whole group at the end of the block if the test left it running."""
    server = launch(config, data, stderr, workers=workers, env=env, extra=extra)
    try:
        yield server
    finally:
        server.kill()


@contextmanager
def serving(config: Path, data: Path, stderr: Path, *, workers: int | None = None,
            env: Mapping[str, str] | None = None) -> Iterator[Announced]:
    """Serve `data` under the blueprint `config` on 127.0.0.1:0 until the block ends, which must stop it with
    SIGTERM and exit 0; its stderr goes to `stderr`."""
    with launched(config, data, stderr, workers=workers, env=env) as server:
        yield server.announced
        assert server.terminate() == 0, stderr.read_text()
