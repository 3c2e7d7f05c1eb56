"""`resolver dlq list | show ID | replay ID | discard ID`: operate on the data directory directly (works while
the server runs: LMDB serializes the writers). Output never shows a raw identifier or attribute value."""

from __future__ import annotations

import argparse
import datetime as dt
import sys

from resolver.bootstrap import build_events, build_service
from resolver.config import Settings
from resolver.errors import ResolverError


def _when(us: int) -> str:
    return dt.datetime.fromtimestamp(us / 1e6, dt.UTC).isoformat(timespec="seconds")


def run_dlq(settings: Settings, args: argparse.Namespace) -> int:
    from resolver.events.dlq import masked_payload

    service = build_service(settings)
    try:
        events = build_events(service)
        if args.dlq_command == "list":
            items = events.list_dead_letters(args.after, args.limit)
            for m in items:
                print(f"{m['id']}\t{_when(m['dead_lettered_us'])}\t{m['source']}\t{m['reason']}\t"
                      f"attempts {m.get('attempts', 1)}\t{m['size']} bytes")
            print(f"dlq: {len(items)} dead letter(s)")
            return 0
        if args.dlq_command == "show":
            meta, body = events.get_dead_letter(args.id)
            print(f"id: {meta['id']}\nsource: {meta['source']}\nwebhook-id: {meta['webhook_id']}\n"
                  f"reason: {meta['reason']}\ndetail: {meta.get('detail', '')}\norigin: {meta.get('origin', '')}\n"
                  f"dead-lettered at: {_when(meta['dead_lettered_us'])}\nattempts: {meta.get('attempts', 1)}")
            print("headers: " + ", ".join(f"{k}: {v}" for k, v in sorted(meta.get("headers", {}).items())))
            print(f"payload ({len(body)} bytes, masked): {masked_payload(body)}")
            return 0
        if args.dlq_command == "replay":
            r = events.replay(args.id)
            if r.applied:
                print(f"dlq: {args.id} replayed: applied to customer {r.customer_uuid}")
                return 0
            print(f"dlq: {args.id} still failing: {r.reason}: {r.detail}", file=sys.stderr)
            return 1
        if args.dlq_command == "discard":
            events.discard(args.id)
            print(f"dlq: {args.id} discarded")
            return 0
    except ResolverError as exc:
        print(f"resolver: {exc.message}", file=sys.stderr)
        return 1
    finally:
        service.close()
    raise AssertionError(f"unhandled dlq command {args.dlq_command}")
