"""`resolver export` and the import of its file (issue 17 point 3): real server on 127.0.0.1:0, real LMDB, the CLI in
processes of its own (LMDB opens an environment once per process: the servers run in this one).

What is proved: a store with merged customers (a chain of merges), sensitive attributes, shared phones and CRM slots
exports to a file that imports into an empty store and exports again byte for byte; both stores answer Resolve by
every identifier and GetCustomer by every uuid (merged-away ones included) the same, sensitive values read back, and
the per-field event times come along (an older CRM event stays stale on the imported store). The import refuses a
non-empty store, a file cut short, a file that is no export, and sealed values under a key the blueprint lacks,
writing nothing.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import pytest

from resolver.config import Settings, load_settings
from resolver.events.applier import drain_once
from resolver.events.signatures import sign
from resolver.store import Store
from resolver.v1 import resolver_pb2 as pb
from resolver.v1 import resolver_pb2_grpc
from tests.conftest import SERVER_TOML
from tests.integration.helpers import phone, resolve_req, upsert_req

# tests of processes, signals and files: the pure pass runs the same code in process (Makefile test-pure)
pytestmark = pytest.mark.process

ROOT = Path(__file__).resolve().parents[2]
SF_SECRET = b"export-test-webhook-secret"
SSN = {"A": "123-45-6789", "B": "987-65-4321", "F": "555-00-1111", "C": "111-22-3333"}

BLUEPRINT = SERVER_TOML + textwrap.dedent(
    """
    [matching]
    default_region = "US"
    [attributes]
    name = { type = "string" }
    tier = { type = "string" }
    ssn = { type = "string", sensitive = true }
    [views.default]
    fields = ["name", "tier", "ssn"]
    [sources.SALESFORCE]
    field_map = { Tier__c = "tier", SSN__c = "ssn" }
    identifiers = { Phone = "phone", Email = "email" }
    default_region = "US"
    secrets = [{ env = "EXPORT_SF_SECRET" }]
    [events]
    http_listen = ""
    """
)


@pytest.fixture(autouse=True)
def _webhook_secret(monkeypatch: pytest.MonkeyPatch) -> None:
    """The blueprint's webhook secret, in the environment of this process and of the CLI processes."""
    monkeypatch.setenv("EXPORT_SF_SECRET", "whsec_" + base64.b64encode(SF_SECRET).decode())


@pytest.fixture
def blueprint_text() -> str:
    return BLUEPRINT


def run_cli(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "resolver", *map(str, args)], cwd=ROOT, stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, timeout=120, env=dict(os.environ), check=False)


class Server:
    """A running server of `make_server`, its stub and its settings."""

    def __init__(self, running: Any, settings: Settings) -> None:
        self.running = running
        self.settings = settings
        self.stub = resolver_pb2_grpc.IdentityResolverStub(grpc.insecure_channel(f"127.0.0.1:{running.port}"))

    def upsert(self, external_id: str, *, emails: tuple[str, ...] = (), phones: tuple[str, ...] = (),
               **attributes: Any) -> str:
        r = self.stub.Upsert(upsert_req(external_id=external_id, emails=emails, phones=phones, attributes=attributes,
                                        source_system="WEB"), timeout=10)
        return str(r.customer_uuid)

    def merge(self, survivor: str, merged: str) -> None:
        self.stub.Merge(pb.MergeRequest(idempotency_key=str(uuid.uuid4()), survivor_uuid=survivor,
                                        merged_uuids=[merged]), timeout=10)

    def event(self, event_type: str, record_id: str, ts: str, **changes: Any) -> None:
        """A signed CRM event through IngestEvents, applied at once (make_server runs no applier)."""
        body = json.dumps({"event_type": event_type, "source_system": "SALESFORCE", "timestamp": ts,
                           "record_id": record_id, "object_type": "Account",
                           "change_set": {f: {"new_value": v} for f, v in changes.items()}}).encode()
        wid, now = f"msg_{uuid.uuid4().hex}", int(time.time())
        headers = {"webhook-id": wid, "webhook-timestamp": str(now), "webhook-signature": sign(SF_SECRET, wid, now, body)}
        self.stub.IngestEvents(pb.IngestRequest(source="SALESFORCE", body=body, headers=headers), timeout=10)
        service = self.running.service
        while drain_once(service.store, self.settings, service.schema, 100):
            pass

    def customer(self, customer_uuid: str) -> pb.Customer:
        return self.stub.GetCustomer(pb.GetCustomerRequest(customer_uuid=customer_uuid), timeout=10)

    def resolve(self, **ids: Any) -> pb.ResolveResponse:
        return self.stub.Resolve(resolve_req(**ids), timeout=10)


