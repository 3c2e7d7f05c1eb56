"""Benchmark dataset: N customers as `resolver import` JSONL, plus the request mixes the load replays.

    python -m bench.dataset OUT_DIR [--customers 1000000] [--queries 100000] [--upserts 20000] [--seed 1]

Writes OUT_DIR/customers.jsonl (proto3-JSON UpsertRequest lines, source SALESFORCE), OUT_DIR/queries.jsonl
(the call-setup lookup mix: ResolveRequest lines), OUT_DIR/upserts.jsonl (the crm-sync mix: UpsertRequest
lines without idempotency keys) and OUT_DIR/dataset.json (the counts). The server and the PostgreSQL peer
load the same customers and replay the same queries.

Customers live in 25 regions; every phone number is one `phonenumbers.is_valid_number` accepts (example
numbers of the region with their last digits varied, each checked), written in mixed notations (E.164,
international, national with the row's default region, tel: and sip: URIs). About 5% of phones are shared
with another customer (a household line) and about 1% of emails. The lookup mix: 70% ANI only, 20%
external_id + ANI, 10% email + ANI; ~15% of callers are unknown (numbers and ids nobody holds).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
import unicodedata
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import phonenumbers
from phonenumbers import PhoneNumberFormat, PhoneNumberType

REGIONS = ("US", "CA", "GB", "FR", "DE", "ES", "IT", "NL", "BE", "CH", "AT", "SE", "NO", "DK", "IE",
           "AU", "NZ", "JP", "IN", "BR", "MX", "SG", "ZA", "PL", "PT")
# rough share of a contact center's customers per region (US-heavy)
WEIGHTS = (30, 6, 10, 6, 6, 4, 4, 3, 2, 2, 2, 2, 1, 1, 2, 4, 1, 3, 4, 3, 2, 1, 1, 2, 1)
SHARED_PHONE = 0.05
SHARED_EMAIL = 0.01
UNKNOWN = 0.15
BLOCKED = {"+18005550100"}  # the example blueprint's blocked value
FIRST = ("Ana", "Ben", "Chloé", "Dev", "Emma", "Femi", "Gita", "Hugo", "Ines", "Jon", "Kai", "Lena", "Mia", "Noor",
         "Omar", "Pia", "Quinn", "Ravi", "Sara", "Tom", "Uma", "Vik", "Wen", "Xavi", "Yuki", "Zoe")
LAST = ("Smith", "García", "Müller", "Rossi", "Dubois", "Tanaka", "Silva", "Kowalski", "Jensen", "Patel", "Nguyen",
        "Brown", "O'Neil", "van Dijk", "Andersson", "Costa", "Singh", "Murphy", "Lee", "Martin")
TIERS = ("bronze", "silver", "gold", "platinum")
LANGS = {"US": "en-US", "GB": "en-GB", "FR": "fr-FR", "DE": "de-DE", "ES": "es-ES", "IT": "it-IT", "JP": "ja-JP",
         "BR": "pt-BR", "MX": "es-MX", "PT": "pt-PT", "NL": "nl-NL", "PL": "pl-PL"}


class Phones:
    """Distinct valid numbers per region, drawn from the region's example numbers with digits varied."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.seen: set[str] = set()
        self.bases: dict[str, list[phonenumbers.PhoneNumber]] = {}
        for region in REGIONS:
            bases = [phonenumbers.example_number_for_type(region, t)
                     for t in (PhoneNumberType.MOBILE, PhoneNumberType.FIXED_LINE)]
            self.bases[region] = [b for b in bases if b is not None]

    def new(self, region: str) -> phonenumbers.PhoneNumber:
        """A valid number nobody has been given yet."""
        for _ in range(1000):
            base = self.rng.choice(self.bases[region])
            digits = str(base.national_number)
            vary = min(6, len(digits) - 3)
            national = digits[:-vary] + f"{self.rng.randrange(10 ** vary):0{vary}d}"
            num = phonenumbers.PhoneNumber(country_code=base.country_code, national_number=int(national))
            if base.italian_leading_zero:
                num.italian_leading_zero = True
            e164 = phonenumbers.format_number(num, PhoneNumberFormat.E164)
            if e164 not in self.seen and e164 not in BLOCKED and phonenumbers.is_valid_number(num):
                self.seen.add(e164)
                return num
        raise RuntimeError(f"cannot find a fresh valid number in {region}")


def notation(num: phonenumbers.PhoneNumber, rng: random.Random) -> tuple[str, bool]:
    """The number as a CRM or a carrier might write it; True if it is national (needs the region)."""
    e164 = phonenumbers.format_number(num, PhoneNumberFormat.E164)
    r = rng.random()
    if r < 0.35:
        return e164, False
    if r < 0.6:
        return phonenumbers.format_number(num, PhoneNumberFormat.INTERNATIONAL), False
    if r < 0.85:
        return phonenumbers.format_number(num, PhoneNumberFormat.NATIONAL), True
    if r < 0.93:
        return phonenumbers.format_number(num, PhoneNumberFormat.RFC3966), False
    return f"sip:{e164}@carrier.example;user=phone", False


def _phone_field(num: phonenumbers.PhoneNumber, region: str, rng: random.Random) -> tuple[str, str]:
    text, national = notation(num, rng)
    return text, region if national else ""


