"""Preparing rows in file order: here, or in worker processes for a large file.

The workers are forked before the store is opened (an LMDB environment must never cross a fork). A JSON-lines
file's workers read their blocks of lines from the file themselves (resolver.importer.blockworkers); a CSV file
travels to a Pool's workers as chunks of parsed cells. What comes back is one bytes object per packed create and
plain tuples for the other rows (resolver.importer.rows.to_wire). A few chunks are in flight at a time: enough to
keep every worker busy, never the whole file in memory. A worker moves what it inherited (the preparer, the phone
tables) out of the garbage collector's sight once (gc.freeze), and turns the cyclic collector off: preparing a
row makes no reference cycle.

A Pool's worker keeps its Preparer in a module global, `_preparer`, set by the pool's initializer. A Pool runs
module-level functions by name with pickled arguments; the Preparer (compiled schema, key hasher) is neither
cheap nor always possible to pickle with every task, so the initializer receives it once, inherited through
fork, and a per-process global is the only place it can leave it for the tasks. Nothing else reads it, and
only worker processes set it.
"""

from __future__ import annotations

import gc
import multiprocessing
import os
import signal
from collections import deque
from collections.abc import Iterator
from multiprocessing.pool import AsyncResult, Pool
from pathlib import Path
from typing import Any, NamedTuple, cast

from resolver.importer.blockworkers import BlockWorkers
from resolver.importer.jsonl import Block
from resolver.importer.prepare import Preparer
from resolver.importer.rows import (
    FileProblem,
    Item,
    Payload,
    Row,
    decided,
    from_wire,
    outcome_from_wire,
    outcome_to_wire,
)

CHUNK_ROWS = 500  # CSV rows handed to a worker at a time
POOL_MIN_ROWS = 5000  # below this, forking workers costs more than it saves
MAX_WORKERS = 8
IN_FLIGHT = 3  # chunks in flight per worker (CSV: a multiprocessing pool)
# Blocks of a JSON-lines file sent to each worker and not yet received: how far the workers may run ahead of the
# parent while it commits (a block is ~1,000 rows; its result ~1 MB, held by the worker until read).
BLOCKS_AHEAD = 48

_preparer: Preparer | None = None  # a worker process's own (the module docstring says why a global)


def _init_worker(preparer: Preparer) -> None:
    global _preparer
    _preparer = preparer  # (its uuids follow from line numbers; resolver.uuids reseeds its random bits per fork)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle; it ends the pool
    gc.freeze()
    # Preparing makes no reference cycles (every object dies by its count once its block is sent), so the cyclic
    # collector would only walk each row's young dicts and lists, a few µs a row (bench/README.md, the import).
    gc.disable()


def _prepare_payloads(lines: list[int], payloads: list[Payload]) -> list[Any]:
    assert _preparer is not None
    return [outcome_to_wire(o) for o in _preparer.outcomes(lines, payloads)]


class Workers:
    """A pool of worker processes that prepare rows with a copy of the parent's Preparer."""

    def __init__(self, preparer: Preparer, count: int) -> None:
        # fork: the preparer (parser, compiled schema) is inherited, not pickled; nothing here holds LMDB yet
        self.pool: Pool = multiprocessing.get_context("fork").Pool(count, _init_worker, (preparer,))
        self.count = count

    def close(self) -> None:
        """Stop the workers (every result is in, or no longer wanted, by the time this is called)."""
        self.pool.terminate()
        self.pool.join()


def start_workers(preparer: Preparer, lines: int, jsonl: Path | None = None) -> Workers | BlockWorkers | None:
    """Worker processes for a large file on a machine with several CPUs (None: prepare in this process): for the
    JSON-lines file `jsonl`, workers that read its blocks themselves; for a CSV file, a Pool."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if cpus < 2 or lines < POOL_MIN_ROWS:
        return None
    count = min(cpus, MAX_WORKERS)
    return BlockWorkers(preparer, jsonl, count) if jsonl is not None else Workers(preparer, count)


class _Pending(NamedTuple):
    chunk: list[Row]  # the CSV rows the result has the outcomes of
    result: AsyncResult[Any]

    def rows(self) -> list[Item]:
        return list(decided(self.chunk, map(outcome_from_wire, self.result.get())))


def prepared(source: Iterator[Row] | Iterator[Block], preparer: Preparer,
             workers: Workers | BlockWorkers | None) -> Iterator[list[Item]]:
    """Every row of `source` (CSV rows, or blocks of JSON lines) prepared, in file order, a chunk at a time: a
    Row with its outcome, or (a JSON line of the fast path) its packed create. When reading fails (FileProblem),
    the rows read before it are yielded first, then it is raised."""
    if isinstance(workers, BlockWorkers):
        yield from _by_block_workers(cast(Iterator[Block], source), workers)
        return
    pending: deque[_Pending] = deque()
    window = IN_FLIGHT * workers.count if workers is not None else 0
    problem: FileProblem | None = None
    chunks = _chunks(source, CHUNK_ROWS)
    while True:
        try:
            chunk = next(chunks)
        except StopIteration:
            break
        except FileProblem as exc:  # the rows read before it still go through
            problem = exc
            break
        if workers is None:
            yield preparer.items(chunk) if isinstance(chunk, Block) else list(preparer.rows(chunk))
            continue
        assert not isinstance(chunk, Block)  # (a JSON-lines file's workers are BlockWorkers)
        lines = [r.line for r in chunk if r.payload is not None]
        payloads = [r.payload for r in chunk if r.payload is not None]
        pending.append(_Pending(chunk, workers.pool.apply_async(_prepare_payloads, (lines, payloads))))
        if len(pending) >= window:
            yield pending.popleft().rows()
    while pending:
        yield pending.popleft().rows()
    if problem is not None:
        raise problem


def _by_block_workers(blocks: Iterator[Block], workers: BlockWorkers) -> Iterator[list[Item]]:
    """The blocks of a JSON-lines file prepared by `workers`, in file order, BLOCKS_AHEAD per worker in flight."""
    window = BLOCKS_AHEAD * workers.count
    sent = received = offset = 0
    for block in blocks:
        workers.send(sent, block, offset)
        offset += len(block.data)
        sent += 1
        if sent - received >= window:
            yield from_wire(workers.receive(received))
            received += 1
    while received < sent:
        yield from_wire(workers.receive(received))
        received += 1


def _chunks(items: Iterator[Row] | Iterator[Block], size: int) -> Iterator[list[Row] | Block]:
    """Lists of `size` CSV rows (blocks of JSON lines pass through as they are); when reading fails, the
    partial list first, then the error."""
    chunk: list[Row] = []
    try:
        for item in items:
            if isinstance(item, Block):
                yield item
                continue
            chunk.append(item)
            if len(chunk) >= size:
                yield chunk
                chunk = []
    except FileProblem:
        if chunk:
            yield chunk
        raise
    if chunk:
        yield chunk
