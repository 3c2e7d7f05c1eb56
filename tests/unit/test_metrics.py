"""resolver.metrics and resolver.metrics_endpoint in pieces: the recording functions and the run's directory (in a
process of their own: prometheus_client picks multiprocess mode once, at import), the figures read from a real
store, the reader table's count, the endpoint's HTTP, TLS and tokens, and the blueprint's `[metrics]`."""

from __future__ import annotations

import json
import ssl
import subprocess
import sys
import textwrap
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lmdb
import pytest

from resolver.auth import new_token
from resolver.bootstrap import build_events, build_service
from resolver.config import Settings, settings_from_document
from resolver.errors import ConfigError
from resolver.events.signatures import sign
from resolver.identifiers import RawIdentifiers
from resolver.metrics_endpoint import MetricsEndpoint, StoreFigures, reader_slots
from resolver.server import secure_by_default
from resolver.upsert import UpsertInput
from tests.certs import make_pki

ROOT = Path(__file__).resolve().parents[2]
KEY = b"unit-metrics-webhook-key"

RECORDING = textwrap.dedent(
    """
    import json, os, sys
    from resolver import metrics
    from resolver.config import settings_from_document

    os.environ[metrics.ENV] = "/nonexistent/someone-elses"
    off = settings_from_document({}, {})
    with metrics.exported(off) as directory:
        inside_off = (directory, metrics.ENV in os.environ, metrics.recording())
        metrics.rpc_done("Resolve", "OK", 0.0003)  # off: nothing, not even an import
        off_imported = "prometheus_client" in sys.modules
    after_off = os.environ.get(metrics.ENV)
    on = settings_from_document({"metrics": {"listen": "127.0.0.1:0"}}, {})
    with metrics.exported(on) as directory:
        inside_on = (os.environ[metrics.ENV] == directory, os.path.isdir(directory), metrics.recording())
        for seconds in (0.00004, 0.0003, 0.0003, 0.7):
            metrics.rpc_done("Resolve", "OK", seconds)
        metrics.rpc_done("Upsert", "INVALID_ARGUMENT", 0.002)
        metrics.resolved(1, 3)
        metrics.resolved(1, 3)
        metrics.resolved(0, 0)
        metrics.resolved(2, 2)
        metrics.upserted("CREATED", False)
        metrics.upserted("UNCHANGED", False)
        metrics.upserted("CREATED", True)
        metrics.ledger_replayed("Merge")
        metrics.committed(0.004)
        metrics.committed(0.001)
        from prometheus_client.multiprocess import MultiProcessCollector
        samples = [[s.name, s.labels, s.value] for m in MultiProcessCollector(None, directory).collect()
                   for s in m.samples]
    after_on = [os.path.exists(directory), os.environ.get(metrics.ENV)]
    with metrics.exported(on) as again:  # a second run in the same process records into its own directory
        metrics.resolved(1, 3)
        samples_again = [[s.name, s.labels, s.value] for m in MultiProcessCollector(None, again).collect()
                         for s in m.samples if s.name == "resolver_resolve_outcomes_total" and s.value]
    print(json.dumps({"inside_off": inside_off, "off_imported": off_imported, "after_off": after_off,
                      "inside_on": inside_on, "after_on": after_on, "samples": samples,
                      "samples_again": samples_again, "again_differs": again != directory}))
    """
)


