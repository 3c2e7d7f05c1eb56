"""The blueprint: the example validates, every problem is reported at once, secrets stay out of sight."""

from __future__ import annotations

import base64
from pathlib import Path

import pytest

from resolver.config import (
    EventSettings,
    MatchingSettings,
    ServerSettings,
    Settings,
    describe,
    load_settings,
    settings_from_document,
)
from resolver.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]


def test_no_blueprint_runs_on_defaults() -> None:
    s = load_settings(None)
    assert (s.server.listen, str(s.server.data_dir), s.index.hash, s.matching.phone_acceptance) == (
        "127.0.0.1:50051", "data", "xxh3-128", "valid")
    assert s.open_schema and s.reliability.idempotency_retention_s == 86400


def test_example_blueprint_is_valid() -> None:
    s = load_settings(ROOT / "examples" / "blueprint.toml")
    assert s.matching.default_region == "US" and s.views["default"][0] == "name"
    assert s.attributes["status"].owner == "SALESFORCE"
    assert "attributes (7)" in describe(s)


def test_every_problem_is_listed() -> None:
    doc = {
        "server": {"workers": 0, "bogus": 1},
        "matching": {"default_region": "QQ", "precedence": ["phone", "email", "external_id"]},
        "attributes": {"x": {"type": "strin"}},
    }
    with pytest.raises(ConfigError) as e:
        settings_from_document(doc, {})
    text = str(e.value)
    assert "server.workers" in text and "server" in text and "attributes.x.type" in text
    assert len(e.value.problems) >= 3


def test_semantic_problems_are_listed_together() -> None:
    doc = {
        "matching": {"default_region": "QQ", "precedence": ["phone", "email", "external_id"]},
        "attributes": {"n": {"type": "integer", "max_length": 3}},
        "views": {"default": {"fields": ["n", "ghost"]}},
        "index": {"hash": "blake2b"},
        "server": {"workers": 4, "worker_port_base": 65534},
        "events": {"enabled": True, "max_body_bytes": 1024 * 1024},
    }
    with pytest.raises(ConfigError) as e:
        settings_from_document(doc, {})
    joined = "\n".join(e.value.problems)
    for expected in ("matching.default_region", "matching.precedence", "attributes.n.max_length",
                     "views.default.fields", "index.secret", "index.key_id", "server.worker_port_base",
                     "limits.message_bytes"):
        assert expected in joined


def test_secret_by_reference_only_and_never_shown(tmp_path: Path) -> None:
    doc = {"index": {"hash": "blake2b", "key_id": "k1", "secret": {"env": "IDX_KEY"}}}
    s = settings_from_document(doc, {"IDX_KEY": "s3cret-value"})
    assert s.index.secret == b"s3cret-value"
    assert "s3cret-value" not in describe(s) and "s3cret-value" not in repr(s)
    with pytest.raises(ConfigError, match="IDX_KEY is not set"):
        settings_from_document(doc, {})
    key_file = tmp_path / "key"
    key_file.write_text("from-file\n")
    s = settings_from_document({"index": {"hash": "blake2b", "key_id": "k1", "secret": {"file": str(key_file)}}}, {})
    assert s.index.secret == b"from-file"


