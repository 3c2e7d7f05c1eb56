"""Outbound delivery's pure parts: the verdict on an answer, Retry-After, the back-off, what a change becomes for a
destination, the masked payload, and the `[outbound.NAME]` blueprint table."""

from __future__ import annotations

import base64
import email.utils
from typing import Any

import orjson
import pytest

from resolver.config import describe, settings_from_document
from resolver.errors import ConfigError
from resolver.outbound import policy
from resolver.outbound.messages import Route, masked_payload, webhook_id

NOW = 1_800_000_000.0
SECRET = {"OUT": "whsec_" + base64.b64encode(b"k").decode()}


def settings(**dest: Any) -> Any:
    doc = {"version": 1, "server": {"insecure": True},  # the sensitive ssn stored in clear: no key needed here
           "attributes": {"status": {"type": "string"}, "tier": {"type": "string"}, "ssn": {"type": "string",
                                                                                          "sensitive": True}},
           "outbound": {"CRM": {"url": "https://crm.example/hooks", "secrets": [{"env": "OUT"}],
                                "events": ["customer.created", "customer.updated", "customer.deleted",
                                           "customer.merged"]} | dest}}
    return settings_from_document(doc, SECRET)


@pytest.mark.parametrize(("status", "outcome"), [(200, policy.ACK), (204, policy.ACK), (429, policy.RETRY),
                                                 (500, policy.RETRY), (503, policy.RETRY), (400, policy.DEAD),
                                                 (404, policy.DEAD), (422, policy.DEAD), (301, policy.DEAD)])
def test_the_verdict_on_each_answer(status: int, outcome: str) -> None:
    v = policy.judge(status, None, NOW)
    assert v.outcome == outcome and v.throttled == (status == 429)
    assert v.error == ("" if outcome == policy.ACK else f"HTTP {status}")


def test_retry_after_in_seconds_or_as_an_http_date() -> None:
    assert policy.retry_after_seconds("120", NOW) == 120.0
    assert policy.retry_after_seconds(" 0 ", NOW) == 0.0
    assert policy.retry_after_seconds(email.utils.formatdate(NOW + 30, usegmt=True), NOW) == 30.0
    assert policy.retry_after_seconds(email.utils.formatdate(NOW - 30, usegmt=True), NOW) == 0.0  # past: at once
    assert policy.retry_after_seconds("10" * 20, NOW) == policy.MAX_RETRY_AFTER_S
    for junk in (None, "", "soon", "-5", "1.5", "Mon, 99 Foo 2024 99:99:99 GMT"):
        assert policy.retry_after_seconds(junk, NOW) is None
    v = policy.judge(429, "7", NOW)
    assert (v.retry_after_s, v.error) == (7.0, "HTTP 429 (Retry-After 7)")


def test_back_off_doubles_to_its_ceiling_with_jitter_in_the_upper_half() -> None:
    assert [policy.backoff_s(n, 1.0, 300.0, rand=lambda: 1.0) for n in (1, 2, 3, 4)] == [1.0, 2.0, 4.0, 8.0]
    assert policy.backoff_s(1, 1.0, 300.0, rand=lambda: 0.0) == 0.5
    assert policy.backoff_s(50, 1.0, 300.0, rand=lambda: 1.0) == 300.0
    assert policy.backoff_s(10_000, 0.05, 0.2, rand=lambda: 0.0) == 0.1  # no overflow however many failures
    assert policy.failed(ConnectionResetError("peer reset")).outcome == policy.RETRY
    assert policy.failed(TimeoutError()).error == "TimeoutError"


def change(action: str, seq: int = 7, **kw: Any) -> dict[str, Any]:
    return {"seq": seq, "at_us": 1_700_000_000_000_000, "customer_uuid": "0190c3a5-0000-7000-8000-000000000001",
            "action": action, "version": 2, "source_system": "IVR", **kw}


def data(msg: Any) -> dict[str, Any]:
    doc = orjson.loads(msg.body)
    assert doc["type"] == msg.event_type and doc["timestamp"] == "2023-11-14T22:13:20.000000Z"
    return dict(doc["data"])


def test_fields_decide_what_is_sent_and_sensitive_attributes_stay_home() -> None:
    listed = Route(settings(fields=["status"]).outbound["CRM"], settings(fields=["status"]))
    everything = Route(settings().outbound["CRM"], settings())
    updated = change("UPDATED", attributes={"status": "Churned", "tier": "gold", "ssn": "123-45-6789"},
                     attributes_old={"status": "Active", "tier": None, "ssn": None},
                     added=[[2, "a@example.com"]])
    m = listed.message(updated, "EXT-1")
    assert m is not None and m.webhook_id == webhook_id("CRM", 7) == "msg_CRM_7"
    assert data(m) == {"customer_uuid": change("X")["customer_uuid"], "sequence": 7, "version": 2,
                       "source_system": "IVR", "external_id": "EXT-1", "attributes": {"status": "Churned"},
                       "previous": {"status": "Active"}}
    d = data(everything.message(updated, "EXT-1"))
    assert d["attributes"] == {"status": "Churned", "tier": "gold"}  # no ssn without being listed
    assert d["identifiers_added"] == {"emails": ["a@example.com"]} and d["identifiers_removed"] == {}
    assert listed.message(change("UPDATED", attributes={"tier": "gold"}, attributes_old={"tier": None}), None) is None
    assert everything.message(change("UPDATED", attributes={}, attributes_old={}), None) is None  # nothing visible
    assert everything.message(change("UNCHANGED"), None) is None


