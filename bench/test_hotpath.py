"""The hot path on a 1M-customer index (issue 3's targets), each figure beside its floor from the same run.

- `resolve-1M`: one in-process Resolve (no gRPC) of a cold caller, phone only, pre-formatted E.164: every
  round asks for a different customer, drawn at random from the whole index. Baseline: a read transaction and
  one `get` of a random record (the least any lookup does). Target: median <= 15 us.
- `batch-1M`: the batch loop: 10,000 E.164 numbers normalized, hashed, probed and confirmed inside one read
  transaction, ending in the precedence decision (`Prober.decide_many`, what ResolveStream runs). Baseline: the
  raw LMDB floor for the same numbers (hash, index cursor, record get; no normalization, no confirmation, no
  decision). Target: >= 300,000 lookups/s; the figure is printed as lookups/s in extra_info.

Run: `make bench-hotpath` (BENCH_BIG_CUSTOMERS=200000 for a quicker look; the store is imported once and
kept in bench/out/cache/).
"""

from __future__ import annotations

import itertools
import json
import random
from pathlib import Path

import pytest

from resolver._hotpath import normalize_phone
from resolver.identifiers import RawIdentifiers
from resolver.normalize import Kind
from resolver.resolve import ResolveInput
from resolver.service import Service

BATCH = 10_000


@pytest.fixture(scope="module")
def callers(big_store: tuple[Service, Path]) -> list[str]:
    """E.164 numbers of about 200k random customers of the big store, shuffled."""
    svc, customers = big_store
    rng = random.Random(3)
    out = []
    with customers.open(encoding="utf-8") as f:
        for line in f:
            if rng.random() < 0.2:
                row = json.loads(line)
                raw = row["identifiers"]["phones"][0]
                out.append(normalize_phone(raw, row.get("defaultRegion") or None, svc.policy))
    rng.shuffle(out)
    return out


@pytest.mark.benchmark(group="resolve-1M")
def test_resolve_cold_caller(benchmark, big_store: tuple[Service, Path], callers: list[str]) -> None:  # noqa: ANN001
    svc, _ = big_store
    reqs = itertools.cycle([ResolveInput(RawIdentifiers(phones=(p,))) for p in callers])
    outcomes = set()

    def run() -> None:
        outcomes.add(svc.resolve(next(reqs)).outcome)

    benchmark(run)
    assert "MATCHED" in outcomes and "NOT_FOUND" not in outcomes


@pytest.mark.benchmark(group="resolve-1M")
def test_baseline_read_txn_random_get(benchmark, big_store: tuple[Service, Path], callers: list[str]) -> None:  # noqa: ANN001
    svc, _ = big_store
    env, ix, records = svc.store.env, svc.store.ix[Kind.PHONE], svc.store.db["records"]
    with env.begin() as txn:
        uids = itertools.cycle([txn.get(svc.store.hasher.key(Kind.PHONE, p), db=ix) for p in callers])

    def run() -> None:
        with env.begin() as txn:
            txn.get(next(uids), db=records)

    benchmark(run)


def _chunks(callers: list[str]) -> itertools.cycle[list[str]]:
    size = min(BATCH, len(callers))
    return itertools.cycle([callers[i:i + size] for i in range(0, len(callers) - size + 1, size)])


@pytest.mark.benchmark(group="batch-1M")
def test_batch_loop(benchmark, big_store: tuple[Service, Path], callers: list[str]) -> None:  # noqa: ANN001
    svc, _ = big_store
    chunks, policy, limit = _chunks(callers), svc.policy, svc.settings.matching.max_fanout

    def run() -> list[tuple]:
        with svc.store.read() as view:
            return view.prober.decide_many([(None, [], [normalize_phone(p, None, policy)], False) for p in next(chunks)],
                                           limit)

    decisions = benchmark.pedantic(run, rounds=15, warmup_rounds=1)
    assert decisions and all(d.outcome for d in decisions)  # every caller found
    benchmark.extra_info["lookups_per_s"] = round(len(decisions) / benchmark.stats.stats.median)


@pytest.mark.benchmark(group="batch-1M")
def test_baseline_lmdb_floor(benchmark, big_store: tuple[Service, Path], callers: list[str]) -> None:  # noqa: ANN001
    svc, _ = big_store
    chunks, key = _chunks(callers), svc.store.hasher.key
    ix, records = svc.store.ix[Kind.PHONE], svc.store.db["records"]

    def run() -> int:
        found = 0
        with svc.store.env.begin() as txn, txn.cursor(db=ix) as cur:
            get = txn.get
            for p in next(chunks):
                if cur.set_key(key(3, p)) and get(cur.value(), None, records) is not None:
                    found += 1
        return found

    found = benchmark.pedantic(run, rounds=15, warmup_rounds=1)
    assert found == min(BATCH, len(callers))
    benchmark.extra_info["lookups_per_s"] = round(found / benchmark.stats.stats.median)