def test_missing_and_malformed_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no such file"):
        load_settings(tmp_path / "nope.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[server\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_settings(bad)


def test_events_process_priority_is_validated() -> None:
    default = settings_from_document({}, {}).events
    assert (default.process_nice, default.process_sched_idle) == (10, True)
    s = settings_from_document({"events": {"process_nice": 0, "process_sched_idle": False}}, {})
    assert (s.events.process_nice, s.events.process_sched_idle) == (0, False)
    assert "nice +0" in describe(s) and "SCHED_IDLE" not in describe(s)
    assert "nice +10 (SCHED_IDLE)" in describe(settings_from_document({}, {}))
    for bad in (-1, 20, 2.5, "10", True):
        with pytest.raises(ConfigError) as e:
            settings_from_document({"events": {"process_nice": bad}}, {})
        assert "events.process_nice" in str(e.value), bad


def test_an_absent_key_takes_its_table_default() -> None:
    doc = {"server": {"listen": "[::1]:7000", "grace_period_s": 2}, "matching": {"default_region": "gb"}}
    s = settings_from_document(doc, {})
    assert s.server == ServerSettings(listen="[::1]:7000", grace_period_s=2.0)
    assert isinstance(s.server.grace_period_s, float)
    assert s.matching == MatchingSettings(default_region="GB")
    assert s.events == EventSettings() and s == Settings(server=s.server, matching=s.matching)
    with_source = settings_from_document({"sources": {"CRM": {}}}, {})
    assert with_source.events == EventSettings(enabled=True)  # declaring a source turns events on


def test_flat_overrides_land_in_their_table_and_are_revalidated(tmp_path: Path) -> None:
    s = load_settings(None, data_dir=str(tmp_path), max_fanout=4, idempotency_retention_s=1, rate_per_s=None)
    assert (s.server.data_dir, s.matching.max_fanout, s.reliability.idempotency_retention_s) == (tmp_path, 4, 1.0)
    assert s.events.rate_per_s == EventSettings().rate_per_s  # None: not overridden
    t = s.with_overrides(events=EventSettings(rate_per_s=7), high_water=5, listen="[::1]:0")
    assert (t.events.rate_per_s, t.events.high_water, t.server.listen, t.server.data_dir) == (7, 5, "[::1]:0", tmp_path)
    with pytest.raises(ConfigError, match="server.listen: 'nowhere' is not HOST:PORT"):
        s.with_overrides(listen="nowhere")
    with pytest.raises(ConfigError, match="events.http_listen: '127.0.0.1:70000' is not HOST:PORT"):
        s.with_overrides(http_listen="127.0.0.1:70000")
    with pytest.raises(TypeError):
        s.with_overrides(no_such_setting=1)


def test_listen_addresses_are_validated_by_one_parser() -> None:
    assert settings_from_document({"events": {"http_listen": ""}}, {}).events.http_listen == ""
    for bad in ("[::1]:65536", ":80"):
        with pytest.raises(ConfigError, match=r"server\.listen: .* is not HOST:PORT"):
            settings_from_document({"server": {"listen": bad}}, {})


def test_security_tables_are_validated() -> None:
    key = base64.b64encode(b"k" * 32).decode()
    env = {"K1": key, "SHORT": base64.b64encode(b"k" * 16).decode()}
    doc = {"version": 1, "attributes": {"ssn": {"type": "string", "sensitive": True}},
           "encryption": {"keys": [{"id": "k1", "key": {"env": "K1"}}]}}
    s = settings_from_document(doc, env)
    assert [k.id for k in s.encryption.keys] == ["k1"] and s.encryption.keys[0].key == b"k" * 32
    assert key not in repr(s)  # a key is never shown
    with pytest.raises(ConfigError) as err:
        settings_from_document({"version": 1, "attributes": {"ssn": {"type": "string", "sensitive": True}},
                                "encryption": {"keys": [{"id": "a", "key": {"env": "SHORT"}},
                                                        {"id": "b", "key": {"env": "UNSET"}}]}}, env)
    text = "\n".join(err.value.problems)
    assert "encryption.keys[0].key: must be 32 bytes" in text
    assert "encryption.keys[1].key: environment variable UNSET is not set" in text
    with pytest.raises(ConfigError) as err:
        settings_from_document({"version": 1, "logging": {"format": "xml"}}, env)
    assert "logging.format" in "\n".join(err.value.problems)
    with pytest.raises(ConfigError) as err:
        settings_from_document({"version": 1, "attributes": {"ssn": {"type": "string", "sensitive": True}},
                                "tls": {"cert_file": "x.crt", "client_ca_file": "ca.crt"}}, env)
    text = "\n".join(err.value.problems)
    assert "tls: cert_file and key_file go together" in text
    assert "attributes.ssn: sensitive attributes are stored encrypted" in text
    # the demo's escape hatch: stored in clear, said so explicitly
    insecure = {"version": 1, "server": {"insecure": True}, "attributes": {"ssn": {"type": "string", "sensitive": True}}}
    assert settings_from_document(insecure, env).server.insecure