def test_recording_functions_and_the_runs_directory() -> None:
    out = subprocess.run([sys.executable, "-c", RECORDING], capture_output=True, text=True, cwd=ROOT, timeout=60,
                         check=True)
    got = json.loads(out.stdout)
    assert got["inside_off"] == ["", False, False]  # off: no directory, and ENV hidden from children
    assert got["off_imported"] is False
    assert got["after_off"] == "/nonexistent/someone-elses"  # restored
    assert got["inside_on"] == [True, True, True]
    assert got["after_on"] == [False, "/nonexistent/someone-elses"]  # removed, and ENV restored

    def sample(name: str, **labels: str) -> float:
        found = [v for n, lb, v in got["samples"] if n == name and lb == labels]
        assert len(found) == 1, (name, labels)
        return float(found[0])

    assert sample("resolver_rpc_duration_seconds_count", method="Resolve", code="OK") == 4
    assert sample("resolver_rpc_duration_seconds_bucket", method="Resolve", code="OK", le="5e-05") == 1
    assert sample("resolver_rpc_duration_seconds_bucket", method="Resolve", code="OK", le="0.0003") == 3
    assert sample("resolver_rpc_duration_seconds_bucket", method="Resolve", code="OK", le="0.5") == 3
    assert sample("resolver_rpc_duration_seconds_bucket", method="Resolve", code="OK", le="1.0") == 4
    assert sample("resolver_rpc_duration_seconds_sum", method="Resolve", code="OK") == pytest.approx(0.70064)
    assert sample("resolver_rpc_duration_seconds_count", method="Upsert", code="INVALID_ARGUMENT") == 1
    assert sample("resolver_resolve_outcomes_total", outcome="MATCHED", matched_on="PHONE") == 2
    assert sample("resolver_resolve_outcomes_total", outcome="NOT_FOUND", matched_on="NONE") == 1
    assert sample("resolver_resolve_outcomes_total", outcome="AMBIGUOUS", matched_on="EMAIL") == 1
    assert sample("resolver_resolve_outcomes_total", outcome="MATCHED", matched_on="EXTERNAL_ID") == 0  # exported
    # a pair that cannot occur is not exported as a zero
    assert not [lb for n, lb, _ in got["samples"] if n == "resolver_resolve_outcomes_total"
                and (lb["outcome"] == "NOT_FOUND") != (lb["matched_on"] == "NONE")]
    assert sample("resolver_upsert_actions_total", action="CREATED") == 1
    assert sample("resolver_upsert_actions_total", action="UNCHANGED") == 1
    assert sample("resolver_ledger_replays_total", method="Upsert") == 1
    assert sample("resolver_ledger_replays_total", method="Merge") == 1
    assert sample("resolver_lmdb_commit_seconds_count") == 2
    assert sample("resolver_lmdb_last_commit_seconds") == 0.001  # the most recent, not the largest
    assert got["again_differs"] and got["samples_again"] == [
        ["resolver_resolve_outcomes_total", {"outcome": "MATCHED", "matched_on": "PHONE"}, 1.0]]


def test_reader_slots_counts_held_and_active_slots(tmp_path: Path) -> None:
    env = lmdb.open(str(tmp_path), max_spare_txns=4)
    try:
        assert reader_slots(env.readers()) == (0, 0)
        txn = env.begin()
        txn.get(b"x")
        assert reader_slots(env.readers()) == (1, 1)
        txn.abort()  # the slot is kept spare for the next read transaction
        assert reader_slots(env.readers()) == (1, 0)
    finally:
        env.close()


def _settings(tmp_path: Path, **extra: Any) -> Settings:
    doc = {"server": {"data_dir": str(tmp_path / "data")}, "storage": {"map_size_mb": 64},
           "sources": {"SALESFORCE": {"field_map": {"Tier__c": "tier"}, "secrets": [{"env": "SF"}]}},
           "outbound": {"crm": {"url": "http://127.0.0.1:9/hook", "secrets": [{"env": "OUT"}],
                                "events": ["customer.created"]}},
           "metrics": {"listen": "127.0.0.1:0"}, **extra}
    return settings_from_document(doc, {"SF": KEY.decode(), "OUT": "outbound-key"})


def _admit(events: Any, i: int) -> None:
    body = json.dumps({"event_type": "CREATE", "source_system": "SALESFORCE", "timestamp": "2024-01-01T00:00:00Z",
                       "record_id": f"R-{i}", "object_type": "Account",
                       "change_set": {"Tier__c": {"new_value": "gold"}}}).encode()
    ts, wid = int(time.time()), f"msg_{i}"
    assert events.admit("SALESFORCE", {"webhook-id": wid, "webhook-timestamp": str(ts),
                                       "webhook-signature": sign(KEY, wid, ts, body)}, body).inbox_sequence == i + 1


