"""Benchmarks share one store of N customers (BENCH_CUSTOMERS, default 20,000) in a temp directory, and the
hot-path suite (bench/test_hotpath.py) a store of BIG customers (BENCH_BIG_CUSTOMERS, default 1,000,000) made
by the real `resolver import` of bench/dataset.py's customers and kept in bench/out/cache/ between runs."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from resolver.bootstrap import build_service
from resolver.config import load_settings
from resolver.identifiers import RawIdentifiers
from resolver.service import Service
from resolver.upsert import UpsertInput

N = int(os.environ.get("BENCH_CUSTOMERS", "20000"))
BIG = int(os.environ.get("BENCH_BIG_CUSTOMERS", "1000000"))
ROOT = Path(__file__).resolve().parent.parent
BLUEPRINT = ROOT / "examples" / "blueprint.toml"


def phone(i: int) -> str:
    """Valid, distinct US numbers (i < 80,000) over eight area codes."""
    area = (201, 212, 305, 415, 617, 650, 713, 917)[i % 8]
    return f"+1{area}253{i // 8 % 10000:04d}"


@pytest.fixture(scope="session")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    data = Path(tmp_path_factory.mktemp("bench")) / "data"
    svc = build_service(load_settings(None, data_dir=str(data), default_region="US"))
    from resolver.service import now_us
    from resolver.upsert import apply, prepare

    with svc.store.write() as view:  # one transaction: loading is not what is measured here
        for i in range(N):
            inp = UpsertInput(f"bench-{i}", RawIdentifiers(f"EXT-{i}", (f"user{i}@example.com",), (phone(i),)),
                              {"name": f"Customer {i}", "tier": "gold"})
            apply(view, prepare(inp, svc.settings, svc.schema, svc.policy, now_us=now_us()), svc.settings)
    yield svc
    svc.close()


@pytest.fixture(scope="session")
def big_store() -> Iterator[tuple[Service, Path]]:
    """(service, customers.jsonl) over BIG customers; imported once, then reused from bench/out/cache/."""
    from bench.dataset import generate
    from resolver.server import settle
    from resolver.store import FORMAT_VERSION

    root = ROOT / "bench" / "out" / "cache" / f"customers-{BIG}-v{FORMAT_VERSION}"
    data, customers = root / "data", root / "dataset" / "customers.jsonl"
    if not (root / "ready").exists():
        shutil.rmtree(root, ignore_errors=True)
        generate(root / "dataset", BIG, 0, 0)
        subprocess.run([str(Path(sys.executable).parent / "resolver"), "import", str(customers), "--config", str(BLUEPRINT),
                        "--data-dir", str(data), "--no-progress"], cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
        (root / "ready").touch()
    svc = build_service(load_settings(str(BLUEPRINT), data_dir=str(data)))
    # A server that has run for a while has every page of its map faulted in; a fresh process has none, and its
    # first touch of each page costs a page fault that no steady-state call pays. Read everything once.
    with svc.store.read() as view:
        for db in (svc.store.records_db, *svc.store.index_dbs):
            with view.txn.cursor(db=db) as cur:
                for _ in cur.iternext(keys=True, values=True):
                    pass
    settle()  # as a serving process does once it is loaded
    yield svc, customers
    svc.close()
