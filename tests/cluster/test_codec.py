"""The command codec: every replicated command type round-trips exactly, to the same bytes every time, under a
stable name; the message id de-duplicates retries and only retries."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import replace
from typing import Any

import pytest

from resolver.attributes import AttributeSchema
from resolver.cluster import codec
from resolver.cluster.retention import RetentionCommand
from resolver.config import settings_from_document
from resolver.errors import ClusterError
from resolver.events.command import EventCommand
from resolver.forget import prepare as prepare_forget
from resolver.identifiers import RawIdentifiers, policy_from
from resolver.interactions import InteractionInput
from resolver.interactions import prepare as prepare_interaction
from resolver.merge import prepare as prepare_merge
from resolver.outbound.admin import Requeue
from resolver.outbound.settle import Settle
from resolver.unmerge import prepare as prepare_unmerge
from resolver.upsert import UpsertInput
from resolver.upsert import prepare as prepare_upsert

SETTINGS = settings_from_document({"version": 1, "matching": {"default_region": "US"}}, {})
NOW = 1_780_000_000_000_000
A, B = "01900000-0000-7000-8000-000000000001", "01900000-0000-7000-8000-000000000002"


def commands() -> list[Any]:
    """One command of every replicated type, made by the use cases' own prepare (as a handler makes them)."""
    schema, policy = AttributeSchema(SETTINGS), policy_from(SETTINGS)
    upsert = prepare_upsert(UpsertInput("k1", RawIdentifiers(external_id="E1", emails=["A@Example.COM"],
                                                             phones=["+1 650 253 0000", "anonymous"]),
                                        {"name": "Ada", "tier": None}, source_system="CRM",
                                        remove_identifiers=RawIdentifiers(emails=["old@example.com"])),
                            SETTINGS, schema, policy, now_us=NOW, new_uuid=A)
    interaction = prepare_interaction(InteractionInput("call-1", NOW - 5, identifiers=RawIdentifiers(phones=["+16502530000"]),
                                                       channel="voice", details={"wrap": "ok", "n": 2}),
                                      SETTINGS, schema, policy, now_us=NOW, new_uuid=B)
    return [upsert, interaction,
            prepare_merge("m1", A, [B], "CRM", SETTINGS, now_us=NOW),
            prepare_unmerge("u1", A, B, SETTINGS, now_us=NOW),
            prepare_forget("f1", A, "erasure request", "ops", SETTINGS, now_us=NOW),
            EventCommand("salesforce", "wh-1", b'{"id": "wh-1", "caf\xc3\xa9": "\xff"}', NOW, A),
            Settle(7, "retry", 1, error="HTTP 503", next_us=NOW + 1, throttled=True),
            Requeue(8, "replay", NOW),
            RetentionCommand(through_seq=40, before_us=NOW - 86_400_000_000, limit=1000, published_us=NOW)]


@pytest.mark.parametrize("command", commands(), ids=lambda c: type(c).__name__)
def test_every_command_round_trips_to_the_same_bytes(command: Any) -> None:
    data = codec.encode(command)
    op, back = codec.decode(data)
    assert back == command and type(back) is type(command)
    assert op is codec.op_for(command)
    assert codec.encode(back) == data  # deterministic: decoding and encoding again gives the same bytes


def test_bytes_do_not_depend_on_the_process() -> None:
    """Another interpreter (another hash seed, other object identities) encodes the same commands to the same bytes."""
    here = [codec.encode(c).hex() for c in commands()]
    script = ("from tests.cluster.test_codec import commands; from resolver.cluster import codec; "
              "print(' '.join(codec.encode(c).hex() for c in commands()))")
    there = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True, timeout=60,
                           env={"PYTHONHASHSEED": "12345", "PATH": ""}).stdout.split()
    assert there == here


def test_names_are_stable_and_unique() -> None:
    names = [op.name for op in codec.OPS]
    assert names == ["upsert.v1", "merge.v1", "unmerge.v1", "interaction.v1", "forget.v1", "event.v1",
                     "outbound.settle.v1", "outbound.requeue.v1", "retention.v1"]
    assert len({op.type for op in codec.OPS}) == len(codec.OPS)


def test_message_id_deduplicates_retries_only() -> None:
    upsert = commands()[0]
    retry = replace(upsert, now_us=upsert.now_us + 1_000_000, new_uuid=B)  # a retry: prepared again, later
    assert codec.message_id(retry) == codec.message_id(upsert)
    reused = replace(upsert, fingerprint="0" * 64)  # the same key, another request: the ledger must see it
    assert codec.message_id(reused) != codec.message_id(upsert)
    merge = commands()[2]
    assert codec.message_id(replace(merge, idempotency_key="k1")) != codec.message_id(upsert)


def test_an_event_is_one_message_whichever_node_applies_it_and_when() -> None:
    """The same webhook accepted by two nodes (each fixing its own time and uuid) is one message for the stream;
    the same webhook-id with another body is not a retry of it."""
    event = next(c for c in commands() if isinstance(c, EventCommand))
    elsewhere = replace(event, now_us=event.now_us + 3_000_000, new_uuid=B)
    assert codec.message_id(elsewhere) == codec.message_id(event)
    assert codec.message_id(replace(event, body=b"{}")) != codec.message_id(event)
    assert codec.message_id(replace(event, source="hubspot")) != codec.message_id(event)
    assert codec.message_id(replace(event, replay="dead letter 3 at 1")) != codec.message_id(event)  # a new apply


def test_each_outbound_decision_is_its_own_message() -> None:
    ack = Settle(7, "ack", 1)
    assert codec.message_id(ack) == codec.message_id(Settle(7, "ack", 1))  # two deliverers around a takeover
    later = [Settle(7, "retry", 1, next_us=NOW + i) for i in (1, 2)]  # each planned retry is kept
    assert len({codec.message_id(c) for c in [ack, *later, Settle(8, "ack", 1)]}) == 4


def test_each_retention_publication_is_its_own_message() -> None:
    """A publish retried under its own id is one message; the next round (even with the same cutoff) is another."""
    first = next(c for c in commands() if isinstance(c, RetentionCommand))
    assert codec.message_id(replace(first)) == codec.message_id(first)
    assert codec.message_id(replace(first, published_us=NOW + 1)) != codec.message_id(first)


def test_unknown_commands_and_bytes_are_refused() -> None:
    with pytest.raises(ClusterError, match="not a replicated command"):
        codec.encode(object())
    for data in (b"", b"not json", b'["nope.v1", []]', b"[1, 2, 3]"):
        with pytest.raises(ClusterError, match="not a resolver command"):
            codec.decode(data)
    with pytest.raises(ClusterError, match="fields"):
        codec.decode(b'["unmerge.v1", ["k"]]')
