"""Metrics end to end (issue 17): a real `resolver serve` with 2 workers, the events process and `[metrics] listen`,
known traffic sent to each worker's own port, then `GET /metrics`: the exact counts per method, code, outcome and
action, added up over the workers, and the events figures read from the store.
"""

from __future__ import annotations

import json
import textwrap
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import NamedTuple

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from resolver.v1 import resolver_pb2 as pb
from resolver.v1 import resolver_pb2_grpc
from tests.conftest import SERVER_TOML
from tests.integration.helpers import phone, post_webhook, resolve_req, upsert_req
from tests.integration.serve import serving

# tests of processes, signals and files: the pure pass runs the same code in process (Makefile test-pure)
pytestmark = pytest.mark.process

WEBHOOK_KEY = b"metrics-test-webhook-key"
WAIT_S = 30.0
MATCHED_N, NOT_FOUND_M, CUSTOMERS_K = 6, 4, 4
STREAM_NOT_FOUND = 2  # unknown callers in the ResolveStream (beside the CUSTOMERS_K matched)

BLUEPRINT = SERVER_TOML.replace("workers = 1", "workers = 2") + textwrap.dedent(
    """
    [metrics]
    listen = "127.0.0.1:0"
    [sources.SALESFORCE]
    field_map = { Tier__c = "tier" }
    secrets = [{ env = "METRICS_TEST_SECRET" }]
    [events]
    http_listen = "127.0.0.1:0"
    [logging]
    level = "WARNING"
    """
)


class Serving(NamedTuple):
    grpc_port: int
    webhook_port: int
    metrics_url: str


@contextmanager
def serve(tmp_path: Path) -> Iterator[Serving]:
    """`resolver serve` in a process of its own; stopped with SIGTERM (it must exit 0)."""
    config = tmp_path / "blueprint.toml"
    config.write_text(BLUEPRINT)
    with serving(config, tmp_path / "data", tmp_path / "serve.stderr",
                 env={"METRICS_TEST_SECRET": WEBHOOK_KEY.decode()}) as line:
        yield Serving(line.port, int(line.after("webhooks on http://127.0.0.1:")), line.after("metrics on "))


Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(url: str) -> tuple[str, Samples]:
    """GET /metrics: the text, and every sample by (name, labels)."""
    with urllib.request.urlopen(url, timeout=10) as resp:
        assert resp.status == 200 and resp.headers["Content-Type"].startswith("text/plain")
        text = resp.read().decode()
    samples = {(s.name, frozenset(s.labels.items())): s.value
               for family in text_string_to_metric_families(text) for s in family.samples}
    return text, samples


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def series(samples: Samples, name: str) -> dict[frozenset[tuple[str, str]], float]:
    """The non-zero samples of `name`, by their labels."""
    return {labels: v for (n, labels), v in samples.items() if n == name and v}


def created(record_id: str) -> bytes:
    return json.dumps({"event_type": "CREATE", "source_system": "SALESFORCE", "timestamp": "2024-01-01T00:00:00Z",
                       "record_id": record_id, "object_type": "Account",
                       "change_set": {"Tier__c": {"new_value": "gold"}}}).encode()


def _traffic(port: int) -> list[str]:
    """The known calls, alternating over the two workers' own ports; the identifiers they carried."""
    with grpc.insecure_channel(f"127.0.0.1:{port}") as shared:
        info = resolver_pb2_grpc.IdentityResolverStub(shared).GetServerInfo(pb.GetServerInfoRequest(), timeout=10)
    assert len(info.worker_ports) == 2
    channels = [grpc.insecure_channel(f"127.0.0.1:{p}") for p in info.worker_ports]
    try:
        stubs = [resolver_pb2_grpc.IdentityResolverStub(c) for c in channels]
        assert {s.GetServerInfo(pb.GetServerInfoRequest(), timeout=10).worker_index for s in stubs} == {0, 1}
        phones = [phone(4100 + i) for i in range(CUSTOMERS_K)]
        first = upsert_req("metrics-upsert-0", phones=(phones[0],))
        for i, p in enumerate(phones):
            req = first if i == 0 else upsert_req(f"metrics-upsert-{i}", phones=(p,))
            assert stubs[i % 2].Upsert(req, timeout=10).action == pb.ACTION_CREATED
        again = stubs[1].Upsert(first, timeout=10)  # the other worker: the ledger is the store's, not a worker's
        assert again.replayed and again.action == pb.ACTION_CREATED
        for i in range(MATCHED_N):
            r = stubs[i % 2].Resolve(resolve_req(phones=(phones[i % CUSTOMERS_K],)), timeout=10)
            assert (r.outcome, r.matched_on) == (pb.OUTCOME_MATCHED, pb.MATCH_KIND_PHONE)
        unknown = [phone(4900 + i) for i in range(NOT_FOUND_M)]
        for i, p in enumerate(unknown):
            assert stubs[i % 2].Resolve(resolve_req(phones=(p,)), timeout=10).outcome == pb.OUTCOME_NOT_FOUND
        with pytest.raises(grpc.RpcError) as err:
            stubs[0].Resolve(resolve_req(), timeout=10)  # no identifier at all
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        # one stream: every item an answer counted by its outcome (in one batch), the refused one in none
        items = [resolve_req(phones=(p,)) for p in phones + unknown[:STREAM_NOT_FOUND]] + [resolve_req()]
        answers = list(stubs[1].ResolveStream(iter(items), timeout=10))
        assert [a.outcome for a in answers] == [pb.OUTCOME_MATCHED] * CUSTOMERS_K + \
            [pb.OUTCOME_NOT_FOUND] * STREAM_NOT_FOUND + [pb.OUTCOME_UNSPECIFIED]
    finally:
        for c in channels:
            c.close()
    return phones + unknown