def test_no_echo_and_no_unsubscribed_events() -> None:
    s = settings(source_system="SALESFORCE")
    route = Route(s.outbound["CRM"], s)
    assert route.message(change("CREATED", source_system="SALESFORCE", added=[[1, "X"]]), "X") is None
    assert route.message(change("CREATED", added=[[1, "X"]]), "X") is not None
    assert route.message(change("UNMERGED", restored_uuid="u"), None) is None  # not subscribed
    assert settings().outbound["CRM"].source_system == "CRM"  # by default: the destination's own name


def test_deleted_carries_no_pii_and_merged_names_whose_pii_it_copies() -> None:
    route = Route(settings().outbound["CRM"], settings())
    deleted = route.message(change("DELETED", erased_uuids=["u1", "u2"]), None)
    assert deleted is not None and deleted.owners == ()
    assert data(deleted) == {"customer_uuid": change("X")["customer_uuid"], "sequence": 7, "version": 2,
                             "source_system": "IVR", "erased_uuids": ["u1", "u2"]}
    merged = route.message(change("MERGED", merged_uuids=["m1"], added=[[3, "+16502530001"]], attributes={},
                                  attributes_old={}), "EXT")
    assert merged is not None and merged.owners == (change("X")["customer_uuid"], "m1")


def test_masked_payload_shows_no_identifier_or_value() -> None:
    route = Route(settings().outbound["CRM"], settings())
    m = route.message(change("CREATED", added=[[1, "CUST-123456"], [2, "jane.doe@example.com"], [3, "+16502530001"]],
                             attributes={"status": "Platinum-Secret"}), "CUST-123456")
    assert m is not None
    shown = masked_payload(m.body)
    for raw in ("CUST-123456", "jane.doe", "6502530001", "Platinum-Secret"):
        assert raw not in shown
    doc = orjson.loads(shown)
    assert doc["type"] == "customer.created" and doc["data"]["sequence"] == 7
    assert doc["data"]["identifiers"]["emails"] == ["j***@example.com"]
    assert masked_payload(b"\xff") == "(not JSON: 1 bytes)"


def test_the_blueprint_table_is_checked_and_described() -> None:
    s = settings(fields=["status"], rate_per_s=0, max_age_s=60)
    dest = s.outbound["CRM"]
    assert dest.secrets == (b"k",) and dest.rate_per_s == 0 and dest.max_age_s == 60 and dest.fields == ("status",)
    assert "outbound CRM: https://crm.example/hooks; customer.created" in describe(s)
    assert "no rate limit" in describe(s)
    with pytest.raises(ConfigError) as err:
        settings(url="ftp://x", fields=["nope"], events=["customer.exploded"], backoff_initial_s=5, backoff_max_s=1,
                 secrets=[])
    text = str(err.value)
    for expected in ("outbound.CRM.url", "outbound.CRM.events", "outbound.CRM.secrets"):
        assert expected in text
    with pytest.raises(ConfigError) as err:
        settings(fields=["nope"], backoff_initial_s=5, backoff_max_s=1)
    assert "outbound.CRM.fields: 'nope' is not a declared attribute" in str(err.value)
    assert "outbound.CRM.backoff_max_s: below backoff_initial_s" in str(err.value)
    with pytest.raises(ConfigError) as err:  # a sensitive attribute never leaves: listing it is refused, not ignored
        settings(fields=["tier", "ssn"])
    assert err.value.problems == ["outbound.CRM.fields: 'ssn' is sensitive: it is stored encrypted and never leaves "
                                  "in a message (drop it from fields)"]
    with pytest.raises(ConfigError, match=r"outbound.CRM.url: no credentials in the URL"):
        settings(url="https://user:pw@crm.example/hooks")
    unset = settings_from_document({"version": 1, "outbound": {"X": {"url": "http://h", "secrets": [{"env": "NOPE"}],
                                                                     "events": ["customer.deleted"]}}}, {})
    assert unset.outbound["X"].unresolved == ("env NOPE",) and "UNRESOLVED: env NOPE" in describe(unset)


def test_the_serving_processes_leave_out_the_background_children() -> None:
    """The applier and the deliverer pace by the gRPC side's CPU: neither counts the other (or itself) as serving."""
    import os
    import subprocess
    import sys
    import time

    from resolver.events import pace

    named = "import ctypes, sys, time; ctypes.CDLL(None).prctl(15, sys.argv[1].encode(), 0, 0, 0); time.sleep(60)"
    kids = {name: subprocess.Popen([sys.executable, "-c", named, name])
            for name in (pace.EVENTS_PROCESS, pace.OUTBOUND_PROCESS, "worker-like")}
    try:
        deadline = time.monotonic() + 20
        while any(pace.comm(p.pid) != name for name, p in kids.items()):
            assert time.monotonic() < deadline, "the children did not name themselves"
            time.sleep(0.02)
        procs = pace.serving_processes(os.getpid(), kids[pace.OUTBOUND_PROCESS].pid)
        procs.cpu_seconds()
        assert os.getpid() in procs.watched and kids["worker-like"].pid in procs.watched
        assert kids[pace.EVENTS_PROCESS].pid not in procs.watched
        assert kids[pace.OUTBOUND_PROCESS].pid not in procs.watched
    finally:
        for p in kids.values():
            p.kill()
            p.wait()
