"""`resolver forget UUID --reason TEXT` and `resolver audit list`: erasure from the command line, and the audit
trail of erasures (resolver.forget, resolver.audit). Both operate on the data directory directly (they work while the
server runs: LMDB serializes the writers). Output holds uuids, counts and reasons, never an identifier."""

from __future__ import annotations

import argparse
import datetime as dt
import getpass
import sys
import uuid as uuidlib
from collections.abc import Callable

from resolver import audit, forget
from resolver.bootstrap import build_service, open_store
from resolver.config import Settings
from resolver.errors import ResolverError


def add_parsers(sub: argparse._SubParsersAction, store_args: Callable[[argparse.ArgumentParser], None]) -> None:  # type: ignore[type-arg]
    """Add `forget` and `audit list` to the command line's subparsers."""
    p = sub.add_parser("forget", help="erase a customer (and those merged into it) for good; an audit entry stays")
    store_args(p)
    p.add_argument("uuid", help="the customer's uuid (a merged-away uuid erases its survivor)")
    p.add_argument("--reason", required=True, help="why, for the audit entry (no personal data in it)")
    p.add_argument("--idempotency-key", default="", metavar="KEY",
                   help="repeat a run with the same key to get the same answer (default: a new key)")
    a = sub.add_parser("audit", help="the audit trail of erasures")
    commands = a.add_subparsers(dest="audit_command", required=True)
    listing = commands.add_parser("list", help="list audit entries, oldest first")
    store_args(listing)
    listing.add_argument("--after", type=int, default=0, metavar="SEQ", help="start after this sequence")
    listing.add_argument("--limit", type=int, default=100, metavar="N")


def _who() -> str:
    """The audit entry's "who" for the command line: cli:USER (the operating-system user running it)."""
    try:
        return f"cli:{getpass.getuser()}"
    except (OSError, KeyError):  # no user name in the environment nor in the password database
        return "cli"


def _when(us: int) -> str:
    return dt.datetime.fromtimestamp(us / 1e6, dt.UTC).isoformat(timespec="seconds")


def _counts(removed: dict[str, int]) -> str:
    return ", ".join(f"{k} {v}" for k, v in sorted(removed.items()) if v) or "nothing left to remove"


def run_forget(settings: Settings, args: argparse.Namespace) -> int:
    """Erase one customer through a writer of this process (the outbox sees the DELETED change): 0, or 1 with the
    reason (unknown uuid, bad request)."""
    service = build_service(settings)
    try:
        r = forget.forget(service, args.idempotency_key or str(uuidlib.uuid4()), args.uuid, args.reason, _who())
    except ResolverError as exc:
        print(f"resolver: {exc.message}", file=sys.stderr)
        return 1
    finally:
        service.close()
    print(f"forget: customer {r.customer_uuid} erased{' (replayed)' if r.replayed else ''}, audit entry "
          f"{r.audit_sequence}: {_counts(r.removed)}")
    return 0


def run_audit(settings: Settings, args: argparse.Namespace) -> int:
    store = open_store(settings, readonly=True)
    try:
        with store.read() as view:
            items = audit.entries(view, args.after, args.limit)
    finally:
        store.close()
    for e in items:
        print(f"{e.seq}\t{_when(e.at_us)}\t{e.action}\t{e.customer_uuid}\tby {e.who or '-'}\t"
              f"uuids {','.join(e.erased_uuids)}\t{_counts(e.removed)}\treason: {e.reason}")
    print(f"audit: {len(items)} entr{'y' if len(items) == 1 else 'ies'}")
    return 0