def test_metrics_add_up_over_workers_and_processes(tmp_path: Path) -> None:
    with serve(tmp_path) as srv:
        assert srv.metrics_url.startswith("http://127.0.0.1:") and srv.metrics_url.endswith("/metrics")
        identifiers = _traffic(srv.grpc_port)
        record_ids = [f"SF-METRICS-{i}" for i in range(3)]
        for i, rid in enumerate(record_ids):
            assert post_webhook(srv.webhook_port, "SALESFORCE", WEBHOOK_KEY, f"msg_metrics_{i}", created(rid),
                                timeout=10).status == 202
        assert post_webhook(srv.webhook_port, "SALESFORCE", WEBHOOK_KEY, "msg_metrics_bad", b"{not json",
                            timeout=10).status == 400  # signed: dead-lettered

        deadline = time.monotonic() + WAIT_S
        while True:  # the applier drains the inbox; every scrape reads the counters in one transaction
            text, samples = scrape(srv.metrics_url)
            accepted, applied = (value(samples, "resolver_events_accepted_total"),
                                 value(samples, "resolver_events_applied_total"))
            dead, depth = value(samples, "resolver_events_dead_lettered"), value(samples, "resolver_events_inbox_depth")
            assert accepted == applied + dead + depth == 4
            # `received` is counted in memory and written to the store every COUNTER_FLUSH_S (1 s): it may lag
            received = value(samples, "resolver_events_received_total")
            if applied == 3 and received == 4:
                break
            assert time.monotonic() < deadline, f"not applied or counted in {WAIT_S}s: {applied} of 3, {received} of 4"
            time.sleep(0.1)

        rpc_counts = {dict(labels)["method"] + " " + dict(labels)["code"]: v
                      for labels, v in series(samples, "resolver_rpc_duration_seconds_count").items()}
        assert rpc_counts == {"Resolve OK": MATCHED_N + NOT_FOUND_M, "Resolve INVALID_ARGUMENT": 1,
                              "ResolveStream OK": 1, "Upsert OK": CUSTOMERS_K + 1, "GetServerInfo OK": 3}
        # the buckets add up to the count, and read below a millisecond
        resolve_ok = [(float(dict(labels)["le"]), v) for labels, v in
                      series(samples, "resolver_rpc_duration_seconds_bucket").items()
                      if dict(labels).get("method") == "Resolve" and dict(labels).get("code") == "OK"]
        assert max(resolve_ok)[1] == MATCHED_N + NOT_FOUND_M
        assert {0.0001, 0.00025, 0.0005, 0.0007, 0.001} <= {
            float(dict(labels)["le"]) for (n, labels) in samples if n == "resolver_rpc_duration_seconds_bucket"}

        outcomes = {(dict(labels)["outcome"], dict(labels)["matched_on"]): v
                    for labels, v in series(samples, "resolver_resolve_outcomes_total").items()}
        assert outcomes == {("MATCHED", "PHONE"): MATCHED_N + CUSTOMERS_K, ("NOT_FOUND", "NONE"): NOT_FOUND_M +
                            STREAM_NOT_FOUND}
        assert {dict(labels)["action"]: v for labels, v in series(samples, "resolver_upsert_actions_total").items()} \
            == {"CREATED": CUSTOMERS_K}
        assert series(samples, "resolver_ledger_replays_total") == {frozenset({("method", "Upsert")}): 1}

        assert value(samples, "resolver_events_dead_lettered") == 1
        assert value(samples, "resolver_events_dlq_depth") == 1
        assert value(samples, "resolver_events_inbox_depth") == 0
        assert value(samples, "resolver_events_received_total") == 4

        assert value(samples, "resolver_lmdb_map_size_bytes") == 256 * 1024 * 1024
        assert 0 < value(samples, "resolver_lmdb_map_used_bytes") < 256 * 1024 * 1024
        assert value(samples, "resolver_lmdb_readers_max") == 1024
        assert value(samples, "resolver_lmdb_readers_in_use") >= 2  # the workers' spare slots, at least
        # commits: the workers' Upserts, the events process's admissions and applies
        assert value(samples, "resolver_lmdb_commit_seconds_count") >= CUSTOMERS_K + 2
        assert value(samples, "resolver_lmdb_last_commit_seconds") > 0

        for identifier in (*identifiers, *(i[1:] for i in identifiers), *record_ids):
            assert identifier not in text, f"{identifier!r} is in the metrics"

