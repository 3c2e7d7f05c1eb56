"""A real `resolver serve` (a supervisor and two spawned workers) at DEBUG, logging JSON to stderr: requests
carrying canary identifiers, attribute values and a token, valid and invalid, and not one canary reaches a log line
raw (contract §8; resolver.logs is the choke point every process installs)."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import grpc
import pytest

from resolver.normalize import Kind, mask
from resolver.v1 import resolver_pb2 as pb
from resolver.v1 import resolver_pb2_grpc
from tests.conftest import SERVER_TOML
from tests.integration.helpers import phone, resolve_req, upsert_req
from tests.integration.serve import serving

# tests of processes, signals and files: the pure pass runs the same code in process (Makefile test-pure)
pytestmark = pytest.mark.process

PHONE = phone(7731)
EMAIL = "canary.person@example.org"
EXTERNAL_ID = "CANARY-EXT-7731"
NAME = "Canary Plain Value"
SENSITIVE = "Canary-Sensitive-999"
TOKEN = "rsv_CanaryTokenNeverLogged0123456789"
# A request id the access log keeps (letters, digits, . _ : -) that is a phone number without its '+'.
REQUEST_ID = PHONE[1:]
CANARIES = (PHONE, REQUEST_ID, EMAIL, EXTERNAL_ID, NAME, SENSITIVE, TOKEN, PHONE[:-1], "canary.person@@")

BLUEPRINT = SERVER_TOML + textwrap.dedent(
    """
    [logging]
    level = "DEBUG"
    format = "json"
    [attributes]
    name = { type = "string", max_length = 50 }
    ssn = { type = "string", sensitive = true }
    """
)


def _calls(stub: resolver_pb2_grpc.IdentityResolverStub) -> list[grpc.RpcError]:
    """Valid and invalid calls, every one carrying canaries; the errors the invalid ones got."""
    meta = (("x-request-id", REQUEST_ID), ("authorization", f"Bearer {TOKEN}"))
    ids = {"external_id": EXTERNAL_ID, "emails": (EMAIL,), "phones": (PHONE,)}
    stub.Upsert(upsert_req(**ids, attributes={"name": NAME, "ssn": SENSITIVE}), metadata=meta)
    assert stub.Resolve(resolve_req(**ids, explain=True), metadata=meta).outcome == pb.OUTCOME_MATCHED
    errors = []
    for bad in (upsert_req(external_id=EXTERNAL_ID, phones=(PHONE[:-1],), attributes={"name": NAME * 3}),
                upsert_req(emails=("canary.person@@example.org",), attributes={EMAIL: SENSITIVE}),
                upsert_req("", external_id=EXTERNAL_ID, attributes={"ssn": 7731})):
        with pytest.raises(grpc.RpcError) as err:
            stub.Upsert(bad, metadata=meta)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        errors.append(err.value)
    # Resolve reports identifiers it cannot read as skipped (masked), and answers
    skipped = stub.Resolve(resolve_req(phones=(PHONE[:-1],), emails=(EMAIL + "@",), explain=True), metadata=meta)
    assert skipped.outcome == pb.OUTCOME_NOT_FOUND and len(skipped.skipped) == 2
    assert PHONE[:-1] not in str(skipped) and EMAIL not in str(skipped)
    return errors


def test_no_canary_reaches_the_log_of_a_real_server(tmp_path: Path) -> None:
    config = tmp_path / "blueprint.toml"
    config.write_text(BLUEPRINT)
    err_path = tmp_path / "serve.stderr"
    with serving(config, tmp_path / "data", err_path, workers=2) as line:
        with grpc.insecure_channel(f"127.0.0.1:{line.port}") as channel:
            errors = _calls(resolver_pb2_grpc.IdentityResolverStub(channel))
        # leaving the block stops the server (SIGTERM, exit 0): the workers have stopped, and written all they log

    text = err_path.read_text()
    for canary in CANARIES:
        assert canary not in text, f"{canary!r} is in the server's log"
    lines = [json.loads(raw) for raw in text.splitlines() if raw.strip()]  # every line is one JSON object
    assert all({"ts", "level", "logger", "pid", "msg"} <= line.keys() for line in lines)
    access = [line for line in lines if line["logger"] == "resolver.access"]
    assert sorted(line["code"] for line in access) == ["INVALID_ARGUMENT"] * 3 + ["OK"] * 3
    # the request id was logged, masked by the project's rule (a phone number's, without the '+')
    assert {line["request_id"] for line in access} == {mask(Kind.PHONE, REQUEST_ID)}
    assert len({line["pid"] for line in lines}) >= 2  # the supervisor's and the workers' lines alike
    # what the invalid calls' callers were told passed the same choke point
    for e in errors:
        told = e.details() + "".join(repr(v) for _, v in e.trailing_metadata() or ())
        for canary in (PHONE, EMAIL, EXTERNAL_ID, NAME, SENSITIVE, TOKEN):
            assert canary not in told, f"{canary!r} is in an error sent to the client"
