"""The JSON-lines workers (resolver.importer.blockworkers): each reads its blocks from the file itself, the parent
gets every block's rows back in file order, a worker's failure reaches the parent, and closing leaves no process."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from resolver._load_py import entry_head
from resolver.config import load_settings
from resolver.importer.blockworkers import BlockWorkers, WorkerFailed
from resolver.importer.jsonl import JsonParser, read_blocks
from resolver.importer.pool import prepared
from resolver.importer.prepare import Defaults, Preparer
from resolver.importer.rows import Row
from resolver.uuids import LoadUuids
from tests.integration.helpers import phone
from tests.integration.test_import_bulk import CountingUuids


def preparer() -> Preparer:
    """A Preparer whose uuids and clock are the same in every process (no random bits)."""
    return Preparer(load_settings(None), JsonParser(), Defaults("", ""), CountingUuids(1_700_000_000_000, 5),
                    clock=lambda: 1_800_000_000_000_000)


def lines_of(items: list[Any]) -> list[int]:
    return [entry_head(i)[0] if type(i) is bytes else i.line for i in items]


def test_every_block_comes_back_in_file_order(tmp_path: Path) -> None:
    source = tmp_path / "rows.jsonl"
    rows = [json.dumps({"identifiers": {"externalId": f"W-{i}", "phones": [phone(i)]}}) for i in range(3000)]
    rows[10] = "{not json"  # a row of the general path, refused
    rows[20] = ""  # a blank line: no row
    source.write_text("\n".join(rows) + "\n")
    workers = BlockWorkers(preparer(), source, 3)
    try:
        with open(source, "rb") as f:
            chunks = list(prepared(read_blocks(f, 4096), preparer(), workers))
    finally:
        workers.close()
    with open(source, "rb") as f:
        alone = list(prepared(read_blocks(f, 4096), preparer(), None))
    assert len(chunks) > 10 and chunks == alone
    got = [line for chunk in chunks for line in lines_of(chunk)]
    assert got == [n for n in range(1, 3001) if n != 21]
    assert [type(i) for c in chunks for i in c].count(Row) == 1


class Failing(Preparer):
    def items(self, block: Any) -> list[Any]:
        raise ValueError("this block cannot be prepared")


def test_a_failing_worker_fails_the_parent_with_its_traceback_and_closing_leaves_no_process(tmp_path: Path) -> None:
    source = tmp_path / "rows.jsonl"
    source.write_text("".join(json.dumps({"identifiers": {"externalId": f"F-{i}"}}) + "\n" for i in range(100)))
    settings = load_settings(None)
    workers = BlockWorkers(Failing(settings, JsonParser(), Defaults("", ""), LoadUuids.start()), source, 2)
    pids = list(workers._pids)
    try:
        with open(source, "rb") as f, pytest.raises(WorkerFailed, match="this block cannot be prepared"):
            list(prepared(read_blocks(f, 512), preparer(), workers))
    finally:
        workers.close()
    for pid in pids:
        with pytest.raises(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)  # reaped: no such child any more


def test_workers_that_ran_ahead_of_a_parent_that_stopped_end_when_closed(tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """A parent that stops reading (a failed load) while the workers hold results it never reads: closing ends
    every worker by itself (none needs SIGKILL) and leaves no process."""
    source = tmp_path / "rows.jsonl"
    source.write_text("".join(json.dumps({"identifiers": {"externalId": f"A-{i}", "phones": [phone(i)]}}) + "\n"
                              for i in range(5000)))
    killed: list[int] = []
    monkeypatch.setattr("resolver.importer.blockworkers.os.kill", lambda pid, sig: killed.append(pid))
    workers = BlockWorkers(preparer(), source, 2)
    pids = list(workers._pids)
    try:
        with open(source, "rb") as f:
            chunks = prepared(read_blocks(f, 2048), preparer(), workers)
            first = next(chunks)  # every block is sent at once (the window is larger): the workers run on
            assert lines_of(first)[0] == 1
    finally:
        workers.close()
    assert killed == []
    for pid in pids:
        with pytest.raises(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)
