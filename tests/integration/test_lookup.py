"""`resolver lookup` against a real server with `[auth]` tokens: masked by default, `--reveal` only for a token the
server grants admin, the exit status per outcome, the error's status and details, `--explain`, TLS and mTLS."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from resolver.auth import NewToken
from resolver.cli import main as cli_main
from resolver.client import ResolverClient
from resolver.normalize import Kind, mask, mask_value
from tests.certs import make_pki
from tests.conftest import TEST_BLUEPRINT
from tests.integration.helpers import with_tokens, write_tokens

EXTERNAL_ID = "CRM-0042-XYZ"
EMAIL = "ann.lee@example.com"
PHONE = "+16502530042"
SHARED_PHONE = "+16502530077"
NAME, STATUS = "Ann Lee", "Active"
# What must never appear in a masked answer: the identifiers (as typed and normalized) and the attribute values.
RAW = (EXTERNAL_ID, EMAIL, "ann.lee", PHONE, "6502530042", "650 253 0042", NAME, STATUS, "Bob Stone", "Cy Vance")


@pytest.fixture
def tokens(tmp_path: Path) -> dict[str, NewToken]:
    return write_tokens(tmp_path / "tokens", {"admin": "resolve,admin", "reader": "resolve", "writer": "resolve,write"})


@pytest.fixture
def blueprint_text(tmp_path: Path, tokens: dict[str, NewToken]) -> str:
    return with_tokens(TEST_BLUEPRINT, tmp_path / "tokens")


@pytest.fixture
def target(server: Any, tokens: dict[str, NewToken]) -> str:
    """The server's address, holding Ann (every identifier, name and status) and, on a phone shared with her
    neighbour Bob, nobody else: Bob and Cy share SHARED_PHONE."""
    address = f"127.0.0.1:{server.port}"
    with ResolverClient(address, spread=False, token=tokens["writer"].token) as client:
        client.upsert(external_id=EXTERNAL_ID, emails=[EMAIL], phones=[PHONE], source_system="SALESFORCE",
                      attributes={"name": NAME, "status": STATUS})
        client.upsert(phones=[SHARED_PHONE], attributes={"name": "Bob Stone"})
        client.upsert(phones=[SHARED_PHONE], attributes={"name": "Cy Vance"})
    return address


def lookup(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, dict[str, Any], str]:
    """Run `resolver lookup ARGV` in this process: its exit status, its stdout as JSON, its stderr."""
    code = cli_main(["lookup", *argv])
    out, err = capsys.readouterr()
    return code, json.loads(out) if out.strip() else {}, err


def everything(doc: dict[str, Any], err: str) -> str:
    return json.dumps(doc, ensure_ascii=False) + err


def test_the_answer_is_masked_and_never_holds_a_raw_identifier_or_value(
        target: str, tokens: dict[str, NewToken], capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RESOLVER_TOKEN", tokens["reader"].token)
    code, doc, err = lookup(capsys, "--target", target, "--external-id", EXTERNAL_ID, "--email", EMAIL,
                            "--phone", "+1 650 253 0042", "--phone", SHARED_PHONE)
    assert code == 0 and err == ""
    assert (doc["outcome"], doc["matched_on"], doc["version"], doc["revealed"]) == ("MATCHED", "EXTERNAL_ID", 1, False)
    assert doc["attributes"] == {"name": mask_value(NAME), "status": mask_value(STATUS)} == \
        {"name": "An***ee", "status": "***"}
    assert doc["query"] == {"external_id": mask_value(EXTERNAL_ID), "emails": [mask(Kind.EMAIL, EMAIL)],
                            "phones": [mask(Kind.PHONE, "+1 650 253 0042"), mask(Kind.PHONE, SHARED_PHONE)]}
    assert doc["request_id"].startswith("lookup-")
    text = everything(doc, err)
    assert [raw for raw in RAW if raw in text] == []
    assert tokens["reader"].token not in text


def test_reveal_with_an_admin_token_shows_identifiers_and_values(target: str, tokens: dict[str, NewToken],
                                                                 capsys: pytest.CaptureFixture[str],
                                                                 tmp_path: Path) -> None:
    (tmp_path / "admin.token").write_text(tokens["admin"].token + "\n")
    code, doc, err = lookup(capsys, "--target", target, "--token-file", str(tmp_path / "admin.token"),
                            "--email", EMAIL, "--reveal")
    assert code == 0 and err == ""
    assert (doc["outcome"], doc["matched_on"], doc["revealed"]) == ("MATCHED", "EMAIL", True)
    assert doc["attributes"] == {"name": NAME, "status": STATUS}
    assert doc["query"] == {"external_id": "", "emails": [EMAIL], "phones": []}
    # an AMBIGUOUS answer's candidates are revealed too
    code, doc, _ = lookup(capsys, "--target", target, "--token-file", str(tmp_path / "admin.token"),
                          "--phone", SHARED_PHONE, "--reveal")
    assert code == 1 and doc["outcome"] == "AMBIGUOUS"
    assert sorted(c["attributes"]["name"] for c in doc["candidates"]) == ["Bob Stone", "Cy Vance"]


def test_reveal_with_a_resolve_only_token_is_refused_by_the_server(target: str, tokens: dict[str, NewToken],
                                                                  capsys: pytest.CaptureFixture[str],
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RESOLVER_TOKEN", tokens["reader"].token)
    code, doc, err = lookup(capsys, "--target", target, "--email", EMAIL, "--reveal")
    assert code == 2
    assert err.startswith("resolver lookup: --reveal needs a token with the admin scope") and "nothing was looked up" in err
    assert doc["error"]["code"] == "PERMISSION_DENIED" and doc["error"]["refused"] == "--reveal"
    assert "outcome" not in doc and NAME not in everything(doc, err)
    # the same token without --reveal is answered (masked): the refusal is about revealing, not about resolving
    code, doc, _ = lookup(capsys, "--target", target, "--email", EMAIL)
    assert (code, doc["outcome"], doc["attributes"]["name"]) == (0, "MATCHED", mask_value(NAME))


def test_the_exit_status_says_matched_unmatched_or_error(target: str, tokens: dict[str, NewToken],
                                                         capsys: pytest.CaptureFixture[str],
                                                         monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("RESOLVER_TOKEN", tokens["reader"].token)
    code, doc, _ = lookup(capsys, "--target", target, "--email", "nobody@example.com")
    assert (code, doc["outcome"], doc["customer_uuid"], doc["matched_on"]) == (1, "NOT_FOUND", "", None)

    code, doc, _ = lookup(capsys, "--target", target, "--phone", SHARED_PHONE)
    assert (code, doc["outcome"], doc["matched_on"], len(doc["candidates"])) == (1, "AMBIGUOUS", "PHONE", 2)
    assert sorted(c["attributes"]["name"] for c in doc["candidates"]) == sorted([mask_value("Bob Stone"),
                                                                                 mask_value("Cy Vance")])

    # a bad request: the status, its ErrorInfo and BadRequest details, as JSON; one sentence on stderr
    code, doc, err = lookup(capsys, "--target", target, "--email", EMAIL, "--field", "no_such_attribute")
    assert code == 2 and err.startswith("resolver lookup: INVALID_ARGUMENT: ")
    assert doc["error"]["code"] == "INVALID_ARGUMENT"
    details = {d["@type"].rsplit(".", 1)[-1]: d for d in doc["error"]["details"]}
    assert details["ErrorInfo"]["domain"] == "resolver.v1"
    assert details["BadRequest"]["fieldViolations"] == [
        {"field": "fields[0]", "description": "unknown attribute", "reason": "UNKNOWN_ATTRIBUTE"}]
    assert doc["request_id"].startswith("lookup-") and EMAIL not in everything(doc, err)

    monkeypatch.delenv("RESOLVER_TOKEN")
    code, doc, err = lookup(capsys, "--target", target, "--email", EMAIL)
    assert (code, doc["error"]["code"]) == (2, "UNAUTHENTICATED") and "Bearer" in doc["error"]["message"]

    code, doc, err = lookup(capsys, "--target", target)  # nothing to look up
    assert (code, doc) == (2, {}) and "give --phone, --email or --external-id" in err
    code, doc, err = lookup(capsys, "--target", target, "--email", EMAIL, "--token-file", str(tmp_path / "missing"))
    assert (code, doc) == (2, {}) and f"--token-file {tmp_path / 'missing'}: cannot read it" in err


def test_explain_lists_each_probe_masked_and_the_skipped_input(target: str, tokens: dict[str, NewToken],
                                                               capsys: pytest.CaptureFixture[str],
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RESOLVER_TOKEN", tokens["admin"].token)
    argv = ("--target", target, "--email", EMAIL, "--phone", SHARED_PHONE, "--phone", "12345", "--reveal")
    code, doc, err = lookup(capsys, *argv, "--explain")
    assert (code, doc["outcome"], doc["matched_on"]) == (0, "MATCHED", "EMAIL")
    assert [(p["kind"], p["value"], p["result"], p["hits"]) for p in doc["probes"]] == [
        ("EMAIL", mask(Kind.EMAIL, EMAIL), "HIT", 1),
        ("PHONE", mask(Kind.PHONE, SHARED_PHONE), "SHARED", 2),
    ]
    assert [(s["kind"], s["value"], s["reason"]) for s in doc["skipped"]] == [("PHONE", "***", "INVALID_PHONE")]
    # even revealed, the probes' values stay as the server masked them
    assert EMAIL not in json.dumps(doc["probes"]) and SHARED_PHONE not in json.dumps(doc["probes"])

    code, doc, _ = lookup(capsys, *argv)
    assert code == 0 and doc["probes"] == [] and len(doc["skipped"]) == 1


def test_tls_with_the_servers_ca_and_a_client_certificate(make_server: Any, settings: Any, tmp_path: Path,
                                                          tokens: dict[str, NewToken],
                                                          capsys: pytest.CaptureFixture[str],
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    pki = make_pki(tmp_path / "pki")
    running = make_server(settings.with_overrides(cert_file=str(pki.server_cert), key_file=str(pki.server_key),
                                                  client_ca_file=str(pki.ca_cert)))
    address = f"127.0.0.1:{running.port}"
    with ResolverClient(address, spread=False, token=tokens["writer"].token, root_certificates=pki.ca_cert.pem,
                        client_cert=pki.client_cert.pem, client_key=pki.client_key.pem) as client:
        written = client.upsert(external_id=EXTERNAL_ID)
    monkeypatch.setenv("RESOLVER_TOKEN", tokens["reader"].token)
    tls = ("--target", address, "--external-id", EXTERNAL_ID, "--ca-file", str(pki.ca_cert))
    code, doc, _ = lookup(capsys, *tls, "--client-cert", str(pki.client_cert), "--client-key", str(pki.client_key))
    assert (code, doc["outcome"], doc["customer_uuid"]) == (0, "MATCHED", written.customer_uuid)
    # the server asks for a client certificate: without one there is no connection
    code, doc, err = lookup(capsys, *tls, "--timeout", "2")
    assert (code, doc["error"]["code"]) == (2, "UNAVAILABLE") and err.startswith("resolver lookup: UNAVAILABLE")
    code, doc, err = lookup(capsys, *tls, "--client-cert", str(pki.client_cert))
    assert (code, doc) == (2, {}) and "--client-cert and --client-key go together" in err
