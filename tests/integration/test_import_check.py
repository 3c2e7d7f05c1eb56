"""`resolver import` and `resolver check` on a real LMDB store, through the real CLI where the process matters
(exit codes, the progress bar on a terminal, worker processes) and in-process elsewhere."""

from __future__ import annotations

import csv
import fcntl
import json
import os
import pty
import re
import struct
import subprocess
import sys
import termios
import textwrap
import threading
from collections.abc import Iterator
from contextlib import closing
from dataclasses import replace
from pathlib import Path
from typing import Any

import phonenumbers
import pytest
from google.protobuf import json_format
from phonenumbers import PhoneNumberFormat, PhoneNumberType

from resolver.api.servicer import upsert_input
from resolver.bootstrap import build_service
from resolver.check import find_problems
from resolver.cli import build_parser
from resolver.config import Settings, load_settings
from resolver.identifiers import RawIdentifiers
from resolver.importer import run_import
from resolver.importer.csvrows import split_phones
from resolver.importer.jsonl import JsonParser, simple_input
from resolver.importer.rows import RowProblem
from resolver.normalize import Kind, mask
from resolver.records import Record, encode_json, held_key
from resolver.resolve import ResolveInput
from resolver.store import Store, uuid_bytes
from resolver.upsert import UpsertInput
from resolver.v1 import resolver_pb2 as pb
from tests.integration.helpers import phone

SUMMARY = re.compile(
    r"^import: (?P<rows>\d+) rows, (?P<created>\d+) created, (?P<updated>\d+) updated, (?P<unchanged>\d+) unchanged, "
    r"(?P<replayed>\d+) replayed, (?P<rejected>\d+) rejected in [\d.]+s \(\d+ rows/s\)$",
    re.MULTILINE,
)
CHECK = re.compile(r"^check: .*: (?P<records>\d+) records, (?P<aliases>\d+) aliases; index entries: "
                   r"external_id (?P<external_id>\d+), email (?P<email>\d+), phone (?P<phone>\d+); "
                   r"(?P<problems>\d+) problem\(s\)", re.MULTILINE)

BLUEPRINT = textwrap.dedent(
    """
    version = 1
    [storage]
    map_size_mb = 256
    [matching]
    default_region = "US"
    [attributes]
    name = { type = "string" }
    age = { type = "integer" }
    balance = { type = "number" }
    vip = { type = "boolean" }
    since = { type = "date", input_formats = ["%m/%d/%Y"] }
    status = { type = "string", enum = ["Active", "Churned"], owner = "SALESFORCE" }
    """
)


# -- helpers ---------------------------------------------------------------------------------------------


def resolver_cli(*args: str | Path, cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "resolver", *map(str, args)], cwd=cwd, stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, timeout=timeout)


