"""Model-based test (issue 18, item 6): a hypothesis state machine drives the REAL server (in process, on
127.0.0.1:0, a real LMDB directory, the real event applier) with Upsert (creates, updates, explicit removals,
attributes, retries of earlier keys = ledger replays, reuses of a key for another request), Resolve, GetCustomer,
Merge, Unmerge, a CRM DELETE (a signed change event through IngestEvents, applied by the applier: the step waits
until the event counters say it was applied or dead-lettered), Forget and RecordInteraction, and asks a plain
in-memory model of the contract (tests/reliability/model.py) what each answer must be.

After every step it checks the contract's invariants on the server: every identifier of the example resolves as
the model says (outcome, uuid, matched_on, version, attributes, candidates, conflicts), no external_id resolves to
two customers, no erased customer appears in any answer, versions only grow, replays answer the first answer, and
the customers the step touched read back (GetCustomer) as the model holds them. At the end of each example every
uuid issued reads back as the model says, with its interactions, and `resolver check` finds no problem in the
data directory at the end of the run.

One server serves the whole run; each hypothesis example works in a namespace of its own (external_ids, emails
and phone numbers nobody else uses), so examples never see each other.
"""

from __future__ import annotations

import functools
import itertools
import json
import os
import shutil
import tempfile
import textwrap
import time
import uuid as uuidlib
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, ClassVar

import grpc
from google.protobuf import struct_pb2
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from resolver.bootstrap import build_server
from resolver.check import find_problems
from resolver.config import load_settings
from resolver.v1 import resolver_pb2 as pb
from resolver.v1 import resolver_pb2_grpc
from tests.conftest import SERVER_TOML, TEST_ENCRYPTION_KEY, status_details
from tests.integration.helpers import signed_headers
from tests.reliability.model import (
    LAST,
    ForgetReq,
    InteractionReq,
    MergeReq,
    Model,
    Refused,
    ResolveReq,
    UnmergeReq,
    UpsertReq,
)
from tests.reliability.report import FULL, scaled

MAX_FANOUT = 3  # low, so that shared phones and emails reach the fan-out limit within one example
MAX_CANDIDATES = 2  # below the customers that share an identifier: the ranking and the bound are checked
SECRET = "model-test-crm-secret"
BLUEPRINT = SERVER_TOML + textwrap.dedent(
    f"""
    [matching]
    max_fanout = {MAX_FANOUT}
    max_candidates = {MAX_CANDIDATES}
    [attributes]
    name = {{ type = "string" }}
    tier = {{ type = "string" }}
    status = {{ type = "string", owner = "CRM" }}
    {LAST} = {{ type = "date-time" }}
    [sources.CRM]
    field_map = {{ Tier__c = "tier" }}
    secrets = [{{ env = "MODEL_CRM_SECRET" }}]
    [events]
    http_listen = ""
    unknown_record_wait_s = 0  # the model dead-letters an unknown record's event at once
    rate_per_s = 5000
    min_rate_per_s = 5000
    """
)
STEPS = 40  # steps per example
SHM = "/dev/shm"
TIMEOUT_S = 10.0
EVENT_WAIT_S = 15.0
VALUES = {"name": ("Ann", "Bo", None), "tier": ("gold", "silver", None), "status": ("Active", "Churned", None)}
PHONE_BLOCKS = ("650253", "415200", "415201", "212200", "312200", "617200")  # valid US ranges, 10,000 numbers each
BASE_US = int(datetime(2024, 1, 1, tzinfo=UTC).timestamp()) * 1_000_000
HOUR_US = 3600 * 1_000_000


@dataclass
class Run:
    """What the examples of one run share: the server, the phone numbers handed out, what was counted."""

    stub: resolver_pb2_grpc.IdentityResolverStub
    examples: Iterator[int] = field(default_factory=itertools.count)
    next_phone: Iterator[int] = field(default_factory=itertools.count)
    ops: Counter[str] = field(default_factory=Counter)  # per operation and outcome
    steps: int = 0
    checks: Counter[str] = field(default_factory=Counter)  # invariants checked
    last_dead_letter: int = 0

    def phones(self, n: int) -> list[str]:
        out = []
        for _ in range(n):
            i = next(self.next_phone)
            out.append(f"+1{PHONE_BLOCKS[i // 10_000]}{i % 10_000:04d}")
        return out


