"""ReplicatedWriter stands in for resolver.writer.Writer (resolver.bootstrap hands it to the Service in its place):
the methods callers use must keep the same parameters, or a call that works on one machine fails in a cluster."""

from __future__ import annotations

import inspect

import pytest

from resolver.cluster.writer import ReplicatedWriter
from resolver.writer import Writer


@pytest.mark.parametrize("name", ["submit", "submit_nowait", "close"])
def test_replicated_writer_takes_what_writer_takes(name: str) -> None:
    local, replicated = inspect.signature(getattr(Writer, name)), inspect.signature(getattr(ReplicatedWriter, name))
    shape = [(p.name, p.kind, p.default) for p in local.parameters.values()]
    assert [(p.name, p.kind, p.default) for p in replicated.parameters.values()] == shape