def generate(out: Path, customers: int, queries: int, upserts: int, seed: int = 1) -> dict[str, Any]:
    """Write the dataset files into `out`; return the counts."""
    rng = random.Random(seed)
    phones = Phones(rng)
    out.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    # what each customer holds, kept for the request mixes: (external_id, email, [(number, region)], region)
    held: list[tuple[str, str, list[tuple[phonenumbers.PhoneNumber, str]], str]] = []
    shared_phones = shared_emails = 0
    with (out / "customers.jsonl").open("w", encoding="utf-8") as f:
        for i in range(customers):
            region = rng.choices(REGIONS, WEIGHTS)[0]
            first, last = rng.choice(FIRST), rng.choice(LAST)
            ext = f"CRM-{i:09d}"
            if held and rng.random() < SHARED_EMAIL:
                email = held[rng.randrange(len(held))][1]
                shared_emails += 1
            else:
                local = unicodedata.normalize("NFKD", f"{first}.{last}.{i}").encode("ascii", "ignore").decode()
                email = f"{local}@example-{region.lower()}.com".replace("'", "").replace(" ", "")
                if rng.random() < 0.3:
                    email = email.title()  # CRMs keep whatever case the agent typed
            nums: list[tuple[phonenumbers.PhoneNumber, str]] = []
            for _ in range(1 if rng.random() < 0.7 else 2):
                if held and rng.random() < SHARED_PHONE:
                    other = held[rng.randrange(len(held))][2]
                    nums.append(other[0])
                    shared_phones += 1
                else:
                    nums.append((phones.new(region), region))
            texts, regions = zip(*(_phone_field(n, r, rng) for n, r in nums), strict=True)
            row: dict[str, Any] = {
                "idempotencyKey": f"bench-load-{i}",
                "identifiers": {"externalId": ext, "emails": [email], "phones": list(texts)},
                "attributes": {"name": f"{first} {last}", "status": rng.choice(("Active", "Active", "Churned")),
                               "tier": rng.choice(TIERS)},
                "sourceSystem": "SALESFORCE",
            }
            if region in LANGS:
                row["attributes"]["preferred_language"] = LANGS[region]
            row_region = next((r for r in regions if r), "")
            if any(r and r != row_region for r in regions):  # two national forms of different regions
                texts = tuple(phonenumbers.format_number(n, PhoneNumberFormat.E164) for n, _ in nums)
                row["identifiers"]["phones"] = list(texts)
                row_region = ""
            if row_region:
                row["defaultRegion"] = row_region
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
            held.append((ext, email, nums, region))
    unknown = _write_queries(out / "queries.jsonl", held, phones, queries, rng)
    _write_upserts(out / "upserts.jsonl", held, upserts, rng, seed)
    info = {"customers": customers, "regions": len(REGIONS), "phones": len(phones.seen), "shared_phone_refs": shared_phones,
            "shared_email_refs": shared_emails, "queries": queries, "unknown_queries": unknown, "upserts": upserts,
            "seed": seed, "generate_s": round(time.monotonic() - started, 1)}
    (out / "dataset.json").write_text(json.dumps(info, indent=1))
    return info


def _write_queries(path: Path, held: list[Any], phones: Phones, n: int, rng: random.Random) -> int:
    unknown = 0
    with path.open("w", encoding="utf-8") as f:
        for i in range(n):
            ext, email, nums, region = held[rng.randrange(len(held))]
            num, num_region = rng.choice(nums)
            stranger = rng.random() < UNKNOWN
            if stranger:
                unknown += 1
                num, num_region = phones.new(region), region
                ext, email = f"CRM-X{i:08d}", f"nobody.{i}@example-{region.lower()}.com"
            ani, reg = _phone_field(num, num_region, rng)
            ids: dict[str, Any] = {"phones": [ani]}
            kind = rng.random()
            if kind >= 0.9:
                ids["emails"] = [email]
            elif kind >= 0.7:
                ids["externalId"] = ext
            q: dict[str, Any] = {"identifiers": ids}
            if reg:
                q["defaultRegion"] = reg
            f.write(json.dumps(q) + "\n")
    return unknown


def _write_upserts(path: Path, held: list[Any], n: int, rng: random.Random, seed: int) -> None:
    with path.open("w", encoding="utf-8") as f:
        for i in range(n):
            if i % 2 == 0:  # an update of a known customer: a field or two changed
                ext = held[rng.randrange(len(held))][0]
                row: dict[str, Any] = {"identifiers": {"externalId": ext},
                                       "attributes": {"tier": rng.choice(TIERS),
                                                      "last_interaction_date": f"2026-11-{rng.randint(1, 28):02d}T10:00:00Z"}}
            else:  # a new customer from the CRM
                row = {"identifiers": {"externalId": f"CRM-N{seed}-{i:08d}", "emails": [f"new.{seed}.{i}@example.com"],
                                       "phones": [f"+1 650 253 {rng.randrange(10 ** 4):04d}"]},
                       "attributes": {"name": "New Customer", "tier": "bronze"}}
            row["sourceSystem"] = "SALESFORCE"
            f.write(json.dumps(row) + "\n")


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.dataset", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", help="output directory")
    p.add_argument("--customers", type=int, default=1_000_000, help="customers (default 1M; 10M is fine too)")
    p.add_argument("--queries", type=int, default=100_000, help="lookups in the call-setup mix")
    p.add_argument("--upserts", type=int, default=20_000, help="writes in the crm-sync mix")
    p.add_argument("--seed", type=int, default=1)
    a = p.parse_args(argv)
    info = generate(Path(a.out), a.customers, a.queries, a.upserts, a.seed)
    print(json.dumps(info))
    return 0


if __name__ == "__main__":
    sys.exit(main())