def _figures(collector: StoreFigures) -> dict[str, float]:
    return {s.name: s.value for family in collector.collect() for s in family.samples}


def test_store_figures_read_the_events_and_the_outbox_from_lmdb(tmp_path: Path) -> None:
    settings = _settings(tmp_path)
    service = build_service(settings)
    events = build_events(service)
    events.start(applier=False, http=False)  # nothing applies: the inbox holds what is admitted
    try:
        for i in range(3):
            _admit(events, i)
        service.upsert(UpsertInput("k-1", RawIdentifiers(phones=("+16502534100",))))  # customer.created: queued
        got = _figures(StoreFigures(settings, lambda: service.store))
    finally:
        events.stop()
        service.close()
    assert got["resolver_events_accepted_total"] == 3 and got["resolver_events_received_total"] == 3
    assert got["resolver_events_applied_total"] == 0 and got["resolver_events_dead_lettered"] == 0
    assert got["resolver_events_inbox_depth"] == 3 and got["resolver_events_dlq_depth"] == 0
    assert got["resolver_outbound_committed_total"] == 1 and got["resolver_outbound_pending"] == 1
    assert got["resolver_outbound_delivered_total"] == 0 and got["resolver_outbound_dead"] == 0
    assert got["resolver_lmdb_map_size_bytes"] == 64 * 1024 * 1024
    assert 0 < got["resolver_lmdb_map_used_bytes"] < 64 * 1024 * 1024
    assert got["resolver_lmdb_readers_max"] == settings.storage.max_readers
    assert got["resolver_lmdb_readers_active"] <= got["resolver_lmdb_readers_in_use"]


def test_store_figures_leave_out_what_is_off_or_unreadable(tmp_path: Path) -> None:
    settings = settings_from_document({"server": {"data_dir": str(tmp_path / "data")}}, {})
    service = build_service(settings)
    try:
        got = _figures(StoreFigures(settings, lambda: service.store))
    finally:
        service.close()
    assert "resolver_lmdb_map_size_bytes" in got
    assert not [name for name in got if name.startswith(("resolver_events_", "resolver_outbound_"))]
    assert _figures(StoreFigures(settings, lambda: None)) == {}
    assert _figures(StoreFigures(settings, lambda: service.store)) == {}  # closed: left out, the scrape still answers


