"""The blueprint: the example validates, every problem is reported at once, secrets stay out of sight."""

from __future__ import annotations

from pathlib import Path

import pytest

from resolver.config import describe, load_settings, settings_from_document
from resolver.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]


def test_no_blueprint_runs_on_defaults() -> None:
    s = load_settings(None)
    assert (s.listen, str(s.data_dir), s.hash_algorithm, s.phone_acceptance) == (
        "127.0.0.1:50051", "data", "xxh3-128", "valid")
    assert s.open_schema and s.idempotency_retention_s == 86400


def test_example_blueprint_is_valid() -> None:
    s = load_settings(ROOT / "examples" / "blueprint.toml")
    assert s.default_region == "US" and s.views["default"][0] == "name"
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
    }
    with pytest.raises(ConfigError) as e:
        settings_from_document(doc, {})
    joined = "\n".join(e.value.problems)
    for expected in ("matching.default_region", "matching.precedence", "attributes.n.max_length",
                     "views.default.fields", "index.secret", "index.key_id"):
        assert expected in joined


def test_secret_by_reference_only_and_never_shown(tmp_path: Path) -> None:
    doc = {"index": {"hash": "blake2b", "key_id": "k1", "secret": {"env": "IDX_KEY"}}}
    s = settings_from_document(doc, {"IDX_KEY": "s3cret-value"})
    assert s.hash_secret == b"s3cret-value"
    assert "s3cret-value" not in describe(s) and "s3cret-value" not in repr(s)
    with pytest.raises(ConfigError, match="IDX_KEY is not set"):
        settings_from_document(doc, {})
    key_file = tmp_path / "key"
    key_file.write_text("from-file\n")
    s = settings_from_document({"index": {"hash": "blake2b", "key_id": "k1", "secret": {"file": str(key_file)}}}, {})
    assert s.hash_secret == b"from-file"


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
