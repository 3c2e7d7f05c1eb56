"""Standard Webhooks signatures: several secrets, several signatures, tolerance both ways, redaction."""

from __future__ import annotations

import base64

import pytest

from resolver.config import settings_from_document
from resolver.errors import ConfigError, Unauthenticated
from resolver.events.signatures import redact, sign, verify

BODY = b'{"x": 1}'
NOW = 1_700_000_000


def headers(secret: bytes, wid: str = "msg_1", ts: int = NOW, body: bytes = BODY) -> dict[str, str]:
    return {"webhook-id": wid, "webhook-timestamp": str(ts), "webhook-signature": sign(secret, wid, ts, body)}


def test_valid_signature_returns_the_id() -> None:
    assert verify(headers(b"k1"), BODY, [b"k1"], NOW, 300) == "msg_1"


def test_any_configured_secret_and_any_listed_signature_is_enough() -> None:
    h = headers(b"new")
    assert verify(h, BODY, [b"old", b"new"], NOW, 300) == "msg_1"
    h["webhook-signature"] = "v1,AAAA " + sign(b"old", "msg_1", NOW, BODY) + " v2,ignored"
    assert verify(h, BODY, [b"old"], NOW, 300) == "msg_1"


@pytest.mark.parametrize(
    "change",
    [
        {"webhook-id": ""},
        {"webhook-timestamp": ""},
        {"webhook-signature": ""},
        {"webhook-timestamp": "soon"},
        {"webhook-timestamp": str(NOW - 301)},
        {"webhook-timestamp": str(NOW + 301)},
        {"webhook-signature": "v1,bm90IGl0"},
        {"webhook-signature": "v0," + sign(b"k1", "msg_1", NOW, BODY)[3:]},
    ],
)
def test_refused(change: dict[str, str]) -> None:
    h = headers(b"k1") | change
    with pytest.raises(Unauthenticated):
        verify(h, BODY, [b"k1"], NOW, 300)


def test_tampered_body_and_wrong_secret_are_refused() -> None:
    with pytest.raises(Unauthenticated):
        verify(headers(b"k1"), BODY + b" ", [b"k1"], NOW, 300)
    with pytest.raises(Unauthenticated):
        verify(headers(b"k2"), BODY, [b"k1"], NOW, 300)
    with pytest.raises(Unauthenticated):
        verify(headers(b"k1"), BODY, [], NOW, 300)


def test_redact_hides_signatures() -> None:
    assert redact(headers(b"k1"))["webhook-signature"] == "[redacted]"


def test_whsec_secrets_are_decoded_and_raw_ones_kept() -> None:
    key = b"\x01\x02secret-bytes"
    doc = {"attributes": {"status": {"type": "string"}},
           "sources": {"CRM": {"field_map": {"S": "status"},
                               "secrets": [{"env": "A"}, {"env": "B"}, {"env": "MISSING"}]}}}
    env = {"A": "whsec_" + base64.b64encode(key).decode(), "B": "plain-secret"}
    s = settings_from_document(doc, env)
    assert s.sources["CRM"].secrets == (key, b"plain-secret")
    assert s.sources["CRM"].unresolved == ("env MISSING",)
    assert s.events.enabled and s.events.http_listen == "127.0.0.1:8081"
    assert "plain-secret" not in repr(s)


def test_field_map_targets_must_be_declared() -> None:
    doc = {"attributes": {"status": {"type": "string"}},
           "sources": {"CRM": {"field_map": {"S": "status", "T": "nope"}}}}
    with pytest.raises(ConfigError) as e:
        settings_from_document(doc, {})
    assert "nope" in str(e.value)