@pytest.fixture
def start(make_server: Callable[[Settings], Any]) -> Callable[[Settings], Server]:
    return lambda s: Server(make_server(s), s)


def populate(srv: Server) -> dict[str, str]:
    """Customers with everything an export must carry; their uuids by name (E and F are merged away)."""
    ids = {
        "A": srv.upsert("crm-A", emails=("Ann@Example.com",), phones=(phone(1), phone(2)), name="Ann", tier="gold",
                        ssn=SSN["A"]),
        "B": srv.upsert("crm-B", emails=("bob@example.com",), phones=(phone(3),), name="Bob", ssn=SSN["B"]),
        "D": srv.upsert("crm-D", phones=(phone(1),), name="Dee"),  # shares phone 1 with A
        "E": srv.upsert("crm-E", emails=("eve@example.com",), name="Eve"),
        "F": srv.upsert("crm-F", emails=("fay@example.com",), ssn=SSN["F"]),
    }
    srv.merge(ids["E"], ids["F"])
    srv.merge(ids["B"], ids["E"])  # F -> E -> B: a chain of aliases
    # CRM slots: C is made by the CRM, its phone slot moves; A gains a CRM email slot beside its Upsert ones
    srv.event("CREATE", "sf-C", "2024-01-01T00:00:00Z", Phone="(650) 253-0004", Email="Cy@Example.com",
              SSN__c=SSN["C"], Tier__c="silver")
    srv.event("UPDATE", "sf-C", "2024-02-01T00:00:00Z", Phone=phone(5), Tier__c="platinum")
    srv.event("UPDATE", "crm-A", "2024-03-01T00:00:00Z", Email="ann@work.example")
    ids["C"] = srv.resolve(external_id="sf-C").customer_uuid
    return ids


PROBES: list[dict[str, Any]] = (
    [{"external_id": x} for x in ("crm-A", "crm-B", "crm-D", "crm-E", "crm-F", "sf-C", "nobody")]
    + [{"emails": (e,)} for e in ("ann@example.com", "ann@work.example", "bob@example.com", "eve@example.com",
                                  "fay@example.com", "cy@example.com")]
    + [{"phones": (phone(i),)} for i in range(1, 6)]
)


