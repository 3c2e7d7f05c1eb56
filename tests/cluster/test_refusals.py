"""What a cluster node refuses, said plainly and in bounded time: NATS out of reach, a blueprint that would write
outside the log, and the commands that would change one node's store behind the others."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from resolver.bootstrap import build_service
from resolver.cli import main
from resolver.config import settings_from_document
from resolver.errors import ClusterError, ConfigError

CLUSTER = {"nats": ["nats://127.0.0.1:1"], "connect_timeout_s": 0.5}


def test_nats_out_of_reach_is_a_clear_error_in_bounded_time(tmp_path: Path) -> None:
    settings = settings_from_document({"version": 1, "server": {"workers": 1, "data_dir": str(tmp_path / "d")},
                                       "storage": {"map_size_mb": 64}, "cluster": CLUSTER}, {})
    started = time.monotonic()
    with pytest.raises(ClusterError, match="cannot reach NATS at nats://127.0.0.1:1"):
        build_service(settings)
    assert time.monotonic() - started < 10


@pytest.mark.parametrize(("table", "problem"), [
    ({"server": {"workers": 2}}, "server.workers: a cluster node serves with one worker"),
    ({"server": {"workers": 1}, "cluster": {**CLUSTER, "nats": ["127.0.0.1:4222"]}}, "is not a nats:// URL"),
    ({"server": {"workers": 1}, "cluster": {**CLUSTER, "max_silence_s": 1}}, "cluster.max_silence_s: at least 2"),
])
def test_a_blueprint_that_would_write_outside_the_log_is_refused(table: dict[str, object], problem: str) -> None:
    with pytest.raises(ConfigError, match=problem):
        settings_from_document({"version": 1, "cluster": CLUSTER, **table}, {})


def test_change_events_outbound_delivery_and_retention_are_served_by_a_cluster_node() -> None:
    """They go through the replicated log (resolver.events.command, resolver.outbound.settle,
    resolver.cluster.retention): not refused."""
    settings = settings_from_document({
        "version": 1, "cluster": CLUSTER, "server": {"workers": 1}, "events": {"enabled": True},
        "changes": {"retention_days": 7, "retention_count": 100},
        "outbound": {"CRM": {"url": "http://127.0.0.1:9/hook", "events": ["customer.created"],
                             "secrets": [{"env": "CRM_OUT_SECRET"}]}},
    }, {"CRM_OUT_SECRET": "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"})
    assert settings.events.enabled and list(settings.outbound) == ["CRM"]
    assert (settings.changes.retention_days, settings.changes.retention_count) == (7, 100)


@pytest.mark.parametrize("argv", [["import", "customers.jsonl"], ["forget", "01900000-0000-7000-8000-000000000001",
                                                                   "--reason", "erasure"],
                                  ["dlq", "replay", "1"], ["outbound", "discard", "1"]])
def test_commands_that_change_one_node_behind_the_log_are_refused(argv: list[str], tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    blueprint = tmp_path / "node.toml"
    blueprint.write_text('version = 1\n[server]\nworkers = 1\n[cluster]\nnats = ["nats://127.0.0.1:1"]\n')
    assert main([*argv, "--config", str(blueprint), "--data-dir", str(tmp_path / "d")]) == 2
    assert "changes only through the replicated log" in capsys.readouterr().err
    assert not (tmp_path / "d").exists()  # nothing was opened