@contextmanager
def serving(tmp_path: Path) -> Iterator[Run]:
    """The real server, in this process, with the event applier running; `resolver check` after it stops.

    The data directory is on tmpfs where there is one: this test is about what the answers say, not about
    durability (the crash tests are), and an fsync per write would be most of a step's time."""
    path = tmp_path / "model.toml"
    path.write_text(BLUEPRINT)
    data = Path(tempfile.mkdtemp(prefix="resolver-model-", dir=SHM if os.path.isdir(SHM) else tmp_path))
    conf = load_settings(path, environ={"MODEL_CRM_SECRET": SECRET, "RESOLVER_ENCRYPTION_KEY": TEST_ENCRYPTION_KEY},
                         data_dir=str(data), listen="127.0.0.1:0")
    try:
        running = build_server(conf, sweeper=False, applier=True)
        channel = grpc.insecure_channel(f"127.0.0.1:{running.port}")
        try:
            yield Run(resolver_pb2_grpc.IdentityResolverStub(channel))
            with running.service.store.read() as view:
                assert find_problems(view) == [], "resolver check fails after the model test's writes"
        finally:
            channel.close()
            running.stop(grace=0)
    finally:
        shutil.rmtree(data, ignore_errors=True)


def refused(err: grpc.RpcError) -> Refused:
    info, _ = status_details(err)
    return Refused(err.code().name, info.reason if info is not None else "")


def ids_of(i: pb.Identifiers) -> tuple[str, tuple[str, ...], tuple[str, ...]]:
    return i.external_id, tuple(i.emails), tuple(i.phones)


def attrs_of(s: struct_pb2.Struct) -> dict[str, Any]:
    return dict(s.items())


def resolve_answer(r: pb.ResolveResponse) -> dict[str, Any]:
    return {"outcome": pb.Outcome.Name(r.outcome).removeprefix("OUTCOME_"), "customer_uuid": r.customer_uuid,
            "matched_on": pb.MatchKind.Name(r.matched_on).removeprefix("MATCH_KIND_") if r.matched_on else None,
            "version": r.version, "attributes": attrs_of(r.attributes),
            "candidates": [(c.customer_uuid, attrs_of(c.attributes)) for c in r.candidates],
            "conflicts": list(r.conflicts)}


def identifiers(ext: str | None, emails: tuple[str, ...], phones: tuple[str, ...]) -> pb.Identifiers:
    return pb.Identifiers(external_id=ext or "", emails=list(emails), phones=list(phones))


def guarded(step: Callable[..., None]) -> Callable[..., None]:
    """A step that raises leaves its example marked failed, so that teardown adds no second error to its report."""
    @functools.wraps(step)
    def run(self: ModelMachine, *args: Any, **kwargs: Any) -> None:
        self.failed = True
        step(self, *args, **kwargs)
        self.failed = False
    return run


