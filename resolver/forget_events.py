"""Erasure of stored CRM webhooks (resolver.forget): find the raw bodies in the event inbox and the event dead-letter
queue that name a person, and delete them, inside the caller's write transaction.

A raw webhook body is kept byte-identical (resolver.events.envelope), so the PII it holds is whatever the CRM sent.
A body belongs to the person (`Marks`) when

1. its `record_id` is one of the person's external ids (held, merged in, or once held: the merge journal and the
   change log say which), or a CRM record tombstoned under the person's uuid or a uuid merged into it
   (`ev_tomb_ext`: records a CRM DELETE or an earlier erasure removed; this is how a person already erased is
   found again); or
2. its `record_id` is held by no live customer (or it has none, or the body is no JSON), and it names one of the
   person's emails or phones: in a field the source maps to an identifier, normalized as the applier would, or
   anywhere in the raw bytes (an email case-insensitively, a phone as E.164 with or without its "+").

Not found: a body about another live customer's CRM record (whatever it names: the identifier is then that
customer's too, and deleting the event would lose that customer's change); a phone written in a national format
outside a mapped identifier field of a body that matches nothing else; an email or phone the person never held
in this service; attribute values alone (names, addresses) in a body whose record_id does not lead here.

A body sealed under an encryption key the blueprint no longer holds (resolver.events.envelope) cannot be read, by
this scan or anyone: it is left as it is (restore the key and run Forget again to have it matched).

A matched inbox event is dropped before it is applied (counted dead-lettered and discarded, so that the
conservation counters hold: resolver.events.counters); a matched dead letter is discarded. The scan reads the whole
inbox (bounded by `[events] high_water`) and the whole dead-letter queue: an erasure is rare, a scan is cheap.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import orjson

from resolver._hotpath import normalize_email, normalize_phone
from resolver.config import Settings
from resolver.errors import DecryptionFailed, IdentifierError
from resolver.events import counters, envelope
from resolver.identifiers import policy_from
from resolver.normalize import Kind, Policy, normalize_external_id
from resolver.store import Txn

_KINDS = {"phone": Kind.PHONE, "email": Kind.EMAIL}


@dataclass(frozen=True, slots=True)
class Marks:
    """What names a person in a webhook body: `target` is the uuid it is known by (the survivor of its merges)."""

    target: bytes
    external_ids: frozenset[str]
    emails: frozenset[str]
    phones: frozenset[str]

    @classmethod
    def of(cls, target: bytes, pairs: Iterable[tuple[Kind, str]]) -> Marks:
        """The marks of the identifiers `pairs` (kind, normalized value)."""
        by_kind: dict[Kind, set[str]] = {Kind.EXTERNAL_ID: set(), Kind.EMAIL: set(), Kind.PHONE: set()}
        for kind, value in pairs:
            by_kind[kind].add(value)
        return cls(target, frozenset(by_kind[Kind.EXTERNAL_ID]), frozenset(by_kind[Kind.EMAIL]),
                   frozenset(by_kind[Kind.PHONE]))

    def raw_tokens(self) -> tuple[bytes, ...]:
        """The byte strings whose presence in a (lower-cased) body names the person."""
        phones = [p.encode() for p in self.phones] + [p.removeprefix("+").encode() for p in self.phones]
        return tuple(e.lower().encode() for e in self.emails) + tuple(phones)


@dataclass(frozen=True, slots=True)
class Scrubbed:
    inbox: int  # pending events dropped
    dead_letters: int  # event dead letters discarded


def scrub(view: Txn, marks: Marks, settings: Settings) -> Scrubbed:
    """Delete every inbox event and event dead letter that belongs to the person (module docstring)."""
    db = view.store.db
    if "ev_inbox" not in db:
        return Scrubbed(0, 0)
    matcher = _Matcher(view, marks, settings)
    ring = view.store.sealer.ring  # bodies are stored encrypted under [encryption] keys
    found: dict[str, list[bytes]] = {"ev_inbox": [], "ev_dlq": []}
    for name, keys in found.items():
        for key, raw in _entries(view, name):
            try:
                meta, body = envelope.decode(raw, ring)
            except DecryptionFailed:
                continue  # sealed under a key no longer held: nobody can read it, so it names nobody (module doc)
            if matcher.belongs(meta, body):
                keys.append(key)
    for name, keys in found.items():
        for key in keys:
            view.txn.delete(key, db=db[name])
    inbox, dead = len(found["ev_inbox"]), len(found["ev_dlq"])
    # an inbox event leaves as if dead-lettered and discarded at once; a dead letter as if discarded
    counters.add(view.txn, db["ev_counters"], {"dead_lettered": inbox, "discarded": inbox + dead})
    return Scrubbed(inbox, dead)


def _entries(view: Txn, name: str) -> list[tuple[bytes, bytes]]:
    with view.txn.cursor(db=view.store.db[name]) as cur:
        return [(bytes(k), bytes(v)) for k, v in cur.iternext(keys=True, values=True)]


class _Matcher:
    def __init__(self, view: Txn, marks: Marks, settings: Settings) -> None:
        self.view = view
        self.marks = marks
        self.settings = settings
        self.tokens = marks.raw_tokens()
        self._policy: Policy | None = None

    @property
    def policy(self) -> Policy:
        if self._policy is None:
            self._policy = policy_from(self.settings)
        return self._policy

    def belongs(self, meta: dict[str, Any], body: bytes) -> bool:
        try:
            doc = orjson.loads(body)
        except orjson.JSONDecodeError:
            doc = None
        doc = doc if isinstance(doc, dict) else {}
        record = self._record(doc.get("record_id"))
        if record == "mine":
            return True
        if record == "other":
            return False
        if self._named_in_fields(meta.get("source", ""), doc.get("change_set")):
            return True
        lowered = body.lower()
        return any(token in lowered for token in self.tokens)

    def _record(self, record_id: Any) -> str:
        """"mine": the record is the person's; "other": a live customer holds it; "": unknown or none."""
        if not isinstance(record_id, str):
            return ""
        try:
            ext = normalize_external_id(record_id)
        except IdentifierError:
            return ""
        if ext in self.marks.external_ids:
            return "mine"
        view = self.view
        key = view.key(Kind.EXTERNAL_ID, ext)
        tombstoned = view.txn.get(key, db=view.store.db["ev_tomb_ext"])
        if tombstoned is not None and view.survivor(tombstoned) == self.marks.target:
            return "mine"
        return "other" if view.txn.get(key, db=view.store.ix[Kind.EXTERNAL_ID]) is not None else ""

    def _named_in_fields(self, source: str, change_set: Any) -> bool:
        """Whether a field the source maps to an identifier holds (new or old) one of the person's."""
        spec = self.settings.sources.get(source)
        if spec is None or not isinstance(change_set, dict):
            return False
        for crm, change in change_set.items():
            kind = _KINDS.get(spec.identifiers.get(crm, ""))
            if kind is None or not isinstance(change, dict):
                continue
            for value in (change.get("new_value"), change.get("old_value")):
                if isinstance(value, str) and self._is_mine(kind, value, spec.default_region):
                    return True
        return False

    def _is_mine(self, kind: Kind, value: str, region: str | None) -> bool:
        try:
            if kind is Kind.PHONE:
                return normalize_phone(value, region, self.policy) in self.marks.phones
            return normalize_email(value, self.policy) in self.marks.emails
        except IdentifierError:
            return False