def test_export_import_export_is_byte_identical_and_answers_the_same(
        tmp_path: Path, settings: Settings, blueprint_file: Path, start: Callable[[Settings], Server]) -> None:
    one = start(settings)
    ids = populate(one)
    first, second = tmp_path / "one.jsonl", tmp_path / "two.jsonl"
    r = run_cli("export", first, "--config", blueprint_file, "--data-dir", settings.server.data_dir)
    assert r.returncode == 0, r.stderr
    assert "export: " in r.stdout and "4 customers, 2 aliases" in r.stdout

    lines = [json.loads(x) for x in first.read_text().splitlines()]
    assert lines[0] == {"resolver_export": 1, "store_format": 1}
    assert lines[-1] == {"resolver_export_end": {"aliases": 2, "customers": 4}}
    customers = {c["uuid"]: c for c in lines[1:-1]}
    assert list(customers) == sorted(customers) == sorted(ids[k] for k in "ABCD")
    assert customers[ids["B"]]["aliases"] == sorted([ids["E"], ids["F"]])
    assert customers[ids["B"]]["merged_external_ids"] == ["crm-E", "crm-F"]
    c = customers[ids["C"]]
    assert c["phones"] == [phone(5)] and c["held"][f"phone:{phone(5)}"] and c["slot_us"]
    assert set(c["event_us"]) == {"ssn", "tier"}
    assert set(customers[ids["A"]]["held"]["email:ann@work.example"]) == {"slot:SALESFORCE:Email:crm-A"}
    # sensitive values stay sealed: no plaintext in the file
    assert all(set(x["attributes"].get("ssn", {"enc": ""})) == {"enc"} for x in customers.values())
    assert not [s for s in SSN.values() if s in first.read_text()]

    imported = tmp_path / "imported"
    r = run_cli("import", first, "--config", blueprint_file, "--data-dir", imported)  # recognised by its header
    assert r.returncode == 0, r.stderr
    assert "4 customers, 2 aliases" in r.stdout and "check OK" in r.stdout
    r = run_cli("export", second, "--config", blueprint_file, "--data-dir", imported)
    assert r.returncode == 0, r.stderr
    assert second.read_bytes() == first.read_bytes()

    two = start(settings.with_overrides(data_dir=str(imported)))
    for probe in PROBES:
        assert two.resolve(**probe) == one.resolve(**probe), probe
    assert one.resolve(phones=(phone(1),)).outcome == pb.OUTCOME_AMBIGUOUS
    assert two.resolve(external_id="crm-F").customer_uuid == ids["B"]
    # a merge keeps the most recent value per field: B, and E and F through it, show F's
    shown_ssn = {"A": SSN["A"], "B": SSN["F"], "C": SSN["C"], "E": SSN["F"], "F": SSN["F"]}
    for name, customer_uuid in ids.items():
        got = two.customer(customer_uuid)
        assert got == one.customer(customer_uuid), name
        if name in shown_ssn:
            assert got.attributes["ssn"] == shown_ssn[name]  # opened: sealed under the uuid the import kept
    assert two.customer(ids["F"]).customer_uuid == ids["B"]  # a merged-away uuid resolves to its survivor

    # the per-field event times came along: an event older than the one that set tier leaves it alone
    two.event("UPDATE", "sf-C", "2024-01-15T00:00:00Z", Tier__c="bronze")
    assert two.customer(ids["C"]).attributes["tier"] == "platinum"


def test_import_of_an_export_refuses_what_it_cannot_load_whole(
        tmp_path: Path, settings: Settings, blueprint_file: Path, start: Callable[[Settings], Server]) -> None:
    srv = start(settings)
    populate(srv)
    export = tmp_path / "all.jsonl"
    assert run_cli("export", export, "--config", blueprint_file, "--data-dir", settings.server.data_dir).returncode == 0
    r = run_cli("export", export, "--config", blueprint_file, "--data-dir", settings.server.data_dir)
    assert r.returncode == 2 and "exists" in r.stderr  # never overwrites

    # into a store that holds customers
    r = run_cli("import", export, "--config", blueprint_file, "--data-dir", settings.server.data_dir)
    assert r.returncode == 2
    assert "is not empty" in r.stderr and "merging an export into existing customers is not supported" in r.stderr

    def refused(name: str, text: str, *extra: str) -> str:
        path = tmp_path / f"{name}.jsonl"
        path.write_text(text)
        target = tmp_path / name
        r = run_cli("import", path, "--config", blueprint_file, "--data-dir", target, *extra)
        assert r.returncode == 2, r.stdout
        assert "nothing was imported" in r.stderr
        store = Store(settings.with_overrides(data_dir=str(target)), readonly=True)
        try:
            with store.read() as view:
                assert view.count("records") == view.count("aliases") == view.count("ix_email") == 0
        finally:
            store.close()
        return r.stderr

    whole = export.read_text().splitlines(keepends=True)
    assert "incomplete" in refused("cut", "".join(whole[:-1]))  # the trailer is missing
    assert "out of uuid order" in refused("shuffled", "".join([whole[0], whole[2], whole[1], *whole[3:]]))
    plain = json.dumps({"idempotency_key": "k1", "identifiers": {"external_id": "x-1"}}) + "\n"  # an Upsert row
    assert "not a resolver export" in refused("plain", plain, "--format", "export")

    # sealed values under a key id the importing blueprint does not hold
    other = tmp_path / "other-key.toml"
    other.write_text(BLUEPRINT.replace('id = "test"', 'id = "other"'))
    target = tmp_path / "other-key"
    r = run_cli("import", export, "--config", other, "--data-dir", target)
    assert r.returncode == 2 and "key id 'test'" in r.stderr and "nothing was imported" in r.stderr
    assert not [s for s in SSN.values() if s in r.stderr]
    store = Store(load_settings(other, data_dir=str(target)), readonly=True)
    try:
        with store.read() as view:
            assert view.count("records") == 0
    finally:
        store.close()
