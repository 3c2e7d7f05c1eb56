"""Worker processes for a JSON-lines file: each reads its own blocks of the file and sends back what it made of
them through a pipe of its own, which the parent's main thread reads, in file order.

Why not a multiprocessing.Pool: a Pool pickles each block into a worker's pipe and has two threads of the parent
move the tasks and the results, and those threads take the parent's GIL from the one thread the import waits on
(the parent applies the rows in its single write transaction: it is the narrowest stage; bench/README.md, the
import). Here a task is three integers (the block's first line, offset and size in the file: a worker reads the
bytes itself with pread), block k goes to worker k mod N, and the parent reads result k from that worker's pipe
when it needs it: no thread in the parent, and a block's bytes cross no pipe. A task never blocks the parent (a
pipe holds thousands of them). A worker hands each result to a sender thread of its own and goes on with the next
block: a result pipe holds about one result, and the parent reads none while it commits (a second or more at a
time), so a worker that wrote its results itself would stop until the parent came back, and the parent would
then wait for it. How far ahead the workers go is the parent's window of blocks sent and not yet received
(resolver.importer.pool.BLOCKS_AHEAD).

The workers are forked before the store is opened (an LMDB environment must never cross a fork), each with a
copy of the parent's Preparer; each closes the pipes of the workers forked before it (else a worker would keep
another's pipe open and never see its end). A worker that fails sends the traceback, which the parent raises.
"""

from __future__ import annotations

import fcntl
import gc
import os
import pickle
import queue
import signal
import struct
import threading
import time
import traceback
from pathlib import Path

from resolver.importer.jsonl import Block
from resolver.importer.prepare import Preparer
from resolver.importer.rows import WireItem, to_wire

_TASK = struct.Struct(">QQQ")  # first line, offset, size
_RESULT = struct.Struct(">BQ")  # status, size of what follows
_OK, _FAILED = 0, 1
_PIPE_BYTES = 1 << 20  # a result pipe's capacity, where Linux allows it: fewer reads per result
_F_SETPIPE_SZ = 1031  # fcntl.F_SETPIPE_SZ (Linux; absent from older fcntl modules)
CLOSE_WAIT_S = 5.0  # a worker finishes the block in hand (milliseconds) before it sees its pipes closed


class WorkerFailed(RuntimeError):
    """A worker process failed to prepare a block (the message holds its traceback)."""


class BlockWorkers:
    """`count` forked worker processes that prepare blocks of the JSON-lines file `path` with `preparer`."""

    def __init__(self, preparer: Preparer, path: Path, count: int) -> None:
        self.count = count
        self._pids: list[int] = []
        self._tasks: list[int] = []  # the parent's ends: write tasks, read results
        self._results: list[int] = []
        for _ in range(count):
            task_r, task_w = os.pipe()
            result_r, result_w = os.pipe()
            pid = os.fork()
            if pid == 0:  # the worker: never returns
                _serve(preparer, path, task_r, result_w, [task_w, result_r, *self._tasks, *self._results])
            os.close(task_r)
            os.close(result_w)
            try:
                fcntl.fcntl(result_r, _F_SETPIPE_SZ, _PIPE_BYTES)
            except OSError:
                pass  # the default capacity only costs more reads
            self._pids.append(pid)
            self._tasks.append(task_w)
            self._results.append(result_r)

    def send(self, index: int, block: Block, offset: int) -> None:
        """Have worker `index % count` prepare `block`, which starts at byte `offset` of the file."""
        os.write(self._tasks[index % self.count], _TASK.pack(block.first, offset, len(block.data)))

    def receive(self, index: int) -> list[WireItem]:
        """What worker `index % count` made of the oldest block sent to it that is not received yet."""
        fd = self._results[index % self.count]
        status, size = _RESULT.unpack(_read_exactly(fd, _RESULT.size))
        payload = _read_exactly(fd, size)
        if status != _OK:
            raise WorkerFailed("an import worker failed:\n" + payload.decode("utf-8", "replace"))
        items: list[WireItem] = pickle.loads(payload)
        return items

    def close(self) -> None:
        """Stop the workers (every result is in, or no longer wanted, by the time this is called): with their pipes
        closed, each ends after the block in hand; one that does not within `CLOSE_WAIT_S` is killed."""
        for fd in (*self._tasks, *self._results):
            os.close(fd)
        deadline = time.monotonic() + CLOSE_WAIT_S
        for pid in self._pids:
            while os.waitpid(pid, os.WNOHANG) == (0, 0):
                if time.monotonic() > deadline:
                    os.kill(pid, signal.SIGKILL)
                    os.waitpid(pid, 0)
                    break
                time.sleep(0.005)
        self._pids, self._tasks, self._results = [], [], []


def _read_exactly(fd: int, size: int) -> bytearray:
    buf = bytearray(size)
    view = memoryview(buf)
    got = 0
    while got < size:
        n = os.readv(fd, [view[got:]])
        if n == 0:
            raise WorkerFailed("an import worker ended before sending its result")
        got += n
    return buf


def _serve(preparer: Preparer, path: Path, tasks: int, results: int, others: list[int]) -> None:
    """A worker's life: prepare each block asked for, send the result; exit when the parent closes its end."""
    code = 1
    try:
        for fd in others:
            os.close(fd)
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle; it stops the workers
        gc.freeze()
        # Preparing makes no reference cycles (every object dies by its count once its block is sent), so the
        # cyclic collector would only walk each row's young dicts and lists, a few µs a row.
        gc.disable()
        file = os.open(path, os.O_RDONLY)
        outgoing: queue.SimpleQueue[bytes | None] = queue.SimpleQueue()
        sender = threading.Thread(target=_send, args=(outgoing, results), name="results", daemon=True)
        sender.start()
        with os.fdopen(tasks, "rb") as incoming:
            while task := incoming.read(_TASK.size):
                first, offset, size = _TASK.unpack(task)
                try:
                    payload = pickle.dumps(to_wire(preparer.items(Block(first, _pread(file, size, offset)))),
                                           protocol=pickle.HIGHEST_PROTOCOL)
                    status = _OK
                except Exception:  # noqa: BLE001 - the parent raises it; the worker has nothing else to tell it to
                    payload, status = traceback.format_exc().encode("utf-8"), _FAILED
                outgoing.put(_RESULT.pack(status, len(payload)) + payload)
                if not sender.is_alive():
                    break  # the parent closed the results pipe: nobody wants what follows
        outgoing.put(None)
        sender.join()
        code = 0
    finally:
        os._exit(code)


def _send(outgoing: queue.SimpleQueue[bytes | None], results: int) -> None:
    """A worker's sender thread: write each result to the parent, in order, until None (or the pipe is closed)."""
    try:
        while (message := outgoing.get()) is not None:
            _write_all(results, message)
    except OSError:
        pass  # the parent closed its end (it stopped, or wants no more): the worker ends with its tasks


def _pread(fd: int, size: int, offset: int) -> bytes:
    parts = []
    while size:
        part = os.pread(fd, size, offset)
        if not part:
            raise OSError(f"the file ended at byte {offset}, before the block the import read there")
        parts.append(part)
        size -= len(part)
        offset += len(part)
    return b"".join(parts)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]