class ModelMachine(RuleBasedStateMachine):
    """One example: a fresh model and a fresh namespace of identifiers, against the run's server."""

    run: ClassVar[Run]

    def __init__(self) -> None:
        super().__init__()
        n = next(self.run.examples)
        self.ns = f"m{n}"
        self.model = Model(max_fanout=MAX_FANOUT, max_candidates=MAX_CANDIDATES)
        # few identifiers, so that customers share them: ambiguity, conflicts, fan-out, targets by email
        self.exts = [f"{self.ns}-x{i}" for i in range(3)]
        self.emails = [f"u{i}@{self.ns}.example" for i in range(3)]
        self.phones = self.run.phones(3)
        self.sent: list[Any] = []  # every keyed request sent: retries and key reuses pick from it
        self.first: dict[str, dict[str, Any]] = {}  # the server's first successful answer per key
        self.versions: dict[str, int] = {}  # the highest version the server showed per uuid
        self.serial = itertools.count()
        self.failed = False

    # -- drawing requests --------------------------------------------------------------------------------------
    def _key(self) -> str:
        return f"{self.ns}-k{next(self.serial)}"

    def _uuid(self, data: st.DataObject, *, live_only: int = 3) -> str:
        """Mostly a live customer (`live_only` of 5), else any uuid issued (aliases, erased), else one nobody has."""
        pick = data.draw(st.integers(0, 4))
        live, known = sorted(self.model.customers), self.model.known
        pool = live if pick < live_only and live else known if pick < 4 and known else []
        if pool:
            return str(data.draw(st.sampled_from(pool)))
        return str(uuidlib.UUID(int=data.draw(st.integers(1, 2**128 - 1))))

    def _earlier(self, data: st.DataObject, kind: type) -> Any:
        """None (a new request), or an earlier request to send again (a retry: a replay), or an earlier request's
        key to carry a new request of `kind` (a reuse: refused while the key's first request is remembered)."""
        mode = data.draw(st.sampled_from(("new",) * 6 + ("retry", "reuse")))
        same = [r for r in self.sent if isinstance(r, kind)]
        if mode == "retry" and same:
            return data.draw(st.sampled_from(same))
        if mode == "reuse" and self.sent and kind is not InteractionReq:
            other = [r for r in self.sent if not isinstance(r, InteractionReq)]
            return data.draw(st.sampled_from(other)).key if other else None
        return None

    def _ids(self, data: st.DataObject) -> tuple[str | None, tuple[str, ...], tuple[str, ...]]:
        ext = data.draw(st.one_of(st.none(), st.sampled_from(self.exts)))
        emails = tuple(data.draw(st.lists(st.sampled_from(self.emails), max_size=2, unique=True)))
        phones = tuple(data.draw(st.lists(st.sampled_from(self.phones), max_size=2, unique=True)))
        return ext, emails, phones

    # -- comparing ---------------------------------------------------------------------------------------------
    def _same(self, what: str, request: Any, got: Any, want: Any) -> None:
        if got != want:
            self.failed = True
            raise AssertionError(f"{what}: the server and the contract's model disagree\n  request: {request}\n"
                                 f"  server:  {got}\n  model:   {want}")

    def _saw(self, uuid: str, version: int) -> None:
        """Versions only grow (contract §4: one more per change)."""
        if not uuid:
            return
        self.run.checks["versions monotonic"] += 1
        if version < self.versions.get(uuid, 0):
            self.failed = True
            raise AssertionError(f"customer {uuid} went from version {self.versions[uuid]} back to {version}")
        self.versions[uuid] = version

    def _replayed(self, key: str, got: dict[str, Any]) -> None:
        """A replay answers the first answer, all of it (identifiers redacted once their customer was erased: the
        model said whether they must be)."""
        self.run.checks["replay = first answer"] += 1
        first = {**self.first[key], "replayed": True}
        if "identifiers" in got and got["identifiers"] == ("", (), ()):
            first["identifiers"] = got["identifiers"]
        self._same("replay", key, got, first)

    def _settle(self, op: str, req: Any, key: str, got: Any, want: Any, *, volatile: tuple[str, ...] = ()) -> bool:
        """Book a keyed step's answer: the request kept for retries and reuses, the outcome counted, the answer
        (less its `volatile` fields, which the model does not hold) compared with the model's, a replay checked
        against the key's first answer, a first answer remembered. True for a first successful answer: the caller
        then checks the versions it shows and reads back the customers it touched."""
        self.sent.append(req)
        self._outcome(op, got)
        self._same(op, req, {k: v for k, v in got.items() if k not in volatile} if isinstance(got, dict) else got, want)
        if not isinstance(got, dict):
            return False
        if got["replayed"]:
            self._replayed(key, got)
            return False
        self.first[key] = got
        return True

    def _outcome(self, op: str, got: Any) -> None:
        self.run.steps += 1
        if isinstance(got, Refused):
            self.run.ops[f"{op} {got.code} {got.reason}"] += 1
        elif got.get("replayed"):
            self.run.ops[f"{op} replayed"] += 1
        else:
            self.run.ops[f"{op} {got.get('action', 'OK')}"] += 1

    def _read_back(self, *uuids: str) -> None:
        """GetCustomer of the customers a step touched equals the model's record."""
        for uuid in uuids:
            if uuid:
                self._get(uuid)

    def _get(self, uuid: str) -> None:
        try:
            c = self.run.stub.GetCustomer(pb.GetCustomerRequest(customer_uuid=uuid), timeout=TIMEOUT_S)
            got: Any = {"customer_uuid": c.customer_uuid, "identifiers": ids_of(c.identifiers),
                        "attributes": attrs_of(c.attributes), "version": c.version}
            self._saw(c.customer_uuid, c.version)
        except grpc.RpcError as err:
            got = refused(err)
        self.run.checks["GetCustomer = model"] += 1
        self._same("GetCustomer", uuid, got, self.model.get(uuid))

    # -- the operations ----------------------------------------------------------------------------------------
    @initialize(data=st.data())
    @guarded
    def customers(self, data: st.DataObject) -> None:
        """A few customers to begin with (Upserts like any other), so that every operation has someone to act on."""
        for _ in range(data.draw(st.integers(2, 5))):
            self.upsert(data)

    @rule(data=st.data())
    @guarded
    def upsert(self, data: st.DataObject) -> None:
        earlier = self._earlier(data, UpsertReq)
        if isinstance(earlier, UpsertReq):
            req = earlier
        else:
            req = self._new_upsert(data, earlier or self._key())
        msg = pb.UpsertRequest(idempotency_key=req.key, customer_uuid=req.customer_uuid,
                               identifiers=identifiers(req.external_id, req.emails, req.phones),
                               source_system=req.source, expected_version=req.expected_version,
                               remove_identifiers=identifiers(req.remove_external_id, req.remove_emails,
                                                              req.remove_phones))
        if req.attributes:
            msg.attributes.update(dict(req.attributes))
        got: Any
        try:
            r = self.run.stub.Upsert(msg, timeout=TIMEOUT_S)
            got = {"customer_uuid": r.customer_uuid, "action": pb.Action.Name(r.action).removeprefix("ACTION_"),
                   "version": r.version, "replayed": r.replayed, "potential_duplicates": tuple(r.potential_duplicates),
                   "identifiers": ids_of(r.identifiers)}
        except grpc.RpcError as err:
            got = refused(err)
        created = isinstance(got, dict) and got["action"] == "CREATED" and not got["replayed"]
        if created:
            assert got["customer_uuid"] not in self.model.known, "a new customer got a uuid already issued"
        want = self.model.upsert(req, got["customer_uuid"] if created else "(no new customer on the server)")
        if self._settle("Upsert", req, req.key, got, want):
            self._saw(got["customer_uuid"], got["version"])
            self._read_back(got["customer_uuid"])

    def _new_upsert(self, data: st.DataObject, key: str) -> UpsertReq:
        customer_uuid = self._uuid(data, live_only=4) if data.draw(st.integers(0, 3)) == 0 else ""
        ext, emails, phones = self._ids(data)
        if not (customer_uuid or ext or emails or phones) and data.draw(st.integers(0, 9)):
            phones = (data.draw(st.sampled_from(self.phones)),)  # now and then nothing at all: refused
        names = data.draw(st.lists(st.sampled_from(("name", "tier")), max_size=2, unique=True))
        if data.draw(st.integers(0, 5)) == 0:
            names.append("status")  # owned by the CRM: from another source, PERMISSION_DENIED
        attributes = tuple(sorted((n, data.draw(st.sampled_from(VALUES[n]))) for n in names))
        source = "CRM" if "status" in names and data.draw(st.integers(0, 4)) else \
            data.draw(st.sampled_from(("CRM", "web")))
        expected = 0
        if customer_uuid and data.draw(st.integers(0, 2)) == 0:
            current = self.model.live(customer_uuid)
            expected = current.version if current is not None and data.draw(st.integers(0, 5)) else \
                data.draw(st.integers(1, 4))
        remove: dict[str, Any] = {}
        if data.draw(st.integers(0, 4)) == 0:
            remove = {"remove_external_id": data.draw(st.one_of(st.none(), st.sampled_from(self.exts))),
                      "remove_emails": tuple(data.draw(st.lists(st.sampled_from(self.emails), max_size=1))),
                      "remove_phones": tuple(data.draw(st.lists(st.sampled_from(self.phones), max_size=1)))}
        return UpsertReq(key, customer_uuid, ext, emails, phones, attributes, source, expected, **remove)

    @rule(data=st.data())
    @guarded
    def upsert_more(self, data: st.DataObject) -> None:
        """Upserts are most of a CRM's traffic (and what the other operations need): two rules of nine."""
        self.upsert(data)

    @rule(data=st.data())
    @guarded
    def resolve(self, data: st.DataObject) -> None:
        ext, emails, phones = self._ids(data)
        if data.draw(st.integers(0, 5)) == 0:
            ext = f"{self.ns}-nobody"
        if not (ext or emails or phones):
            emails = (f"nobody@{self.ns}.example",)
        q = ResolveReq(ext, emails, phones)
        r = self.run.stub.Resolve(pb.ResolveRequest(identifiers=identifiers(ext, emails, phones)), timeout=TIMEOUT_S)
        got = resolve_answer(r)
        self._outcome("Resolve", {"action": got["outcome"]})
        self._same("Resolve", q, got, self.model.resolve(q))
        self._saw(got["customer_uuid"], got["version"])

    @rule(data=st.data())
    @guarded
    def get_customer(self, data: st.DataObject) -> None:
        uuid = self._uuid(data)
        self._get(uuid)
        self._outcome("GetCustomer", self.model.get(uuid))

    @precondition(lambda self: len(self.model.customers) >= 2)
    @rule(data=st.data())
    @guarded
    def merge(self, data: st.DataObject) -> None:
        earlier = self._earlier(data, MergeReq)
        if isinstance(earlier, MergeReq):
            req = earlier
        else:
            survivor = self._uuid(data, live_only=5)
            merged = tuple(self._uuid(data, live_only=5 if data.draw(st.integers(0, 9)) else 0)
                           for _ in range(data.draw(st.integers(1, 2))))
            if data.draw(st.integers(0, 9)) != 0:  # mostly well formed (each once, never the survivor), else refused
                merged = tuple(u for u in dict.fromkeys(merged) if u != survivor) or merged
            req = MergeReq(earlier or self._key(), survivor, merged, data.draw(st.sampled_from(("", "CRM"))))
        got: Any
        try:
            r = self.run.stub.Merge(pb.MergeRequest(idempotency_key=req.key, survivor_uuid=req.survivor,
                                                    merged_uuids=list(req.merged), source_system=req.source),
                                    timeout=TIMEOUT_S)
            got = {"customer_uuid": r.customer_uuid, "version": r.version, "replayed": r.replayed,
                   "merged_uuids": tuple(r.merged_uuids), "identifiers": ids_of(r.identifiers)}
        except grpc.RpcError as err:
            got = refused(err)
        if self._settle("Merge", req, req.key, got, self.model.merge(req)):
            self._saw(got["customer_uuid"], got["version"])
            self._read_back(got["customer_uuid"], *got["merged_uuids"])

    @precondition(lambda self: len(self.model.customers) >= 2)
    @rule(data=st.data())
    @guarded
    def merge_more(self, data: st.DataObject) -> None:
        """Merges and unmerges hold most of the contract's subtleties: each has two rules."""
        self.merge(data)

    @precondition(lambda self: any(self.model.journal.values()))
    @rule(data=st.data())
    @guarded
    def unmerge_more(self, data: st.DataObject) -> None:
        self.unmerge(data)

    @precondition(lambda self: self.model.journal or any(isinstance(r, UnmergeReq) for r in self.sent))
    @rule(data=st.data())
    @guarded
    def unmerge(self, data: st.DataObject) -> None:
        earlier = self._earlier(data, UnmergeReq)
        if isinstance(earlier, UnmergeReq):
            req = earlier
        else:
            merges = [(s, m.uuid) for s, entries in sorted(self.model.journal.items()) for e in entries for m in e.merged]
            if merges and data.draw(st.integers(0, 4)) != 0:
                survivor, merged = data.draw(st.sampled_from(merges))
            else:
                survivor, merged = self._uuid(data), self._uuid(data)
            req = UnmergeReq(earlier or self._key(), survivor, merged)
        got: Any
        try:
            r = self.run.stub.Unmerge(pb.UnmergeRequest(idempotency_key=req.key, survivor_uuid=req.survivor,
                                                        merged_uuid=req.merged), timeout=TIMEOUT_S)
            got = {"survivor_uuid": r.survivor_uuid, "survivor_version": r.survivor_version,
                   "merged_uuid": r.merged_uuid, "merged_version": r.merged_version, "replayed": r.replayed}
        except grpc.RpcError as err:
            got = refused(err)
        if self._settle("Unmerge", req, req.key, got, self.model.unmerge(req)):
            self._saw(got["survivor_uuid"], got["survivor_version"])
            self._saw(got["merged_uuid"], got["merged_version"])
            self._read_back(got["survivor_uuid"], got["merged_uuid"])

    @precondition(lambda self: any(c.external_id for c in self.model.customers.values()))
    @rule(data=st.data())
    @guarded
    def delete(self, data: st.DataObject) -> None:
        """A CRM DELETE change event: signed, admitted through IngestEvents, applied by the server's applier; the
        step waits (bounded) until the counters say it was applied or dead-lettered."""
        held = [x for x in self.exts if self.model.holders("EXTERNAL_ID", x)]
        ext = data.draw(st.sampled_from(held if held and data.draw(st.integers(0, 3)) else self.exts))
        stamp = datetime.now(UTC).isoformat().replace("+00:00", "Z")
        body = json.dumps({"event_type": "DELETE", "source_system": "CRM", "timestamp": stamp, "record_id": ext,
                           "object_type": "Account", "change_set": {}}).encode()
        wid = f"{self.ns}-w{next(self.serial)}"
        headers = signed_headers(SECRET.encode(), wid, body)
        stub = self.run.stub
        before = stub.GetEventCounters(pb.GetEventCountersRequest(), timeout=TIMEOUT_S).counters
        stub.IngestEvents(pb.IngestRequest(source="CRM", body=body, headers=headers), timeout=TIMEOUT_S)
        deadline = time.monotonic() + EVENT_WAIT_S
        while True:
            snap = stub.GetEventCounters(pb.GetEventCountersRequest(), timeout=TIMEOUT_S)
            done = {k: snap.counters[k] - before[k] for k in ("applied", "dead_lettered")}
            if snap.in_inbox == 0 and sum(done.values()) == 1:
                break
            assert time.monotonic() < deadline, f"the DELETE event was not applied within {EVENT_WAIT_S} s: {snap}"
            time.sleep(0.005)
        got = "APPLIED"
        if done["dead_lettered"]:  # the dead letters after the last one seen: this one, alone
            letters = stub.ListDeadLetters(pb.ListDeadLettersRequest(after_id=self.run.last_dead_letter),
                                           timeout=TIMEOUT_S).dead_letters
            assert [d.webhook_id for d in letters] == [wid], "a new dead letter is not listed after the last one"
            self.run.last_dead_letter = letters[-1].id
            got = letters[-1].reason
        holders = self.model.holders("EXTERNAL_ID", ext)
        want = self.model.delete(ext)
        self._outcome("Delete", {"action": got})
        self._same("Delete", ext, got, want)
        self._read_back(*holders)

    @rule(data=st.data())
    @guarded
    def forget(self, data: st.DataObject) -> None:
        earlier = self._earlier(data, ForgetReq)
        if isinstance(earlier, ForgetReq):
            req = earlier
        else:
            req = ForgetReq(earlier or self._key(), self._uuid(data, live_only=2),
                            data.draw(st.sampled_from(("GDPR", "request"))))
        got: Any
        try:
            r = self.run.stub.Forget(pb.ForgetRequest(idempotency_key=req.key, customer_uuid=req.customer_uuid,
                                                      reason=req.reason), timeout=TIMEOUT_S)
            got = {"customer_uuid": r.customer_uuid, "replayed": r.replayed,
                   "removed": {k: r.removed.get(k, 0) for k in ("customers", "identifiers", "attributes",
                                                                 "interactions")},
                   "audit_sequence": r.audit_sequence, "all_removed": dict(r.removed)}
        except grpc.RpcError as err:
            got = refused(err)
        # the model does not count audit_sequence and all_removed; replays must repeat them
        if self._settle("Forget", req, req.key, got, self.model.forget(req), volatile=("audit_sequence", "all_removed")):
            self._read_back(req.customer_uuid)

    @rule(data=st.data())
    @guarded
    def record_interaction(self, data: st.DataObject) -> None:
        earlier = self._earlier(data, InteractionReq)
        if isinstance(earlier, InteractionReq):
            req = earlier
            if data.draw(st.booleans()):  # the same call id with other content
                req = replace(req, channel="chat" if req.channel == "voice" else "voice")
        else:
            occurred = BASE_US + data.draw(st.integers(0, 30)) * HOUR_US
            iid = f"{self.ns}-call{next(self.serial)}"
            if data.draw(st.booleans()):
                req = InteractionReq(iid, occurred, customer_uuid=self._uuid(data))
            else:
                ext, emails, phones = self._ids(data)
                if not (ext or emails or phones):
                    phones = (self.phones[0],)
                req = InteractionReq(iid, occurred, external_id=ext, emails=emails, phones=phones)
        msg = pb.RecordInteractionRequest(interaction_id=req.interaction_id, customer_uuid=req.customer_uuid,
                                          identifiers=identifiers(req.external_id, req.emails, req.phones),
                                          channel=req.channel)
        if req.customer_uuid:
            msg.ClearField("identifiers")
        msg.occurred_at.FromMicroseconds(req.occurred_us)
        got: Any
        try:
            r = self.run.stub.RecordInteraction(msg, timeout=TIMEOUT_S)
            got = {"interaction_id": r.interaction_id, "customer_uuid": r.customer_uuid, "replayed": r.replayed,
                   "last_interaction_us": r.last_interaction_date.ToMicroseconds()
                   if r.HasField("last_interaction_date") else None}
        except grpc.RpcError as err:
            got = refused(err)
        if self._settle("RecordInteraction", req, "call:" + req.interaction_id, got, self.model.interact(req)):
            self._read_back(got["customer_uuid"])

    # -- after every step --------------------------------------------------------------------------------------
    @invariant()
    @guarded
    def server_agrees_with_the_model(self) -> None:
        """Every identifier of the example resolves as the model says; no external_id names two customers; no
        erased customer is ever an answer (ResolveStream: one call for all of them)."""
        self.model.check()
        queries = [ResolveReq(external_id=x) for x in self.exts] + [ResolveReq(emails=(e,)) for e in self.emails] + \
            [ResolveReq(phones=(p,)) for p in self.phones]
        answers = self.run.stub.ResolveStream(iter([pb.ResolveRequest(identifiers=identifiers(
            q.external_id, q.emails, q.phones)) for q in queries]), timeout=TIMEOUT_S)
        for q, r in zip(queries, answers, strict=True):
            got = resolve_answer(r)
            self.run.checks["Resolve = model"] += 1
            self._same("Resolve (invariant)", q, got, self.model.resolve(q))
            named = {got["customer_uuid"], *got["conflicts"], *(c for c, _ in got["candidates"])} - {""}
            self.run.checks["erased never resolves"] += 1
            assert not named & self.model.erased, f"an erased customer answered {q}: {named & self.model.erased}"
            if q.external_id:
                self.run.checks["one customer per external_id"] += 1
                assert got["outcome"] != "AMBIGUOUS", f"two customers hold external_id {q.external_id}"
            self._saw(got["customer_uuid"], got["version"])

    def teardown(self) -> None:
        """Every uuid issued in the example reads back as the model holds it, with its interactions."""
        if self.failed:
            return
        for uuid in self.model.known:
            self._get(uuid)
            try:
                rows = self.run.stub.ListInteractions(pb.ListInteractionsRequest(customer_uuid=uuid), timeout=TIMEOUT_S)
                got: Any = [i.interaction_id for i in rows.interactions]
            except grpc.RpcError as err:
                got = refused(err)
            self.run.checks["ListInteractions = model"] += 1
            self._same("ListInteractions", uuid, got, self.model.interactions(uuid))


