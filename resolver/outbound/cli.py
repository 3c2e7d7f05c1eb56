"""`resolver outbound list | show ID | replay ID | discard ID | counters`: outbound messages that could not be
delivered to the CRM, and the delivery counters. Operates on the data directory directly (works while the server
runs). Output never shows a raw identifier or attribute value."""

from __future__ import annotations

import argparse
import datetime as dt
import sys
from collections.abc import Callable

from resolver.bootstrap import open_store
from resolver.config import Settings
from resolver.errors import ResolverError
from resolver.outbound import admin

COMMANDS = (("list", "list outbound dead letters (payloads masked)"), ("show", "one outbound dead letter, PII masked"),
            ("replay", "send a dead letter again (same webhook-id)"), ("discard", "delete a dead letter for good"),
            ("counters", "delivery counters: committed = delivered + pending + dead + discarded"))


def add_parser(sub: argparse._SubParsersAction, store_args: Callable[[argparse.ArgumentParser], None]) -> None:  # type: ignore[type-arg]
    """Add `outbound` and its commands to the command line's subparsers."""
    p = sub.add_parser("outbound", help="outbound deliveries to the CRM: dead letters and counters")
    commands = p.add_subparsers(dest="outbound_command", required=True)
    for name, text in COMMANDS:
        cmd = commands.add_parser(name, help=text)
        store_args(cmd)
        if name in ("show", "replay", "discard"):
            cmd.add_argument("id", type=int, help="message id (from `resolver outbound list`)")
        elif name == "list":
            cmd.add_argument("--after", type=int, default=0, metavar="ID", help="start after this id")
            cmd.add_argument("--limit", type=int, default=100, metavar="N")


def _when(us: int) -> str:
    return dt.datetime.fromtimestamp(us / 1e6, dt.UTC).isoformat(timespec="seconds")


def run_outbound(settings: Settings, args: argparse.Namespace) -> int:
    store = open_store(settings)
    try:
        command = args.outbound_command
        if command == "list":
            items = admin.list_dead(store, args.after, args.limit)
            for m in items:
                print(f"{m['id']}\t{_when(m['dead_us'])}\t{m['destination']}\t{m['event_type']}\t{m['reason']}\t"
                      f"attempts {m['attempts']}\t{m['last_error']}")
            print(f"outbound: {len(items)} dead letter(s)")
            return 0
        if command == "show":
            meta, body = admin.get_dead(store, args.id)
            print(f"id: {meta['id']}\ndestination: {meta['destination']}\nwebhook-id: {meta['webhook_id']}\n"
                  f"event type: {meta['event_type']}\ncustomer: {meta['customer_uuid'] or '-'}\n"
                  f"change sequence: {meta['change_seq']}\ncommitted at: {_when(meta['at_us'])}\n"
                  f"dead-lettered at: {_when(meta['dead_us'])}\nreason: {meta['reason']}\n"
                  f"attempts: {meta['attempts']}\nlast error: {meta['last_error']}")
            print(f"payload ({len(body)} bytes, masked): {meta['masked_payload']}")
            return 0
        if command == "replay":
            new_id = admin.replay(store, args.id)
            print(f"outbound: {args.id} requeued as {new_id} (same webhook-id)")
            return 0
        if command == "discard":
            admin.discard(store, args.id)
            print(f"outbound: {args.id} discarded")
            return 0
        if command == "counters":
            snap = admin.counters(store)
            c = snap["counters"]
            print(f"outbound: committed {c['committed']} = delivered {c['delivered']} + pending {snap['pending']} + "
                  f"dead {snap['dead']} + discarded {c['discarded']} ({'conserved' if snap['conserved'] else 'NOT CONSERVED'})")
            print("  " + ", ".join(f"{k} {v}" for k, v in sorted(c.items())))
            return 0 if snap["conserved"] else 1
    except ResolverError as exc:
        print(f"resolver: {exc.message}", file=sys.stderr)
        return 1
    finally:
        store.close()
    raise AssertionError(f"unhandled outbound command {args.outbound_command}")
