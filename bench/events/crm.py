"""The CRM's events: which customer event j updates and how, its webhook id, and the signing key.

The pusher builds the events from these, and the accounting recomputes them to check what the server stored,
so both sides agree on event j without passing the events around.
"""

from __future__ import annotations

import base64
import json
import math
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

SOURCE = "SALESFORCE"
SECRET_ENV = "BENCH_EVENTS_SALESFORCE_SECRET"  # the blueprint reads the secret from here; the pusher too
EVENT_EPOCH = datetime(2026, 1, 1, tzinfo=UTC)


@dataclass(frozen=True, slots=True)
class Event:
    """What event j sets on one customer."""

    external_id: str
    status: str
    credit_limit: int
    timestamp: str


def _stride(customers: int) -> int:
    """A step coprime with `customers`, so event j touches customer (j * stride) % customers: all of them once
    before any twice, spread over the key space."""
    return next(s for s in (7919, 7907, 7901, 1) if math.gcd(s, customers) == 1)


def event_of(j: int, customers: int) -> Event:
    """Event j. Later events have later timestamps."""
    ext = f"CRM-{(j * _stride(customers)) % customers:09d}"
    when = (EVENT_EPOCH + timedelta(seconds=j)).strftime("%Y-%m-%dT%H:%M:%SZ")
    return Event(ext, "Churned" if j % 3 == 0 else "Active", j + 1, when)


def event_body(j: int, customers: int) -> bytes:
    """Event j as the CRM posts it: an UPDATE of the two fields the SALESFORCE source owns."""
    ev = event_of(j, customers)
    return json.dumps({"event_type": "UPDATE", "source_system": SOURCE, "timestamp": ev.timestamp,
                       "record_id": ev.external_id, "object_type": "Account",
                       "change_set": {"Customer_Status__c": {"new_value": ev.status},
                                      "Credit_Limit__c": {"new_value": ev.credit_limit}}}).encode()


def webhook_prefix(run_id: str) -> str:
    """The start of every webhook id of one run; the event number follows it."""
    return f"msg_drain_{run_id}_"


def webhook_id(run_id: str, j: int) -> str:
    return f"{webhook_prefix(run_id)}{j}"


def new_secret() -> str:
    """A random Standard Webhooks secret for one run."""
    return "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()


def secret_key(value: str) -> bytes:
    """The HMAC key of a Standard Webhooks secret, as the server reads it (resolver.config)."""
    return base64.b64decode(value[6:]) if value.startswith("whsec_") else value.encode()