OPERATIONS = ("Upsert", "Resolve", "GetCustomer", "Merge", "Unmerge", "Delete", "Forget", "RecordInteraction")


def _per_op(run: Run) -> Counter[str]:
    """Steps run per operation (run.ops counts each answer as "Operation outcome")."""
    return Counter(k.split(" ")[0] for k in run.ops.elements())


def test_the_server_follows_the_contracts_model(tmp_path: Path, reliability_report: Any) -> None:
    """>= 10,000 steps under `make reliability` (a few hundred in `make test`), every answer as the model says."""
    target = scaled(400, 10_000)
    started = time.monotonic()
    with serving(tmp_path) as run:
        ModelMachine.run = run
        # hypothesis may end an example early, and a few hundred steps may draw no step of a rare operation (an
        # Unmerge needs a Merge before it): run again until the steps are done and every operation has run
        for _ in range(20):
            if run.steps >= target and all(_per_op(run)[op] for op in OPERATIONS):
                break
            run_state_machine_as_test(ModelMachine, settings=settings(
                max_examples=max(1, -(-(target - run.steps) // STEPS)), stateful_step_count=STEPS, deadline=None,
                database=None, suppress_health_check=list(HealthCheck)))
        examples = next(run.examples)
    elapsed = time.monotonic() - started
    assert run.steps >= target, f"only {run.steps} steps ran"
    per_op = _per_op(run)
    for op in OPERATIONS:
        assert per_op[op] > 0, f"no {op} step ran"
    if FULL:  # a few hundred steps may draw too few of them
        assert run.ops["Upsert replayed"] and run.ops["Unmerge OK"], "; ".join(f"{k}: {n}" for k, n in run.ops.items())
    reliability_report(
        tried=f"{run.steps} steps in {examples} hypothesis examples (up to {STEPS} steps each, after 2-5 opening "
              f"Upserts) against one in-process server; per operation, its answers: {_per_operation(run.ops)}",
        held="every answer equal to the contract's in-memory model; after every step: "
             + ", ".join(f"{k} ({n})" for k, n in sorted(run.checks.items()))
             + "; resolver check clean at the end",
        figures=f"{elapsed:.0f} s wall, {run.steps / elapsed:.0f} steps/s" + ("" if FULL else " (short run)"),
    )


def _per_operation(ops: Counter[str]) -> str:
    """'Upsert 120 (CREATED 50, replayed 9, VERSION_MISMATCH 3, ...); ...' from counts keyed 'OP [CODE] OUTCOME'."""
    parts: dict[str, list[str]] = {}
    for key, n in sorted(ops.items(), key=lambda item: (item[0].split(" ")[0], -item[1])):
        op, _, outcome = key.partition(" ")
        parts.setdefault(op, []).append(f"{outcome.split(' ')[-1]} {n}")
    totals = Counter(k.split(" ")[0] for k in ops.elements())
    return "; ".join(f"{op} {totals[op]} ({', '.join(p)})" for op, p in parts.items())


def _dead_letter(run: Run, record_id: str, wid: str) -> pb.DeadLetter:
    """Send a DELETE for a record nobody holds (dead-lettered UNKNOWN_RECORD); its dead letter."""
    body = json.dumps({"event_type": "DELETE", "source_system": "CRM", "timestamp": "2024-01-01T00:00:00Z",
                       "record_id": record_id, "object_type": "Account", "change_set": {}}).encode()
    run.stub.IngestEvents(pb.IngestRequest(source="CRM", body=body, headers=signed_headers(SECRET.encode(), wid, body)),
                          timeout=TIMEOUT_S)
    deadline = time.monotonic() + EVENT_WAIT_S
    while True:
        found = [d for d in run.stub.ListDeadLetters(pb.ListDeadLettersRequest(), timeout=TIMEOUT_S).dead_letters
                 if d.webhook_id == wid]
        if found:
            return found[0]
        assert time.monotonic() < deadline, "the event was not dead-lettered in time"
        time.sleep(0.01)


def test_a_dead_letter_id_is_never_issued_twice(tmp_path: Path) -> None:
    """Regression (found by the model test): dead-letter ids were the newest queued id + 1, so once the newest left
    the queue (here: Forget erased the webhook that named the person's record) the next dead letter got its id
    again, and a client paging with ListDeadLetters(after_id) never saw it."""
    with serving(tmp_path) as run:
        first = _dead_letter(run, "rec-1", "w-1")
        assert first.reason == "UNKNOWN_RECORD"
        made = run.stub.Upsert(pb.UpsertRequest(idempotency_key="k1", identifiers=identifiers("rec-1", (), ())),
                               timeout=TIMEOUT_S)
        forgotten = run.stub.Forget(pb.ForgetRequest(idempotency_key="k2", customer_uuid=made.customer_uuid,
                                                     reason="GDPR"), timeout=TIMEOUT_S)
        assert forgotten.removed["event_dead_letters"] == 1  # the webhook naming rec-1 went with the person
        second = _dead_letter(run, "rec-2", "w-2")
        assert second.id > first.id
        later = run.stub.ListDeadLetters(pb.ListDeadLettersRequest(after_id=first.id), timeout=TIMEOUT_S).dead_letters
        assert [d.webhook_id for d in later] == ["w-2"]
        run.stub.DiscardDeadLetter(pb.DiscardDeadLetterRequest(id=second.id), timeout=TIMEOUT_S)
        assert _dead_letter(run, "rec-3", "w-3").id > second.id  # the same after an operator's discard


def _upsert(run: Run, key: str, ext: str = "", emails: tuple[str, ...] = (), phones: tuple[str, ...] = (),
            **attributes: str) -> str:
    msg = pb.UpsertRequest(idempotency_key=key, identifiers=identifiers(ext, emails, phones), source_system="CRM")
    if attributes:
        msg.attributes.update(attributes)
    return str(run.stub.Upsert(msg, timeout=TIMEOUT_S).customer_uuid)


def _unmerge(run: Run, key: str, survivor: str, merged: str) -> pb.UnmergeResponse:
    return run.stub.Unmerge(pb.UnmergeRequest(idempotency_key=key, survivor_uuid=survivor, merged_uuid=merged),
                            timeout=TIMEOUT_S)


def test_unmerging_one_of_a_merge_keeps_what_the_others_brought(tmp_path: Path) -> None:
    """Regression (found by the model test): Merge(S, [A, B]) then Unmerge(S, A) put back the survivor's attributes
    from before the merge, dropping what B (still merged) had brought, and let go of an email A and B both held
    through the same source, so B's identifier stopped resolving to S and Unmerge(S, B) was blocked for good."""
    with serving(tmp_path) as run:
        p = "+16502530001"
        s = _upsert(run, "s", phones=(p,), status="Churned")
        a = _upsert(run, "a", "rec-a", ("shared@example.com",), (p,), status="Active")
        b = _upsert(run, "b", "rec-b", ("shared@example.com",), (p,), status="Active", tier="gold")
        assert len({s, a, b}) == 3
        run.stub.Merge(pb.MergeRequest(idempotency_key="m", survivor_uuid=s, merged_uuids=[a, b]), timeout=TIMEOUT_S)
        _unmerge(run, "u1", s, b)  # B brought "Active" last (most recent), A brought it too
        survivor = run.stub.GetCustomer(pb.GetCustomerRequest(customer_uuid=s), timeout=TIMEOUT_S)
        assert attrs_of(survivor.attributes) == {"status": "Active"}  # A's, not the "Churned" from before the merge
        assert "shared@example.com" in survivor.identifiers.emails  # A, still merged, holds it
        r = run.stub.Resolve(pb.ResolveRequest(identifiers=identifiers("rec-a", (), ())), timeout=TIMEOUT_S)
        assert (r.outcome, r.customer_uuid) == (pb.OUTCOME_MATCHED, s)
        _unmerge(run, "u2", s, a)  # nothing blocks it: no one removed what A brought
        r = run.stub.Resolve(pb.ResolveRequest(identifiers=identifiers("", ("shared@example.com",), ())),
                             timeout=TIMEOUT_S)
        assert r.outcome == pb.OUTCOME_AMBIGUOUS and {c.customer_uuid for c in r.candidates} == {a, b}
        survivor = run.stub.GetCustomer(pb.GetCustomerRequest(customer_uuid=s), timeout=TIMEOUT_S)
        assert attrs_of(survivor.attributes) == {"status": "Churned"} and list(survivor.identifiers.phones) == [p]


def test_undoing_merges_one_by_one_gives_back_what_each_brought(tmp_path: Path) -> None:
    """Regression (found with the fix above): A and B, each holding the same email through the same source, merged
    into S one after the other; Unmerge(S, A) keeps the email (B still holds it), and then Unmerge(S, B) must let
    it go: the survivor never held it in its own right (B's merge had recorded it as held before)."""
    with serving(tmp_path) as run:
        s = _upsert(run, "s", phones=("+16502530002",))
        a = _upsert(run, "a", "rec-a", ("shared@example.com",))
        b = _upsert(run, "b", "rec-b", ("shared@example.com",))
        for key, merged in (("m1", a), ("m2", b)):
            run.stub.Merge(pb.MergeRequest(idempotency_key=key, survivor_uuid=s, merged_uuids=[merged]),
                           timeout=TIMEOUT_S)
        _unmerge(run, "u1", s, a)
        assert "shared@example.com" in run.stub.GetCustomer(pb.GetCustomerRequest(customer_uuid=s),
                                                            timeout=TIMEOUT_S).identifiers.emails
        _unmerge(run, "u2", s, b)
        survivor = run.stub.GetCustomer(pb.GetCustomerRequest(customer_uuid=s), timeout=TIMEOUT_S)
        assert ids_of(survivor.identifiers) == ("", (), ("+16502530002",))
        r = run.stub.Resolve(pb.ResolveRequest(identifiers=identifiers("", ("shared@example.com",), ())),
                             timeout=TIMEOUT_S)
        assert r.outcome == pb.OUTCOME_AMBIGUOUS and {c.customer_uuid for c in r.candidates} == {a, b}
