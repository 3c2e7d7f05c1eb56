"""`resolver import` rows per second beside the raw LMDB floors, and the batch lookup loop beside a raw py-lmdb
lookup loop on the same store, all measured in the same run (issues 3 and 17).

    python -m bench.import_rate [--customers 1000000] [--batch-size 2000] [--out bench/out/import]

1. `bench/dataset.py` writes N customers (kept in OUT/dataset-N, or taken from the hot-path bench's cache of
   the same N, and reused). An incremental file is made from it: N/10 rows, 90% of them existing customers
   with a changed attribute, 10% new customers (no idempotency keys: the importer derives them).
2. The real CLI, `resolver import customers.jsonl --no-progress` (the example blueprint; the machine's CPUs as
   workers), loads them into a fresh data directory: an INITIAL LOAD (built beside the store and put in place:
   resolver.importer.staged), and again into another while a second process holds that store open, as a server
   would (the initial load in place: one transaction, committed once). Then the same command imports the same
   file again (every row must replay, nothing created), then the incremental
   file into the full store (durable per batch), then `resolver check` must pass. Then the initial load again,
   into another fresh directory, killed (SIGKILL) half way through its first run's time: the store must be empty
   afterwards and pass `resolver check`.
3. Lookups, in this process, on that store (every page read once and the process settled first, as a serving
   process is): E.164 numbers of ~20% of the customers, shuffled, 10,000 a round.
   - raw loop: py-lmdb alone, in request order: hash, index cursor `set_key`, record `get` (no normalization,
     no confirmation, no decision); and the same with the keys sorted first (the sort not timed);
   - batch loop: `Resolver.resolve_many`, what ResolveStream runs per batch (normalize, sort by index key,
     probe, confirm, decide, build the answers), in batches of 256 (ResolveStream's) and of 10,000;
   - probe loop: normalize + `Prober.decide_many` over the 10,000 in request order (the figure bench/README.md
     quoted before this issue), and sorted by index key.
4. The floors (bench/import_floor.py): py-lmdb alone writing the same number of rows, per row a pre-encoded record
   of the store's average size, 3 index entries (random 16-byte keys, dupsort), a ledger entry, its expiry key, a
   change-log entry and 2 `pii_refs` keys, every byte made before the clock starts:
   - per batch: random uuid4 record keys, a synced commit per batch (what an incremental import must pay);
   - one transaction: time-ordered record keys, the record, change-log, expiry and `pii_refs` keys appended, the
     index and ledger entries put sorted per batch, one synced commit (what an initial load in place must pay);
   - built beside: the same, with an unsynced commit per staged.COMMIT_ROWS rows and one sync at the end (what an
     initial load built beside the store must pay).

OUT/report.md gives every rate and its ratio to its floor; OUT/results.json every figure.

    python -m bench.import_rate --stages 50000 [--customers N]

measures instead, in this process, the CPU time (time.process_time) per row of each stage of an initial load of the
first 50,000 rows of the dataset: a worker's preparation by the fast path (resolver._hotpath.RowPlanner) and by
the general path alone, a block's prepared rows through pickle and back, the parent's queueing and writing into
an empty store in one transaction (the last into a throwaway directory), and the one-transaction floor for as
many rows. Nothing else runs, so the machine's noise is its own; run it a few times.
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
import os
import random
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from bench.import_floor import floor_one_transaction, floor_per_batch
from resolver.importer.staged import COMMIT_ROWS

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable
SUMMARY = re.compile(r"^import: (\d+) rows, (\d+) created, (\d+) updated, (\d+) unchanged, (\d+) replayed, "
                     r"(\d+) rejected in ([\d.]+)s", re.MULTILINE)
INITIAL = "an initial load into an empty store"
LOOKUPS = 10_000  # per round
ROUNDS = 9
STREAM_BATCH = 256  # resolver.api.servicer.STREAM_BATCH


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def dataset(out: Path, customers: int) -> Path:
    """OUT/dataset-N/customers.jsonl, generated unless a finished one is there (or in the hot-path cache)."""
    ds = out / f"dataset-{customers}"
    info = ds / "dataset.json"
    if info.exists() and json.loads(info.read_text()).get("customers") == customers:
        return ds / "customers.jsonl"
    for cached in sorted((ROOT / "bench" / "out" / "cache").glob(f"customers-{customers}-v*/dataset")):
        meta = cached / "dataset.json"
        if meta.exists() and json.loads(meta.read_text()).get("customers") == customers \
                and json.loads(meta.read_text()).get("seed") == 1:
            log(f"dataset: {customers} customers from {cached}")
            return cached / "customers.jsonl"
    from bench.dataset import generate

    log(f"dataset: {customers} customers -> {ds}")
    generate(ds, customers, queries=0, upserts=0)
    return ds / "customers.jsonl"


def incremental_file(out: Path, source: Path, customers: int) -> Path:
    """N/10 rows without idempotency keys: 90% existing customers with another tier, 10% new customers."""
    from bench.dataset import Phones

    target = out / f"incremental-{customers}.jsonl"
    if target.exists():
        return target
    rng = random.Random(17)
    rows = customers // 10
    changed = set(rng.sample(range(customers), rows - rows // 10))
    phones = Phones(rng)
    tiers = ("bronze", "silver", "gold", "platinum")
    with source.open(encoding="utf-8") as f, target.open("w", encoding="utf-8") as w:
        for i, line in enumerate(f):
            if i in changed:
                row = json.loads(line)
                del row["idempotencyKey"]
                row["attributes"]["tier"] = tiers[(tiers.index(row["attributes"]["tier"]) + 1) % len(tiers)]
                w.write(json.dumps(row) + "\n")
        import phonenumbers

        for i in range(rows // 10):
            e164 = phonenumbers.format_number(phones.new("US"), phonenumbers.PhoneNumberFormat.E164)
            w.write(json.dumps({"identifiers": {"externalId": f"NEW-{i:09d}", "emails": [f"new.{i}@example-us.com"],
                                                "phones": [e164]},
                                "attributes": {"name": f"New {i}", "status": "Active", "tier": "bronze"},
                                "sourceSystem": "SALESFORCE"}) + "\n")
    return target


def run_import(source: Path, data: Path, config: str, batch: int, *, held_open: bool = False) -> dict[str, Any]:
    """The real CLI's import of `source` into `data`. `held_open`: another process has the store open meanwhile
    (as a running server does), so an initial load runs in place, in one transaction."""
    cmd = [PY, "-m", "resolver", "import", str(source), "--config", config, "--data-dir", str(data),
           "--batch-size", str(batch), "--no-progress"]
    holder = _hold_open(data, config) if held_open else None
    try:
        started = time.monotonic()
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        elapsed = time.monotonic() - started
    finally:
        if holder is not None:
            holder.communicate(timeout=60)
    m = SUMMARY.search(proc.stdout)
    if proc.returncode != 0 or m is None:
        raise SystemExit(f"import failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr[-3000:]}")
    rows, created, updated, unchanged, replayed, rejected = map(int, m.groups()[:6])
    return {"command": shlex.join(cmd), "summary": m.group(0), "initial_load": INITIAL in proc.stdout, "rows": rows,
            "created": created, "updated": updated, "unchanged": unchanged, "replayed": replayed,
            "rejected": rejected, "wall_s": round(elapsed, 2), "rows_per_s": round(rows / elapsed)}


def _hold_open(data: Path, config: str) -> subprocess.Popen[str]:
    """A process that makes the store in `data` and keeps its LMDB environment open until its stdin closes."""
    code = ("import sys; from pathlib import Path; from resolver.bootstrap import open_store; "
            "from resolver.config import load_settings; "
            "s = open_store(load_settings(Path(sys.argv[1]), data_dir=sys.argv[2])); print('open', flush=True); "
            "sys.stdin.read(); s.close()")
    proc = subprocess.Popen([PY, "-c", code, config, str(data)], cwd=ROOT, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    if proc.stdout.readline() != "open\n":
        raise SystemExit(f"could not hold {data} open")
    return proc


def killed_load(source: Path, data: Path, config: str, batch: int, after_s: float) -> dict[str, Any]:
    """An initial load killed with SIGKILL `after_s` seconds in: what the store holds afterwards."""
    from resolver.bootstrap import open_store
    from resolver.config import load_settings

    cmd = [PY, "-m", "resolver", "import", str(source), "--config", config, "--data-dir", str(data),
           "--batch-size", str(batch), "--no-progress"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    time.sleep(after_s)
    running = proc.poll() is None
    proc.kill()
    out = proc.communicate(timeout=60)[0]
    if not running or "import:" in out:
        raise SystemExit(f"the import ended before it was killed ({after_s:.1f} s): {out}")
    size = (data / "data.mdb").stat().st_size
    left = sum(f.stat().st_size for f in data.glob(".load-*/*"))  # the staging copy (the next lock removes it)
    store = open_store(load_settings(Path(config), data_dir=str(data)), readonly=True)
    try:
        with store.read() as view:
            held = {name: view.count(name) for name in ("records", "ledger", "changes", "ix_phone", "pii_refs")}
    finally:
        store.close()
    if any(held.values()):
        raise SystemExit(f"a killed initial load left entries behind: {held}")
    return {"killed_after_s": round(after_s, 1), "data_mdb_mb": round(size / 2**20), "copy_mb": round(left / 2**20),
            "entries_after": held,
            "check": check(data, config)}


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


def check(data: Path, config: str) -> str:
    proc = subprocess.run([PY, "-m", "resolver", "check", "--config", config, "--data-dir", str(data)], cwd=ROOT,
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"resolver check failed after the imports:\n{proc.stdout[-3000:]}")
    return proc.stdout.splitlines()[0]


def _median_rate(run: Callable[[list[str]], int], rounds: list[list[str]]) -> dict[str, Any]:
    """lookups/s of `run` over each round (the first one a warm-up), from the median round."""
    run(rounds[0])
    times = []
    found = 0
    for chunk in rounds[1:]:
        started = time.perf_counter()
        found = run(chunk)
        times.append(time.perf_counter() - started)
    median = statistics.median(times)
    return {"lookups_per_s": round(LOOKUPS / median), "median_ms": round(median * 1000, 1),
            "best_ms": round(min(times) * 1000, 1), "found_last_round": found}


def lookup_loops(data: Path, config: str, source: Path) -> dict[str, Any]:
    """The batch loop and the raw py-lmdb loop on the store in `data` (see the module docstring, 3)."""
    from resolver._hotpath import normalize_phone
    from resolver.bootstrap import build_service
    from resolver.config import load_settings
    from resolver.identifiers import RawIdentifiers
    from resolver.normalize import Kind
    from resolver.resolve import ResolveInput
    from resolver.server import settle

    svc = build_service(load_settings(Path(config), data_dir=str(data)), readonly=True)
    try:
        rng = random.Random(3)
        callers = []
        with source.open(encoding="utf-8") as f:
            for line in f:
                if rng.random() < 0.2:
                    row = json.loads(line)
                    callers.append(normalize_phone(row["identifiers"]["phones"][0], row.get("defaultRegion") or None,
                                                   svc.policy))
        rng.shuffle(callers)
        size = min(LOOKUPS, len(callers))
        rounds = [callers[i * size:(i + 1) * size] for i in range(ROUNDS + 1)]
        rounds = [r for r in rounds if len(r) == size] or [callers[:size]]
        store, key = svc.store, svc.store.hasher.key
        ix, records = store.ix[Kind.PHONE], store.db["records"]
        with store.read() as view:  # every page read once, as in a process that has served a while
            for db in (records, *store.index_dbs):
                with view.txn.cursor(db=db) as cur:
                    for _ in cur.iternext(keys=True, values=True):
                        pass
        settle()

        def raw(phones: list[str]) -> int:
            n = 0
            with store.env.begin() as txn, txn.cursor(db=ix) as cur:
                get = txn.get
                for p in phones:
                    if cur.set_key(key(3, p)) and get(cur.value(), None, records) is not None:
                        n += 1
            return n

        sorted_keys = {id(r): sorted(key(3, p) for p in r) for r in rounds}

        def raw_sorted(phones: list[str]) -> int:
            n = 0
            with store.env.begin() as txn, txn.cursor(db=ix) as cur:
                get = txn.get
                for k in sorted_keys[id(phones)]:
                    if cur.set_key(k) and get(cur.value(), None, records) is not None:
                        n += 1
            return n

        requests = {id(r): [ResolveInput(RawIdentifiers(phones=(p,))) for p in r] for r in rounds}

        def batches_of(size: int) -> Callable[[list[str]], int]:
            def run(phones: list[str]) -> int:
                reqs = requests[id(phones)]
                n = 0
                for start in range(0, len(reqs), size):
                    n += sum(1 for a in svc.resolve_many(reqs[start:start + size]) if getattr(a, "outcome", "") != "NOT_FOUND")
                return n
            return run

        policy, fanout = svc.policy, svc.settings.matching.max_fanout

        def probe_loop(order: bool) -> Callable[[list[str]], int]:
            def run(phones: list[str]) -> int:
                sets = [(None, [], [normalize_phone(p, None, policy)], False) for p in phones]
                if order:
                    sets.sort(key=lambda s: key(3, s[2][0]))
                with store.read() as view:
                    return sum(1 for d in view.prober.decide_many(sets, fanout) if d.outcome)
            return run

        out = {"callers": len(callers), "per_round": size, "rounds": len(rounds) - 1}
        for name, run in (("raw", raw), ("raw_sorted", raw_sorted), ("resolve_many_256", batches_of(STREAM_BATCH)),
                          ("resolve_many_10000", batches_of(LOOKUPS)), ("probe_loop", probe_loop(False)),
                          ("probe_loop_sorted", probe_loop(True))):
            gc.collect()
            out[name] = _median_rate(run, rounds)
            log(f"lookups {name}: {out[name]['lookups_per_s']:,}/s")
        return out
    finally:
        svc.close()


def report(r: dict[str, Any]) -> str:
    first, in_place, again, inc = r["import"], r["import_in_place"], r["reimport"], r["incremental"]
    beside, one, per = (r[n]["rows_per_s"] for n in ("floor_staged", "floor_one_txn", "floor_per_batch"))
    lk = r["lookups"]
    raw = lk["raw"]["lookups_per_s"]
    sizes = r["floor_per_batch"]["bytes"]

    def lookup_row(name: str, what: str) -> str:
        x = lk[name]
        return f"| {what} | {x['lookups_per_s']:,} | {x['median_ms']} ms (best {x['best_ms']}) | {x['lookups_per_s'] / raw:.2f} |"

    lines = [
        f"# `resolver import`: {r['customers']:,} customers",
        "",
        f"{r['when']}, {r['cpus']} CPUs, load average before → after: {r['load_before']:.2f} → {r['load_after']:.2f} "
        "(another benchmark running at the same time lowers every figure; read the ratios).",
        "",
        "| run | rows/s | wall | ratio to its floor |",
        "| --- | ---: | ---: | ---: |",
        f"| **initial load** (empty store, nothing else has it open: built beside it, put in place) | "
        f"**{first['rows_per_s']:,}** | {first['wall_s']} s | {first['rows_per_s'] / beside:.2f} of its floor |",
        f"| initial load in place (another process has the store open, as a server does: one transaction) | "
        f"{in_place['rows_per_s']:,} | {in_place['wall_s']} s | {in_place['rows_per_s'] / one:.2f} of the "
        f"one-transaction floor |",
        f"| re-import (every row replays) | {again['rows_per_s']:,} | {again['wall_s']} s | |",
        f"| incremental import into the full store ({inc['rows']:,} rows: {inc['updated']:,} updated, "
        f"{inc['created']:,} created; durable per batch) | {inc['rows_per_s']:,} | {inc['wall_s']} s | "
        f"{inc['rows_per_s'] / per:.2f} of the per-batch floor |",
        f"| floor: py-lmdb, built beside: an unsynced commit per {COMMIT_ROWS:,} rows, one sync, appends where "
        f"keys are ordered | {beside:,} | {r['floor_staged']['wall_s']} s | 1.00 |",
        f"| floor: py-lmdb, one transaction, appends where keys are ordered | {one:,} | "
        f"{r['floor_one_txn']['wall_s']} s | 1.00 |",
        f"| floor: py-lmdb, a synced commit per {r['floor_per_batch']['batch']} rows, random uuid4 keys | {per:,} | "
        f"{r['floor_per_batch']['wall_s']} s | 1.00 |",
        "",
        f"Target (issue 17): initial load ≥ 50,000 rows/s: {first['rows_per_s'] / 50_000:.2f} of it "
        f"({'met' if first['rows_per_s'] >= 50_000 else 'NOT met'}). Store: {r['store_mb']:,} MB of data.mdb for "
        f"{r['input_mb']:,} MB of input ({r['store_mb'] / r['input_mb']:.1f} bytes of map per input byte).",
        "",
        "| lookups (in process, E.164 phones, cold callers) | lookups/s | median round of 10,000 | ratio to the raw loop |",
        "| --- | ---: | ---: | ---: |",
        lookup_row("raw", "raw py-lmdb loop, request order (hash, set_key, get)"),
        lookup_row("raw_sorted", "raw py-lmdb loop, keys sorted first (sort not timed)"),
        lookup_row("resolve_many_256", "batch loop: `resolve_many` in batches of 256 (ResolveStream's), full answers"),
        lookup_row("resolve_many_10000", "batch loop: `resolve_many` in batches of 10,000, full answers"),
        lookup_row("probe_loop", "probe loop: normalize + `decide_many`, request order (the figure quoted before)"),
        lookup_row("probe_loop_sorted", "probe loop: normalize + `decide_many`, sorted by index key"),
        "",
        f"Target (issue 17): batch loop ≥ 0.9× the raw loop: `resolve_many` (256) is "
        f"{lk['resolve_many_256']['lookups_per_s'] / raw:.2f}×, the sorted probe loop "
        f"{lk['probe_loop_sorted']['lookups_per_s'] / raw:.2f}×.",
        "",
        f"- initial load: `{first['summary']}` (initial load: {first['initial_load']}); in place: "
        f"`{in_place['summary']}` (initial load: {in_place['initial_load']})",
        f"- again: `{again['summary']}`",
        f"- incremental: `{inc['summary']}`",
        f"- check: `{r['check']}`",
        f"- kill -9 of an initial load after {r['killed']['killed_after_s']} s (data.mdb then "
        f"{r['killed']['data_mdb_mb']} MB, the copy it was building {r['killed']['copy_mb']} MB): entries afterwards "
        f"{r['killed']['entries_after']}; `{r['killed']['check']}`",
        f"- floors: {r['floor_per_batch']['rows']:,} rows, values of the store's average sizes (record "
        f"{sizes['records']} B, ledger entry {sizes['ledger']} B, change {sizes['changes']} B)",
        f"- command: `{first['command']}`",
        "",
    ]
    return "\n".join(lines)


def _cpu(fn: Callable[[], Any], rows: int) -> tuple[float, Any]:
    """CPU µs per row of `fn()` in this process (its collections included), and what it returned."""
    gc.collect()
    started = time.process_time()
    result = fn()
    return (time.process_time() - started) / rows * 1e6, result


def stages(source: Path, rows: int, config: str, batch: int) -> dict[str, float]:
    """CPU µs per row of each stage of an initial load of the first `rows` rows of `source` (see the module
    docstring), in this process."""
    import pickle

    from resolver.bootstrap import build_service
    from resolver.config import load_settings
    from resolver.importer import prepare
    from resolver.importer.commit import Importer
    from resolver.importer.jsonl import JsonParser, read_blocks
    from resolver.importer.rows import from_wire, to_wire
    from resolver.uuids import LoadUuids

    blocks = []
    with source.open("rb") as f:
        for block in read_blocks(f):
            lines = block.data.count(b"\n")
            if sum(b.data.count(b"\n") for b in blocks) + lines > rows:
                break
            blocks.append(block)
    rows = sum(b.data.count(b"\n") for b in blocks)

    class General:  # the planner of no fast path: every line to the general path
        def __init__(self, rules: Any) -> None:
            pass

        def block(self, data: bytes, first: int, general: Callable[[int, bytes], Any]) -> list[Any]:
            found = (general(n, raw) for n, raw in enumerate(data.rstrip(b"\n").split(b"\n"), first))
            return [item for item in found if item is not None]

    out: dict[str, float] = {"rows": rows}
    with tempfile.TemporaryDirectory(prefix="resolver-stages-") as tmp:
        settings = load_settings(Path(config), data_dir=str(Path(tmp) / "data"))
        fast = prepare.Preparer(settings, JsonParser(), prepare.Defaults("", ""), LoadUuids.start())
        original = prepare.RowPlanner
        prepare.RowPlanner = General  # type: ignore[misc,assignment]
        try:
            general = prepare.Preparer(settings, JsonParser(), prepare.Defaults("", ""), LoadUuids.start())
        finally:
            prepare.RowPlanner = original  # type: ignore[misc]
        out["prepare: general path"], _ = _cpu(lambda: [general.items(b) for b in blocks], rows)
        out["prepare: fast path"], items = _cpu(lambda: [fast.items(b) for b in blocks], rows)
        out["to the parent: pickle"], wire = _cpu(lambda: [pickle.dumps(to_wire(i), protocol=5) for i in items], rows)
        out["to the parent: unpickle"], chunks = _cpu(lambda: [from_wire(pickle.loads(w)) for w in wire], rows)
        service = build_service(settings, writer=False, outbox=False)
        try:
            importer = Importer(service, Path(tmp) / "rejected.jsonl", fast.command, batch_size=batch, progress=False)
            out["parent: queue, write, commit"], _ = _cpu(
                lambda: importer.run(iter(chunks), total=rows, skip=0, name=source, started=time.monotonic()), rows)
        finally:
            service.close()
        sizes = value_sizes(Path(tmp) / "data", config)
        floor_dir = Path(tmp) / "floor"
        floor_dir.mkdir()
        out["floor: py-lmdb, one transaction"], _ = _cpu(lambda: floor_one_transaction(rows, batch, sizes, floor_dir),
                                                         rows)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.import_rate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--customers", type=int, default=200_000)
    p.add_argument("--batch-size", type=int, default=2000)
    p.add_argument("--config", default=str(ROOT / "examples" / "blueprint.toml"))
    p.add_argument("--out", default=str(ROOT / "bench" / "out" / "import"))
    p.add_argument("--stages", type=int, metavar="ROWS", help="only the CPU per row of each stage (module docstring)")
    a = p.parse_args(argv)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    source = dataset(out, a.customers)
    if a.stages:
        figures = stages(source, a.stages, a.config, a.batch_size)
        for name, value in figures.items():
            print(f"{name:36s} {value:10.1f}" + ("" if name == "rows" else " µs CPU per row"))
        return 0
    changes = incremental_file(out, source, a.customers)
    results: dict[str, Any] = {"customers": a.customers, "when": time.strftime("%Y-%m-%d %H:%M"),
                               "cpus": len(os.sched_getaffinity(0)), "load_before": os.getloadavg()[0],
                               "input_mb": round(source.stat().st_size / 2**20)}
    with tempfile.TemporaryDirectory(prefix="resolver-import-") as tmp:
        data = Path(tmp) / "data"
        log("import (fresh data directory: an initial load)")
        results["import"] = run_import(source, data, a.config, a.batch_size)
        log(results["import"]["summary"])
        if not results["import"]["initial_load"]:
            raise SystemExit("the first import was not an initial load")
        results["store_mb"] = round((data / "data.mdb").stat().st_size / 2**20)
        log("import into a store another process holds open (an initial load in place, one transaction)")
        results["import_in_place"] = run_import(source, Path(tmp) / "in-place", a.config, a.batch_size, held_open=True)
        log(results["import_in_place"]["summary"])
        shutil.rmtree(Path(tmp) / "in-place")
        log("import again (every row replays)")
        results["reimport"] = run_import(source, data, a.config, a.batch_size)
        log(results["reimport"]["summary"])
        if results["reimport"]["created"] or results["reimport"]["replayed"] != results["reimport"]["rows"]:
            raise SystemExit("the re-import did not replay every row")
        log(f"incremental import ({changes.name}) into the full store")
        results["incremental"] = run_import(changes, data, a.config, a.batch_size)
        log(results["incremental"]["summary"])
        results["check"] = check(data, a.config)
        sizes = value_sizes(data, a.config)
        log("lookups on the full store")
        results["lookups"] = lookup_loops(data, a.config, source)
        shutil.rmtree(data)
        half = results["import"]["wall_s"] / 2
        log(f"an initial load killed after {half:.1f} s")
        results["killed"] = killed_load(source, Path(tmp) / "killed", a.config, a.batch_size, half)
        log(f"killed: {results['killed']}")
        shutil.rmtree(Path(tmp) / "killed")
        gc.collect()
        staged_floor = functools.partial(floor_one_transaction, commit_rows=COMMIT_ROWS)
        for name, floor in (("floor_staged", staged_floor), ("floor_one_txn", floor_one_transaction),
                            ("floor_per_batch", floor_per_batch)):
            log(f"{name}: raw py-lmdb")
            floor_dir = Path(tmp) / name
            floor_dir.mkdir()
            results[name] = floor(results["import"]["rows"], a.batch_size, sizes, floor_dir)
            shutil.rmtree(floor_dir)
            gc.collect()
            log(f"{name}: {results[name]['rows_per_s']} rows/s")
    results["load_after"] = os.getloadavg()[0]
    (out / "results.json").write_text(json.dumps(results, indent=1))
    text = report(results)
    (out / "report.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
