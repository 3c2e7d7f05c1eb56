"""The backlog writer of the outbound bench: `--messages` real changes, written into the running server's store from
a process of its own through the real write path (resolver.upsert prepare + apply, a nested transaction each, with
the outbox registered as every serving process registers it), so each commits its customer.updated message in its
own transaction. 1,000 changes per synced write transaction: the backlog is there in a second or two, and what the
bench then measures is its delivery, not its making.

`python -m bench.outbound backlog --config C --data-dir D --customers N --messages M --round R` (round R makes
credit_limit values no earlier round used, so every Upsert is a change); prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import time
import uuid
from collections.abc import Sequence
from pathlib import Path

BATCH = 1000


def main(argv: Sequence[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.outbound backlog", description=__doc__)
    p.add_argument("--config", required=True)
    p.add_argument("--data-dir", required=True)
    p.add_argument("--customers", type=int, required=True)
    p.add_argument("--messages", type=int, required=True)
    p.add_argument("--round", type=int, required=True)
    a = p.parse_args(argv)

    from resolver.bootstrap import build_service
    from resolver.config import load_settings
    from resolver.identifiers import RawIdentifiers
    from resolver.service import now_us
    from resolver.upsert import UpsertInput, apply, prepare
    from resolver.writer import apply_nested

    settings = load_settings(Path(a.config), data_dir=a.data_dir)
    service = build_service(settings, writer=False)  # the outbox listener is registered, as in every server
    store = service.store
    started = time.monotonic()
    changes = 0
    try:
        for first in range(0, a.messages, BATCH):
            with store.write() as view:
                for j in range(first, min(first + BATCH, a.messages)):
                    inp = UpsertInput(idempotency_key=str(uuid.uuid4()),
                                      identifiers=RawIdentifiers(f"CRM-{j % a.customers:09d}", (), ()),
                                      attributes={"credit_limit": a.round * 1_000_000 + j},
                                      source_system="SALESFORCE")
                    cmd = prepare(inp, settings, service.schema, service.policy, now_us=now_us())
                    result = apply_nested(store, view, lambda v, c: apply(v, c, settings), cmd)
                    changes += result.action == "UPDATED"
    finally:
        service.close()
    print(json.dumps({"changes": changes, "seconds": round(time.monotonic() - started, 2)}), flush=True)
    return 0
