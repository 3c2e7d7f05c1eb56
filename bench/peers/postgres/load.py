"""Load the benchmark's customers (the `resolver import` JSONL) into the peer's tables, normalized exactly as
resolver normalizes them (resolver.identifiers), so both answer the same lookups the same way.

    python -m bench.peers.postgres.load DSN customers.jsonl [--config BLUEPRINT]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import uuid
from collections.abc import Sequence
from typing import Any

import psycopg

from resolver.config import Settings, load_settings
from resolver.identifiers import RawIdentifiers, normalize_identifiers, policy_from

SCHEMA = """
DROP TABLE IF EXISTS ix_phone, ix_email, customers;
CREATE TABLE customers (
    id          bigint PRIMARY KEY,
    uuid        uuid NOT NULL,
    external_id text UNIQUE,
    attrs       jsonb NOT NULL,
    version     bigint NOT NULL,
    updated_at  bigint NOT NULL
);
CREATE TABLE ix_email (email text NOT NULL, customer bigint NOT NULL);
CREATE TABLE ix_phone (phone text NOT NULL, customer bigint NOT NULL);
"""
INDEXES = """
CREATE INDEX ix_email_key ON ix_email (email) INCLUDE (customer);
CREATE INDEX ix_phone_key ON ix_phone (phone) INCLUDE (customer);
ANALYZE customers; ANALYZE ix_email; ANALYZE ix_phone;
"""


def load(dsn: str, path: str, settings: Settings) -> dict[str, Any]:
    """(Re)create the tables and load every row; return counts and the rate."""
    policy = policy_from(settings)
    started = time.monotonic()
    rows = rejected = 0
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(SCHEMA)
        with conn.cursor() as cur, open(path, encoding="utf-8") as f:
            with cur.copy("COPY customers (id, uuid, external_id, attrs, version, updated_at) FROM STDIN") as cp_c:
                emails: list[tuple[str, int]] = []
                phones: list[tuple[str, int]] = []
                for line in f:
                    if not line.strip():
                        continue
                    d = json.loads(line)
                    ids = d.get("identifiers", {})
                    raw = RawIdentifiers(ids.get("externalId", ""), tuple(ids.get("emails", ())), tuple(ids.get("phones", ())))
                    norm, failures = normalize_identifiers(raw, d.get("defaultRegion") or settings.matching.default_region,
                                                           policy, "identifiers")
                    if failures:
                        rejected += 1
                        continue
                    rows += 1
                    cp_c.write_row((rows, uuid.uuid4(), norm.external_id, json.dumps(d.get("attributes", {})), 1, rows))
                    emails += [(e, rows) for e in norm.emails]
                    phones += [(p, rows) for p in norm.phones]
            with cur.copy("COPY ix_email (email, customer) FROM STDIN") as cp:
                for r in emails:
                    cp.write_row(r)
            with cur.copy("COPY ix_phone (phone, customer) FROM STDIN") as cp:
                for r in phones:
                    cp.write_row(r)
        conn.execute(INDEXES)
    elapsed = time.monotonic() - started
    return {"rows": rows, "rejected": rejected, "seconds": round(elapsed, 1), "rows_per_s": round(rows / elapsed)}


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.peers.postgres.load", description=__doc__)
    p.add_argument("dsn")
    p.add_argument("customers")
    p.add_argument("--config", help="blueprint (blocked values, default region)")
    a = p.parse_args(argv)
    print(json.dumps(load(a.dsn, a.customers, load_settings(a.config))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