def resolver_on_a_terminal(*args: str | Path, cwd: Path, timeout: float = 120) -> tuple[subprocess.CompletedProcess[str], str]:
    """The CLI with stderr on a pseudo-terminal, as in an operator's shell: (result, what the terminal showed)."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 160, 0, 0))
    shown: list[bytes] = []

    def drain() -> None:
        while True:
            try:
                data = os.read(master, 1 << 16)
            except OSError:  # EIO: every writer has closed the terminal
                return
            if not data:
                return
            shown.append(data)

    reader = threading.Thread(target=drain)
    reader.start()
    try:
        result = subprocess.run([sys.executable, "-m", "resolver", *map(str, args)], cwd=cwd, stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=slave, text=True, timeout=timeout)
    finally:
        os.close(slave)
        reader.join(timeout=30)
        os.close(master)
    return result, b"".join(shown).decode("utf-8", "replace")


def summary(stdout: str) -> dict[str, int]:
    m = SUMMARY.search(stdout)
    assert m, f"no summary line in {stdout!r}"
    return {k: int(v) for k, v in m.groupdict().items()}


def check_summary(stdout: str) -> dict[str, int]:
    m = CHECK.search(stdout)
    assert m, f"no check summary in {stdout!r}"
    return {k: int(v) for k, v in m.groupdict().items()}


def run_import_in_process(settings: Settings, *argv: str | Path) -> int:
    """`resolver import ARGV --no-progress` in this process, on `settings` (the CLI's own argument parser)."""
    return run_import(settings, build_parser().parse_args(["import", *map(str, argv), "--no-progress"]))


def write_jsonl(path: Path, rows: list[dict[str, Any] | str]) -> Path:
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write((row if isinstance(row, str) else json.dumps(row)) + "\n")
    return path


def rejects_of(path: Path) -> list[dict[str, Any]]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


@pytest.fixture
def blueprint_text() -> str:
    """This module's blueprint (typed attributes for CSV coercion): overrides conftest's, so that `blueprint_file`
    holds it and `settings` reads it."""
    return BLUEPRINT


def records_by_external_id(settings: Settings) -> dict[str | None, Record]:
    with closing(Store(settings)) as store, store.read() as view:
        return {r.external_id: r for r in view.iter_records()}


# -- a deterministic population --------------------------------------------------------------------------

REGIONS = ("US", "GB", "DE", "FR", "IN", "BR", "AU", "JP", "ES", "IT", "CA", "MX")


def valid_mobiles(n: int) -> list[tuple[str, phonenumbers.PhoneNumber]]:
    """`n` distinct valid mobile numbers, round-robin over REGIONS: each region's example number with its
    last five digits varied (7919 is prime to 10^5, so they never repeat), kept only if is_valid_number."""
    per_region = n // len(REGIONS) + 1
    pools = []
    for region in REGIONS:
        example = phonenumbers.example_number_for_type(region, PhoneNumberType.MOBILE)
        stem = str(example.national_number)[:-5]
        pool: list[tuple[str, phonenumbers.PhoneNumber]] = []
        for i in range(100_000):
            number = phonenumbers.PhoneNumber(country_code=example.country_code,
                                              national_number=int(f"{stem}{(i * 7919) % 100_000:05d}"))
            if phonenumbers.is_valid_number(number):
                pool.append((region, number))
                if len(pool) == per_region:
                    break
        assert len(pool) == per_region, region
        pools.append(pool)
    return [number for group in zip(*pools, strict=True) for number in group][:n]


def customers(n: int) -> Iterator[dict[str, Any]]:
    """Unique external_ids; an email for 24 in 25; one phone each, every 20th sharing its neighbour's (5%);
    a third of the phones in national form with the row's default_region, the rest international."""
    mobiles = iter(valid_mobiles(n - n // 20))
    region, number = next(mobiles)
    for i in range(n):
        if i % 20 != 19 and i:
            region, number = next(mobiles)
        row: dict[str, Any] = {
            "identifiers": {"externalId": f"CRM-{i:07d}"},
            "attributes": {"name": f"Customer {i}", "tier": ("gold", "silver", "bronze")[i % 3], "score": i % 1000},
        }
        if i % 25:
            row["identifiers"]["emails"] = [f"Customer.{i}@Example{i % 97}.com"]
        if i % 3 == 0:
            row["identifiers"]["phones"] = [phonenumbers.format_number(number, PhoneNumberFormat.NATIONAL)]
            row["defaultRegion"] = region
        else:
            row["identifiers"]["phones"] = [phonenumbers.format_number(number, PhoneNumberFormat.INTERNATIONAL)]
        yield row


# -- 100,000 customers -----------------------------------------------------------------------------------


@pytest.mark.process
@pytest.mark.slow
def test_import_100k_customers_with_a_progress_bar_then_check_then_reimport_changes_nothing(tmp_path: Path) -> None:
    n = 100_000
    source = tmp_path / "customers.jsonl"
    with open(source, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(row) + "\n" for row in customers(n))
    data = tmp_path / "data"

    result, terminal = resolver_on_a_terminal("import", source, "--data-dir", data, cwd=tmp_path)
    assert result.returncode == 0, terminal
    assert summary(result.stdout) == {"rows": n, "created": n, "updated": 0, "unchanged": 0, "replayed": 0, "rejected": 0}
    assert f"{n}/{n}" in terminal and "rows/s" in terminal and "100%" in terminal  # tqdm's bar, finished
    assert not (tmp_path / "customers.jsonl.rejected.jsonl").exists()

    check = resolver_cli("check", "--data-dir", data, cwd=tmp_path)
    assert check.returncode == 0, check.stdout + check.stderr
    # every customer has one phone (5% of them share it) and 24 in 25 an email
    assert check_summary(check.stdout) == {"records": n, "aliases": 0, "external_id": n, "email": n - n // 25,
                                           "phone": n, "problems": 0}

    service = build_service(load_settings(None, data_dir=str(data)))
    try:
        rows = list(customers(20))  # the same first rows: customer 19 shares customer 18's phone
        r = service.resolve(ResolveInput(RawIdentifiers(phones=tuple(rows[19]["identifiers"]["phones"])),
                                         default_region=rows[19].get("defaultRegion", "")))
        assert r.outcome == "AMBIGUOUS" and len(r.candidates) == 2
        r = service.resolve(ResolveInput(RawIdentifiers(external_id=rows[0]["identifiers"]["externalId"])))
        assert r.outcome == "MATCHED" and r.attributes == {"name": "Customer 0", "tier": "gold", "score": 0}
    finally:
        service.close()

    again = resolver_cli("import", source, "--data-dir", data, "--no-progress", cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    counts = summary(again.stdout)
    assert counts["rows"] == n and counts["created"] == counts["updated"] == counts["rejected"] == 0
    assert counts["unchanged"] + counts["replayed"] == n
    assert again.stderr == ""  # --no-progress: no bar

    check = resolver_cli("check", "--data-dir", data, cwd=tmp_path)
    assert check.returncode == 0, check.stdout
    assert check_summary(check.stdout)["records"] == n


# -- the progress bar ------------------------------------------------------------------------------------


@pytest.mark.process
def test_the_progress_bar_shows_on_a_terminal_unless_no_progress(tmp_path: Path) -> None:
    source = write_jsonl(tmp_path / "few.jsonl", [{"identifiers": {"externalId": f"P-{i}", "phones": [phone(i)]}}
                                                   for i in range(30)])
    result, terminal = resolver_on_a_terminal("import", source, "--data-dir", tmp_path / "data", cwd=tmp_path)
    assert result.returncode == 0 and summary(result.stdout)["created"] == 30
    assert "30/30" in terminal and "rows/s" in terminal

    result, terminal = resolver_on_a_terminal("import", source, "--data-dir", tmp_path / "data", "--no-progress",
                                              cwd=tmp_path)
    assert result.returncode == 0 and summary(result.stdout)["replayed"] == 30
    assert terminal == ""


# -- JSON lines ------------------------------------------------------------------------------------------


@pytest.mark.process
def test_rejected_rows_go_to_the_rejects_file_with_reasons_and_the_rest_commits(tmp_path: Path, blueprint_file: Path) -> None:
    missing = "3f1c6f0e-1d3a-4a53-9a70-0c0a3ea52f00"
    rows: list[dict[str, Any] | str] = [
        {"identifiers": {"externalId": "G-1", "phones": [phone(1)]}, "attributes": {"name": "Ann", "age": 40}},
        {"identifiers": {"externalId": "B-1", "phones": ["12345", phone(2)]}},  # invalid phone
        {"identifiers": {"externalId": "B-2"}, "attributes": {"age": "forty", "balance": True}},  # type mismatches
        {"customerUuid": missing, "attributes": {"name": "Nobody"}},  # NOT_FOUND, only known when applied
        "",
        "{not json",
        {"identifiers": {"externalId": "B-3"}, "attributes": {"status": "Active"}},  # owned by SALESFORCE
        {"identifiers": {"externalId": "G-2", "emails": ["bob@example.com"]}, "attributes": {"vip": True}},
        {"identifiers": {"externalId": "G-1"}, "attributes": {"age": 41}},  # updates G-1 in the same batch
    ]
    source = write_jsonl(tmp_path / "mixed.jsonl", rows)
    lines = source.read_text(encoding="utf-8").splitlines()
    data = tmp_path / "data"

    result = resolver_cli("import", source, "--config", blueprint_file, "--data-dir", data, cwd=tmp_path)
    assert result.returncode == 1, result.stderr
    assert summary(result.stdout) == {"rows": 8, "created": 2, "updated": 1, "unchanged": 0, "replayed": 0, "rejected": 5}
    assert "5 row(s) rejected: see" in result.stdout

    rejected = rejects_of(tmp_path / "mixed.jsonl.rejected.jsonl")
    assert [r["line"] for r in rejected] == [2, 3, 4, 6, 7]
    assert [r["input"] for r in rejected] == [lines[1], lines[2], lines[3], lines[5], lines[6]]  # intact, to fix
    by_line = {r["line"]: [(x["field"], x["reason"], x["code"]) for x in r["reasons"]] for r in rejected}
    assert by_line[2] == [("identifiers.phones[0]", "INVALID_PHONE", "INVALID_ARGUMENT")]
    assert by_line[3] == [("attributes.age", "INVALID_ATTRIBUTE", "INVALID_ARGUMENT"),
                          ("attributes.balance", "INVALID_ATTRIBUTE", "INVALID_ARGUMENT")]
    assert by_line[4] == [("customer_uuid", "CUSTOMER_NOT_FOUND", "NOT_FOUND")]
    assert by_line[6][0][1:] == ("INVALID_JSON", "INVALID_ARGUMENT")
    assert by_line[7] == [("attributes.status", "FIELD_OWNED_BY_OTHER_SOURCE", "PERMISSION_DENIED")]
    assert all(x["description"] for r in rejected for x in r["reasons"])

    records = records_by_external_id(load_settings(blueprint_file, data_dir=str(data)))
    assert sorted(records, key=str) == ["G-1", "G-2"]
    assert records["G-1"].attributes == {"name": "Ann", "age": 41} and records["G-1"].version == 2
    assert records["G-2"].attributes == {"vip": True}
    check = resolver_cli("check", "--config", blueprint_file, "--data-dir", data, cwd=tmp_path)
    assert check.returncode == 0, check.stdout  # the rolled-back rows left nothing behind

    # the source system named on the command line makes line 7 acceptable: a different request, a new key
    fixed = resolver_cli("import", source, "--config", blueprint_file, "--data-dir", data, "--source-system", "SALESFORCE",
                         "--rejects", tmp_path / "second.jsonl", cwd=tmp_path)
    assert fixed.returncode == 1
    assert [r["line"] for r in rejects_of(tmp_path / "second.jsonl")] == [2, 3, 4, 6]


def test_reimport_replays_phone_only_rows_and_equal_rows_are_still_separate_writes(tmp_path: Path,
                                                                                  settings: Settings) -> None:
    rows: list[dict[str, Any] | str] = [
        {"identifiers": {"phones": [phone(7)]}, "attributes": {"name": "Walk-in"}},  # a phone never selects
        {"identifiers": {"externalId": "T-1"}, "attributes": {"name": "A"}},
        {"identifiers": {"externalId": "T-1"}, "attributes": {"name": "B"}},
        {"identifiers": {"externalId": "T-1"}, "attributes": {"name": "A"}},  # equal to line 2: still applied
    ]
    source = write_jsonl(settings.server.data_dir.parent / "aba.jsonl", rows)
    assert run_import_in_process(settings, source) == 0
    records = records_by_external_id(settings)
    assert records["T-1"].attributes == {"name": "A"} and records["T-1"].version == 3
    assert run_import_in_process(settings, source) == 0
    assert len(records_by_external_id(settings)) == 2  # the phone-only row replayed: no second walk-in


def test_jsonl_rows_take_defaults_from_the_command_line(tmp_path: Path, settings: Settings,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    source = write_jsonl(tmp_path / "gb.jsonl", [
        {"identifiers": {"externalId": "R-1", "phones": ["020 7946 0018"]}},  # national GB form
        {"identifiers": {"externalId": "R-2", "phones": ["(650) 253-0001"]}, "defaultRegion": "US"},
    ])
    assert run_import_in_process(settings, source, "--default-region", "GB", "--source-system", "SALESFORCE") == 0
    assert summary(capsys.readouterr().out)["created"] == 2
    records = records_by_external_id(settings)
    assert records["R-1"].phones == ["+442079460018"] and records["R-2"].phones == ["+16502530001"]
    with closing(Store(settings)) as store, store.read() as view:
        sources = {c["source_system"] for c in view.iter_changes()}
    assert sources == {"SALESFORCE"}


FAST_LINES = [
    '{"identifiers": {"externalId": "A", "emails": ["a@example.com"], "phones": ["+16502530001"]},'
    ' "attributes": {"n": 1, "f": 1.5, "b": true, "s": "x", "z": null, "big": -9007199254740992}}',
    '{"idempotency_key": "k", "customer_uuid": "3f1c6f0e-1d3a-4a53-9a70-0c0a3ea52f00", "source_system": "CRM",'
    ' "expected_version": 3, "remove_identifiers": {"external_id": "B", "phones": []}, "default_region": "gb"}',
    '{"idempotencyKey": "k", "removeIdentifiers": {"emails": ["x@example.com"]}, "expectedVersion": 0}',
    '{"identifiers": {}, "attributes": {}}',
    "{}",
    '{"identifiers": {"externalId": "tab\\there"}}',
]
SLOW_LINES = [  # the official parser decides: same result or a wording of the error
    '{"expectedVersion": "3"}',
    '{"expectedVersion": 3.0}',
    '{"attributes": {"list": [1, 2]}}',
    '{"attributes": {"huge": 12345678901234567890}}',
    '{"identifiers": {"externalId": "\\u00e9t\\u00e9"}}',
    '{"idempotencyKey": null}',
    '{"identifiers": null}',
    '{"identifiers": {"externalId": "A", "external_id": "B"}}',
]
BAD_LINES = [
    '{"phones": ["+16502530001"]}',
    "[1, 2]",
    '{"attributes": {"a": 1, "a": 2}}',
    '{"identifiers": {"phones": [null]}}',
    '{"expectedVersion": -1}',
    '{"identifiers": {"externalId": "\\ud800"}}',
]


def canonical(inp: UpsertInput) -> str:
    """repr (1.0 is not 1 there) with the attributes sorted (a Struct's order is not defined)."""
    return repr(replace(inp, attributes=dict(sorted(inp.attributes.items()))))


@pytest.mark.parametrize("line", FAST_LINES)
def test_the_json_fast_path_builds_what_the_official_parser_builds(line: str) -> None:
    fast = simple_input(line)
    assert fast is not None
    assert canonical(fast) == canonical(upsert_input(json_format.Parse(line, pb.UpsertRequest())))


@pytest.mark.parametrize("line", SLOW_LINES)
def test_unusual_json_takes_the_official_parser(line: str) -> None:
    assert simple_input(line) is None
    parse = JsonParser()
    official = upsert_input(json_format.Parse(line, pb.UpsertRequest()))
    assert canonical(parse(1, line)) == canonical(official)


@pytest.mark.parametrize("line", BAD_LINES)
def test_invalid_json_rows_are_refused_with_the_parsers_reason(line: str) -> None:
    assert simple_input(line) is None
    with pytest.raises(RowProblem) as e:
        JsonParser()(1, line)
    assert e.value.reasons[0]["reason"] == "INVALID_JSON" and "proto3 JSON" in e.value.reasons[0]["description"]


@pytest.mark.process
def test_a_large_file_is_prepared_by_workers_and_applied_in_file_order(tmp_path: Path) -> None:
    # past the size where the importer forks workers; the last write to each customer must win
    rows: list[dict[str, Any] | str] = [
        {"identifiers": {"externalId": f"W-{i % 50}"}, "attributes": {"seq": i}} for i in range(6000)
    ]
    source = write_jsonl(tmp_path / "ordered.jsonl", rows)
    result = resolver_cli("import", source, "--data-dir", tmp_path / "data", "--batch-size", "700", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert summary(result.stdout) == {"rows": 6000, "created": 50, "updated": 5950, "unchanged": 0, "replayed": 0,
                                      "rejected": 0}
    records = records_by_external_id(load_settings(None, data_dir=str(tmp_path / "data")))
    assert {ext: r.attributes["seq"] for ext, r in records.items()} == {f"W-{i}": 5950 + i for i in range(50)}


# -- CSV -------------------------------------------------------------------------------------------------


def write_csv(path: Path, header: list[str], rows: list[list[str]]) -> Path:
    with open(path, "w", encoding="utf-8", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return path


def test_csv_import_coerces_attributes_by_the_blueprint_and_splits_multi_valued_cells(
        tmp_path: Path, settings: Settings, capsys: pytest.CaptureFixture[str]) -> None:
    phones = f"{phone(1)}|(650) 253-0002;sip:+16502530003@carrier.example;user=phone"
    source = write_csv(tmp_path / "crm.csv", ["external_id", "emails", "phone", "name", "age", "balance", "vip", "since"], [
        ["C-1", "a@example.com; A2@Example.com", phones, " Ann ", "42", "1234.50", "yes", "12/31/1999"],
        ["C-2", "", phone(4), "Bob", "", "-7", "0", ""],  # empty cells: absent
        ["C-3", "c@example.com", "", "Cy", "forty", "", "maybe", ""],  # refused: not an integer, not a boolean
        ["C-4", "d@example.com", "", "Di", "7", "1e3", "TRUE", "2001-02-03", "an extra cell"],
        ["", "", "", "", "", "", "", ""],  # blank: skipped
    ])
    assert run_import_in_process(settings, source) == 1
    assert summary(capsys.readouterr().out) == {"rows": 4, "created": 2, "updated": 0, "unchanged": 0, "replayed": 0,
                                                "rejected": 2}
    records = records_by_external_id(settings)
    assert records["C-1"].emails == ["a@example.com", "a2@example.com"]
    assert records["C-1"].phones == [phone(1), phone(2), phone(3)]
    assert records["C-1"].attributes == {"name": "Ann", "age": 42, "balance": 1234.5, "vip": True, "since": "1999-12-31"}
    assert type(records["C-1"].attributes["age"]) is int
    assert records["C-2"].attributes == {"name": "Bob", "balance": -7, "vip": False}
    rejected = {r["line"]: r for r in rejects_of(tmp_path / "crm.csv.rejected.jsonl")}
    assert sorted(rejected) == [4, 5]
    assert [x["field"] for x in rejected[4]["reasons"]] == ["attributes.age", "attributes.vip"]
    assert rejected[4]["input"] == {"external_id": "C-3", "emails": "c@example.com", "phone": "", "name": "Cy",
                                    "age": "forty", "balance": "", "vip": "maybe", "since": ""}
    assert rejected[5]["reasons"][0]["reason"] == "BAD_ROW_SHAPE"


def test_csv_in_an_open_schema_keeps_text(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    settings = load_settings(None, data_dir=str(tmp_path / "data"))
    source = write_csv(tmp_path / "open.csv", ["Email", "score", "note"], [["o@example.com", "10", "x;y"]])
    assert run_import_in_process(settings, source) == 0
    (record,) = records_by_external_id(settings).values()
    assert record.emails == ["o@example.com"] and record.attributes == {"score": "10", "note": "x;y"}


@pytest.mark.parametrize(("header", "problem"), [
    (["external_id", "shoe_size"], "'shoe_size': unknown attribute"),
    (["name", "age"], "no identifier column"),
    (["external_id", "name", "name"], "'name' appears twice"),
    (["external_id", "email", "EMAIL"], "'EMAIL' appears twice"),
])
def test_a_bad_csv_header_is_a_file_error(tmp_path: Path, settings: Settings, header: list[str], problem: str,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    source = write_csv(tmp_path / "bad.csv", header, [["x"] * len(header)])
    assert run_import_in_process(settings, source) == 2
    err = capsys.readouterr().err
    assert "bad CSV header" in err and problem in err
    assert not settings.server.data_dir.exists()  # nothing was opened, let alone written


def test_a_csv_row_that_is_not_utf8_is_refused_alone(tmp_path: Path, settings: Settings,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    source = tmp_path / "latin1.csv"
    source.write_bytes(b"external_id,name\nU-1,Ann\nU-2,Ren\xe9e\nU-3,Cy\n")
    assert run_import_in_process(settings, source) == 1
    assert summary(capsys.readouterr().out)["created"] == 2
    (rejected,) = rejects_of(tmp_path / "latin1.csv.rejected.jsonl")
    assert rejected["line"] == 3 and rejected["reasons"][0]["reason"] == "INVALID_ENCODING"
    assert rejected["input"] == {"external_id": "U-2", "name": "Ren\ufffde"}
    assert sorted(records_by_external_id(settings), key=str) == ["U-1", "U-3"]


def test_an_unreadable_csv_stops_with_exit_2_after_applying_the_rows_before(tmp_path: Path, settings: Settings,
                                                                          capsys: pytest.CaptureFixture[str]) -> None:
    source = tmp_path / "huge.csv"
    source.write_text(f"external_id,name\nH-1,Ann\nH-2,Bob\nH-3,{'x' * 200_000}\nH-4,Di\n", encoding="utf-8")
    # into an empty store: an initial load, all or nothing
    assert run_import_in_process(settings, source) == 2
    out, err = capsys.readouterr()
    assert "line 4: cannot read the CSV: field larger than field limit" in err and "nothing was committed" in err
    assert summary(out)["created"] == 0 and records_by_external_id(settings) == {}
    # batch by batch: the rows before the unreadable part are applied
    assert run_import_in_process(settings, source, "--commit-every-batch") == 2
    out, err = capsys.readouterr()
    assert "line 4: cannot read the CSV: field larger than field limit" in err
    assert summary(out)["created"] == 2
    assert sorted(records_by_external_id(settings), key=str) == ["H-1", "H-2"]


def test_phone_cells_split_on_separators_but_keep_uri_parameters() -> None:
    assert split_phones("+1 650 253 0001; +16502530002 | 650-253-0003") == ["+1 650 253 0001", "+16502530002",
                                                                              "650-253-0003"]
    assert split_phones("tel:+1-650-253-0001;ext=12;+16502530002") == ["tel:+1-650-253-0001;ext=12", "+16502530002"]
    assert split_phones("sip:+16502530001@host;user=phone|sips:+16502530002@h") == [
        "sip:+16502530001@host;user=phone", "sips:+16502530002@h"]


# -- file and option errors ------------------------------------------------------------------------------


@pytest.mark.process
def test_file_and_option_errors_exit_2(tmp_path: Path) -> None:
    (tmp_path / "rows.txt").write_text("{}\n")
    r = resolver_cli("import", "rows.txt", "--data-dir", "data", cwd=tmp_path)
    assert r.returncode == 2 and "--format jsonl or --format csv" in r.stderr
    r = resolver_cli("import", "missing.jsonl", "--data-dir", "data", cwd=tmp_path)
    assert r.returncode == 2 and "missing.jsonl: no such file" in r.stderr
    r = resolver_cli("import", "rows.txt", "--format", "jsonl", "--default-region", "XX", "--data-dir", "data", cwd=tmp_path)
    assert r.returncode == 2 and "--default-region" in r.stderr
    assert not (tmp_path / "data").exists()


# -- check -----------------------------------------------------------------------------------------------


@pytest.fixture
def populated(tmp_path: Path, settings: Settings) -> Settings:
    source = write_jsonl(tmp_path / "small.jsonl", [
        {"identifiers": {"externalId": f"K-{i}", "emails": [f"k{i}@example.com"], "phones": [phone(i), phone(100)]}}
        for i in range(5)
    ])
    assert run_import_in_process(settings, source) == 0
    return settings


def damage(settings: Settings, fn: Any) -> None:
    with closing(Store(settings)) as store, store.env.begin(write=True) as txn:
        fn(store, txn)


@pytest.mark.process
def test_check_fails_when_an_index_entry_is_missing(tmp_path: Path, populated: Settings, blueprint_file: Path) -> None:
    records = records_by_external_id(populated)
    uid = uuid_bytes(records["K-3"].uuid)
    damage(populated, lambda store, txn: txn.delete(store.hasher.key(Kind.PHONE, phone(3)), uid, db=store.ix[Kind.PHONE]))
    r = resolver_cli("check", "--config", blueprint_file, "--data-dir", populated.server.data_dir, cwd=tmp_path)
    assert r.returncode == 1
    assert f"customer {records['K-3'].uuid}: phone {mask(Kind.PHONE, phone(3))} is not in ix_phone" in r.stdout
    assert phone(3) not in r.stdout + r.stderr  # masked, never raw
    assert check_summary(r.stdout)["problems"] == 1 and "check: FAILED" in r.stdout


@pytest.mark.process
def test_check_fails_when_an_entry_points_to_a_customer_without_the_identifier(tmp_path: Path, populated: Settings,
                                                                               blueprint_file: Path) -> None:
    uid = uuid_bytes(records_by_external_id(populated)["K-1"].uuid)
    damage(populated, lambda store, txn: txn.put(store.hasher.key(Kind.PHONE, phone(99)), uid, db=store.ix[Kind.PHONE]))
    r = resolver_cli("check", "--config", blueprint_file, "--data-dir", populated.server.data_dir, cwd=tmp_path)
    assert r.returncode == 1
    assert re.search(r"ix_phone: entry [0-9a-f]{12}… -> customer [0-9a-f-]{36}: the customer holds no phone with that key",
                     r.stdout), r.stdout
    assert check_summary(r.stdout)["problems"] == 1


def test_check_passes_on_a_consistent_store_with_merges(populated: Settings) -> None:
    records = records_by_external_id(populated)
    service = build_service(populated)
    try:
        service.merge("m-1", records["K-0"].uuid, [records["K-1"].uuid])
        service.merge("m-2", records["K-2"].uuid, [records["K-0"].uuid])  # K-1 -> K-0 -> K-2: a chain of aliases
        with service.store.read() as view:
            assert view.count("aliases") == 2
            assert find_problems(view) == []
    finally:
        service.close()


def test_find_problems_names_each_kind_of_damage(populated: Settings) -> None:
    records = records_by_external_id(populated)
    k0, k1, k2 = (uuid_bytes(records[f"K-{i}"].uuid) for i in range(3))
    ghost = uuid_bytes("00000000-0000-4000-8000-000000000001")

    def wreck(store: Store, txn: Any) -> None:
        twin = records["K-2"].copy()
        twin.external_id = "K-1"  # K-2 now claims K-1's external_id too (and K-2's own entry is stale)
        txn.put(k2, twin.encode(), db=store.db["records"])
        txn.put(store.hasher.key(Kind.EMAIL, "k4@example.com"), ghost, db=store.ix[Kind.EMAIL])
        txn.put(ghost, k0, db=store.db["aliases"])  # fine: K-0 exists
        txn.put(uuid_bytes("00000000-0000-4000-8000-000000000002"), ghost, db=store.db["aliases"])
        txn.put(k1, k1, db=store.db["aliases"])  # a loop, and K-1 still has its record
        txn.put(uuid_bytes("00000000-0000-4000-8000-000000000003"), b"not json", db=store.db["records"])

    damage(populated, wreck)
    with closing(Store(populated)) as store, store.read() as view:
        problems = find_problems(view)
    text = "\n".join(problems)
    assert "record 00000000-0000-4000-8000-000000000003: cannot be decoded" in text
    assert f"customer {records['K-2'].uuid}: external_id {mask(Kind.EXTERNAL_ID, 'K-1')} is not in ix_external" in text
    assert re.search(r"external_id \S+ is held by 2 customers \(.*\); it must be unique", text)
    assert re.search(r"ix_external: entry \w+… -> customer .*: the customer holds no external_id with that key", text)
    assert "-> customer 00000000-0000-4000-8000-000000000001: no such record (an alias of" in text
    assert "alias 00000000-0000-4000-8000-000000000002 -> 00000000-0000-4000-8000-000000000001: leads to" not in text
    assert f"alias {records['K-1'].uuid} -> {records['K-1'].uuid}: the merged-away customer still has a record" in text
    assert f"alias {records['K-1'].uuid} -> {records['K-1'].uuid}: the alias chain loops" in text
    assert len(problems) == 7, text
    for i in range(5):
        assert phone(i) not in text and f"k{i}@example.com" not in text


def test_find_problems_reports_a_record_stored_under_another_uuid(populated: Settings) -> None:
    k3 = records_by_external_id(populated)["K-3"]
    stray = uuid_bytes("00000000-0000-4000-8000-000000000004")
    damage(populated, lambda store, txn: txn.put(stray, k3.encode(), db=store.db["records"]))
    with closing(Store(populated)) as store, store.read() as view:
        problems = find_problems(view)
    assert f"record 00000000-0000-4000-8000-000000000004: its uuid field says '{k3.uuid}'" in problems
    assert any(p.startswith("external_id ") and "is held by 2 customers" in p for p in problems)


@pytest.mark.process
def test_check_on_a_missing_data_dir_exits_2_and_creates_nothing(tmp_path: Path) -> None:
    r = resolver_cli("check", "--data-dir", tmp_path / "nowhere", cwd=tmp_path)
    assert r.returncode == 2
    assert "no resolver data here (data.mdb missing)" in r.stderr
    assert not (tmp_path / "nowhere").exists()


def test_find_problems_checks_provenance_and_tombstones(populated: Settings) -> None:
    records = records_by_external_id(populated)
    k0, k1 = records["K-0"], records["K-1"]
    ghost = uuid_bytes("00000000-0000-4000-8000-000000000005")

    def wreck(store: Store, txn: Any) -> None:
        orphan = k0.copy()
        orphan.held.pop(held_key(Kind.PHONE, orphan.phones[0]))  # a phone nobody holds
        orphan.held[held_key(Kind.EMAIL, "stray@example.com")] = {"upsert:": 1}  # a holding of nothing held
        txn.put(uuid_bytes(k0.uuid), orphan.encode(), db=store.db["records"])
        # K-1 deleted (tombstone) but its record still there; a deleted record's hash without a tombstone
        txn.put(uuid_bytes(k1.uuid), encode_json({"customer_uuid": k1.uuid, "source_system": "CRM",
                                                  "deleted_us": 1, "at_us": 2}), db=store.db["ev_tombs"])
        txn.put(store.hasher.key(Kind.EXTERNAL_ID, "gone"), ghost, db=store.db["ev_tomb_ext"])

    damage(populated, wreck)
    with closing(Store(populated)) as store, store.read() as view:
        problems = find_problems(view)
    text = "\n".join(problems)
    assert f"customer {k0.uuid}: phone {mask(Kind.PHONE, k0.phones[0])} has no holder" in text
    assert f"customer {k0.uuid}: a holder is recorded for email {mask(Kind.EMAIL, 'stray@example.com')}" in text
    assert f"customer {k1.uuid} is deleted (tombstone) but still has a record" in text
    assert "-> 00000000-0000-4000-8000-000000000005: no tombstone" in text
    assert len(problems) == 4, text
    assert k0.phones[0] not in text and "stray@example.com" not in text
