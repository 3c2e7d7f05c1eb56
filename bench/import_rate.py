"""`resolver import` rows per second, beside the raw LMDB floor measured in the same run (issue 3).

    python -m bench.import_rate [--customers 1000000] [--batch-size 2000] [--out bench/out/import]

1. `bench/dataset.py` writes N customers (kept in OUT/dataset-N and reused by the next run of the same N).
2. The real CLI, `resolver import customers.jsonl --no-progress`, loads them into a fresh data directory
   (the example blueprint; the machine's CPUs as workers), then the same command imports the same file
   again (every row must replay, nothing created), then `resolver check` must pass.
3. The floor: py-lmdb alone writing the same number of rows in the same batch size, durable per batch
   (sync on every commit): per row one pre-encoded record of the average stored size under a random
   uuid and 3 index entries (random 16-byte key -> uuid) in dupsort databases; every byte made before the
   clock starts. That is what any importer into this layout must at least pay. The full floor adds what
   an Upsert also writes per row: a ledger entry and its expiry key (keys in the dataset's own order) and a
   change-log entry (appended), with the store's average sizes.

OUT/report.md gives both rates and their ratios to the floor; OUT/results.json every figure.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lmdb

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable
SUMMARY = re.compile(r"^import: (\d+) rows, (\d+) created, (\d+) updated, (\d+) unchanged, (\d+) replayed, "
                     r"(\d+) rejected in ([\d.]+)s", re.MULTILINE)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def dataset(out: Path, customers: int) -> Path:
    """OUT/dataset-N/customers.jsonl, generated unless a finished one is there."""
    ds = out / f"dataset-{customers}"
    info = ds / "dataset.json"
    if not (info.exists() and json.loads(info.read_text()).get("customers") == customers):
        from bench.dataset import generate

        log(f"dataset: {customers} customers -> {ds}")
        generate(ds, customers, queries=0, upserts=0)
    return ds / "customers.jsonl"


def run_import(source: Path, data: Path, config: str, batch: int) -> dict[str, Any]:
    cmd = [PY, "-m", "resolver", "import", str(source), "--config", config, "--data-dir", str(data),
           "--batch-size", str(batch), "--no-progress"]
    started = time.monotonic()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    elapsed = time.monotonic() - started
    m = SUMMARY.search(proc.stdout)
    if proc.returncode != 0 or m is None:
        raise SystemExit(f"import failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr[-3000:]}")
    rows, created, updated, unchanged, replayed, rejected = map(int, m.groups()[:6])
    return {"command": shlex.join(cmd), "summary": m.group(0), "rows": rows, "created": created, "updated": updated,
            "unchanged": unchanged, "replayed": replayed, "rejected": rejected, "wall_s": round(elapsed, 2),
            "rows_per_s": round(rows / elapsed)}


def value_sizes(data: Path, config: str) -> dict[str, int]:
    """The average stored value size (bytes) of records, ledger entries and change-log entries."""
    from resolver.bootstrap import open_store
    from resolver.config import load_settings

    store = open_store(load_settings(Path(config), data_dir=str(data)), readonly=True)
    sizes = {}
    try:
        with store.read() as view:
            for name in ("records", "ledger", "changes"):
                total = n = 0
                with view.txn.cursor(db=store.db[name]) as cur:
                    for _, value in cur:
                        total += len(value)
                        n += 1
                        if n == 20_000:
                            break
                sizes[name] = max(1, total // n) if n else 300
    finally:
        store.close()
    return sizes


def lmdb_floor(rows: int, batch: int, sizes: dict[str, int], where: Path, *, full: bool) -> dict[str, Any]:
    """py-lmdb writing `rows` records + 3 index entries each (`full`: + ledger, ledger_exp and change-log
    entries), one synced commit per batch."""
    env = lmdb.open(str(where), map_size=64 << 30, max_dbs=8, sync=True, metasync=True)
    try:
        records, ledger, ledger_exp, changes = (env.open_db(n) for n in (b"records", b"ledger", b"ledger_exp", b"changes"))
        ix = [env.open_db(name, dupsort=True, dupfixed=True) for name in (b"ix_external", b"ix_email", b"ix_phone")]
        value, entry, change = (b"x" * sizes[n] for n in ("records", "ledger", "changes"))
        uids = [os.urandom(16) for _ in range(rows)]
        keys = [os.urandom(48) for _ in range(rows)]
        started = time.monotonic()
        for start in range(0, rows, batch):
            with env.begin(write=True) as txn:
                for i in range(start, min(start + batch, rows)):
                    uid, k = uids[i], keys[i]
                    txn.put(uid, value, db=records)
                    txn.put(k[:16], uid, db=ix[0])
                    txn.put(k[16:32], uid, db=ix[1])
                    txn.put(k[32:], uid, db=ix[2])
                    if full:
                        lkey = b"bench-load-%d" % i
                        txn.put(lkey, entry, db=ledger)
                        txn.put(b"%016x" % i + lkey, b"", db=ledger_exp)
                        txn.put(i.to_bytes(8, "big"), change, db=changes, append=True)
        elapsed = time.monotonic() - started
    finally:
        env.close()
    return {"rows": rows, "bytes": sizes, "batch": batch, "full": full, "wall_s": round(elapsed, 2),
            "rows_per_s": round(rows / elapsed)}


def check(data: Path, config: str) -> str:
    proc = subprocess.run([PY, "-m", "resolver", "check", "--config", config, "--data-dir", str(data)], cwd=ROOT,
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"resolver check failed after the import:\n{proc.stdout[-3000:]}")
    return proc.stdout.splitlines()[0]


def report(r: dict[str, Any]) -> str:
    floor, full = r["floor"]["rows_per_s"], r["floor_full"]["rows_per_s"]
    first, again = r["import"], r["reimport"]
    sizes = r["floor"]["bytes"]
    lines = [
        f"# `resolver import`: {r['customers']:,} customers",
        "",
        f"{r['when']}, {r['cpus']} CPUs, load average before → after: {r['load_before']} → {r['load_after']} "
        "(another benchmark running at the same time lowers every figure; read the ratios).",
        "",
        "| run | rows/s | wall | ratio to the floor | ratio to the full floor |",
        "| --- | ---: | ---: | ---: | ---: |",
        f"| first import (creates) | {first['rows_per_s']:,} | {first['wall_s']} s | {first['rows_per_s'] / floor:.2f} | "
        f"{first['rows_per_s'] / full:.2f} |",
        f"| re-import (replays) | {again['rows_per_s']:,} | {again['wall_s']} s | {again['rows_per_s'] / floor:.2f} | "
        f"{again['rows_per_s'] / full:.2f} |",
        f"| floor: py-lmdb, record + 3 index entries | {floor:,} | {r['floor']['wall_s']} s | 1.00 | |",
        f"| full floor: + ledger, ledger_exp, change log | {full:,} | {r['floor_full']['wall_s']} s | | 1.00 |",
        "",
        f"Target (issue 3): ≥ 50,000 rows/s for 1M customers, durable per batch: first import "
        f"{'meets it' if first['rows_per_s'] >= 50_000 else 'does NOT meet it'} "
        f"({first['rows_per_s'] / 50_000:.2f} of the target).",
        "",
        f"- first: `{first['summary']}`",
        f"- again: `{again['summary']}`",
        f"- check: `{r['check']}`",
        f"- floors: {r['floor']['rows']:,} rows, {r['floor']['batch']} rows per synced commit; values of the store's "
        f"average sizes (record {sizes['records']} B, ledger entry {sizes['ledger']} B, change {sizes['changes']} B)",
        f"- command: `{first['command']}`",
        "",
    ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.import_rate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--customers", type=int, default=200_000)
    p.add_argument("--batch-size", type=int, default=2000)
    p.add_argument("--config", default=str(ROOT / "examples" / "blueprint.toml"))
    p.add_argument("--out", default=str(ROOT / "bench" / "out" / "import"))
    a = p.parse_args(argv)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    source = dataset(out, a.customers)
    results: dict[str, Any] = {"customers": a.customers, "when": time.strftime("%Y-%m-%d %H:%M"),
                               "cpus": len(os.sched_getaffinity(0)), "load_before": os.getloadavg()[0]}
    with tempfile.TemporaryDirectory(prefix="resolver-import-") as tmp:
        data = Path(tmp) / "data"
        log("import (fresh data directory)")
        results["import"] = run_import(source, data, a.config, a.batch_size)
        log(results["import"]["summary"])
        log("import again (every row replays)")
        results["reimport"] = run_import(source, data, a.config, a.batch_size)
        log(results["reimport"]["summary"])
        if results["reimport"]["created"] or results["reimport"]["replayed"] != results["reimport"]["rows"]:
            raise SystemExit("the re-import did not replay every row")
        results["check"] = check(data, a.config)
        sizes = value_sizes(data, a.config)
        shutil.rmtree(data)
        for key, full in (("floor", False), ("floor_full", True)):
            log(f"{key}: raw py-lmdb")
            floor_dir = Path(tmp) / key
            floor_dir.mkdir()
            results[key] = lmdb_floor(results["import"]["rows"], a.batch_size, sizes, floor_dir, full=full)
            shutil.rmtree(floor_dir)
            log(f"{key}: {results[key]['rows_per_s']} rows/s")
    results["load_after"] = os.getloadavg()[0]
    (out / "results.json").write_text(json.dumps(results, indent=1))
    text = report(results)
    (out / "report.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