def _get(url: str, token: str | None = None, context: ssl.SSLContext | None = None,
         method: str = "GET") -> tuple[int, dict[str, str], str]:
    req = urllib.request.Request(url, method=method, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(req, timeout=10, context=context) as resp:
            return resp.status, dict(resp.headers), resp.read().decode()
    except urllib.error.HTTPError as err:
        with err:
            return err.code, dict(err.headers), err.read().decode()


@pytest.fixture
def secured(tmp_path: Path) -> Iterator[tuple[MetricsEndpoint, dict[str, str], ssl.SSLContext]]:
    """An endpoint with [tls] and [auth] over an empty metrics directory and a real store; its tokens by scope."""
    pki = make_pki(tmp_path / "pki")
    tokens = {scope: new_token(f"t-{scope}", scope) for scope in ("metrics", "resolve")}
    (tmp_path / "tokens").write_text("".join(t.line + "\n" for t in tokens.values()))
    settings = _settings(tmp_path, tls={"cert_file": str(pki.server_cert.path), "key_file": str(pki.server_key.path)},
                         auth={"tokens_file": str(tmp_path / "tokens")})
    (tmp_path / "metrics").mkdir()
    service = build_service(settings)
    endpoint = MetricsEndpoint(settings, str(tmp_path / "metrics"))
    endpoint.serve(service.store)
    try:
        yield endpoint, {scope: t.token for scope, t in tokens.items()}, ssl.create_default_context(
            cadata=pki.ca_cert.pem.decode())
    finally:
        endpoint.stop()
        service.close()


def test_endpoint_serves_https_to_a_token_with_the_metrics_scope(
        secured: tuple[MetricsEndpoint, dict[str, str], ssl.SSLContext]) -> None:
    endpoint, tokens, trust = secured
    assert endpoint.url == f"https://127.0.0.1:{endpoint.port}/metrics" and endpoint.port > 0
    status, headers, body = _get(endpoint.url, tokens["metrics"], trust)
    assert status == 200 and headers["Content-Type"].startswith("text/plain; version=")
    assert "resolver_lmdb_map_size_bytes 6.7108864e+07" in body and "resolver_events_inbox_depth 0.0" in body
    status, headers, _ = _get(endpoint.url, None, trust)
    assert status == 401 and headers["WWW-Authenticate"].startswith("Bearer")
    assert _get(endpoint.url, "rsv_not-a-token-of-the-file", trust)[0] == 401
    assert _get(endpoint.url, tokens["resolve"], trust)[0] == 403  # a token that could resolve customers: no
    assert _get(endpoint.url.replace("/metrics", "/other"), tokens["metrics"], trust)[0] == 404
    status, _, body = _get(endpoint.url, tokens["metrics"], trust, method="HEAD")
    assert status == 200 and body == ""
    with pytest.raises(OSError):  # plaintext is not answered (the connection is closed)
        urllib.request.urlopen(endpoint.url.replace("https:", "http:"), timeout=10)
    assert _get(endpoint.url, tokens["metrics"], trust)[0] == 200  # ... and did not stop the endpoint


def test_endpoint_reloads_tokens_on_sighup(tmp_path: Path,
                                           secured: tuple[MetricsEndpoint, dict[str, str], ssl.SSLContext]) -> None:
    endpoint, tokens, trust = secured
    rotated = new_token("t-new", "metrics")
    (tmp_path / "tokens").write_text(rotated.line + "\n")
    assert endpoint.reload() == []
    assert _get(endpoint.url, tokens["metrics"], trust)[0] == 401
    assert _get(endpoint.url, rotated.token, trust)[0] == 200


def test_endpoint_refuses_a_port_in_use(tmp_path: Path) -> None:
    first = MetricsEndpoint(_settings(tmp_path), str(tmp_path))
    try:
        taken = settings_from_document({"metrics": {"listen": f"127.0.0.1:{first.port}"}}, {})
        with pytest.raises(OSError, match=f"cannot listen for metrics on 127.0.0.1:{first.port}"):
            MetricsEndpoint(taken, str(tmp_path))
    finally:
        first.stop()


def test_blueprint_metrics_table() -> None:
    assert settings_from_document({}, {}).metrics.listen == ""  # off by default
    assert settings_from_document({"metrics": {"listen": "[::1]:9464"}}, {}).metrics.listen == "[::1]:9464"
    with pytest.raises(ConfigError, match="metrics.listen"):
        settings_from_document({"metrics": {"listen": "no-port"}}, {})
    with pytest.raises(ConfigError, match="metrics"):
        settings_from_document({"metrics": {"port": 9464}}, {})
    # [metrics] listen is not [server]'s: the flat override `listen=` still means the gRPC address
    s = settings_from_document({"metrics": {"listen": "127.0.0.1:9464"}}, {}).with_overrides(listen="127.0.0.1:1")
    assert (s.server.listen, s.metrics.listen) == ("127.0.0.1:1", "127.0.0.1:9464")


def test_metrics_off_loopback_falls_under_secure_by_default() -> None:
    exposed = settings_from_document({"metrics": {"listen": "0.0.0.0:9464"}}, {})
    refusal = secure_by_default(exposed)
    assert refusal is not None and "0.0.0.0:9464" in refusal and "TLS and tokens" in refusal
    assert secure_by_default(settings_from_document({"metrics": {"listen": "127.0.0.1:9464"}}, {})) is None
