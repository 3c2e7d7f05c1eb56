"""Micro benchmarks, each beside the baseline it is judged against (measured in the same run).

Read the table as ratios within one group: e.g. `resolve-warm-e164` against `baseline-lmdb-get` says what a
whole in-process Resolve costs in LMDB lookups. Run: `make bench`.
"""

from __future__ import annotations

import importlib
import itertools
import random

import phonenumbers
import pytest

from bench.conftest import N, phone
from resolver import _keys_py
from resolver.identifiers import RawIdentifiers
from resolver.resolve import ResolveInput
from resolver.service import Service
from resolver.upsert import UpsertInput

_keys_c = importlib.import_module("resolver._keys_c")


@pytest.mark.benchmark(group="hash")
@pytest.mark.parametrize("impl", [_keys_c, _keys_py], ids=["compiled", "pure"])
@pytest.mark.parametrize("alg,secret", [("xxh3-128", None), ("blake2b", b"k" * 32)], ids=["xxh3", "blake2b"])
def test_key_hashing(benchmark, impl, alg, secret) -> None:  # noqa: ANN001
    h = impl.KeyHasher(alg, secret)
    benchmark(h.key, 3, "+16502530000")


@pytest.mark.benchmark(group="phone")
def test_baseline_phonenumbers_parse_validate_format(benchmark) -> None:  # noqa: ANN001
    def run() -> str:
        p = phonenumbers.parse("(650) 253-0000", "US")
        assert phonenumbers.is_valid_number(p)
        return phonenumbers.format_number(p, phonenumbers.PhoneNumberFormat.E164)

    benchmark(run)


@pytest.mark.benchmark(group="phone")
def test_normalize_phone_national(benchmark) -> None:  # noqa: ANN001
    from resolver.normalize import normalize_phone

    benchmark(normalize_phone, "(650) 253-0000", "US")


@pytest.mark.benchmark(group="resolve")
def test_baseline_lmdb_get(benchmark, service: Service) -> None:  # noqa: ANN001
    env, db = service.store.env, service.store.db["records"]
    keys = []
    with env.begin() as txn, txn.cursor(db=db) as cur:
        keys = [k for k, _ in itertools.islice(cur, 1000)]
    it = itertools.cycle(keys)

    def get() -> bytes | None:
        with env.begin() as txn:
            return txn.get(next(it), db=db)

    benchmark(get)


@pytest.mark.benchmark(group="resolve")
@pytest.mark.parametrize("form", ["e164", "national"])
def test_resolve_in_process(benchmark, service: Service, form: str) -> None:  # noqa: ANN001
    rng = random.Random(7)
    picks = [rng.randrange(N) for _ in range(1000)]
    reqs = itertools.cycle(
        [ResolveInput(RawIdentifiers(phones=(phone(i) if form == "e164" else phone(i)[2:],))) for i in picks]
    )

    def run() -> str:
        return service.resolve(next(reqs)).outcome

    assert benchmark(run) == "MATCHED"


@pytest.mark.benchmark(group="upsert")
def test_upsert_synced(benchmark, service: Service) -> None:  # noqa: ANN001
    counter = itertools.count()

    def run() -> str:
        i = next(counter)
        return service.upsert(UpsertInput(f"bu-{i}", RawIdentifiers(f"BU-{i}"), {"name": f"n{i}"})).action

    assert benchmark.pedantic(run, rounds=200, iterations=1) == "CREATED"


@pytest.mark.benchmark(group="upsert")
def test_ledger_replay(benchmark, service: Service) -> None:  # noqa: ANN001
    inp = UpsertInput("replay-me", RawIdentifiers("RP-1"), {"name": "r"})
    service.upsert(inp)
    result = benchmark(service.upsert, inp)
    assert result.replayed
