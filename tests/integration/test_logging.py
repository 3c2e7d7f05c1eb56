"""Nothing the service logs contains a raw identifier or attribute value (contract §8)."""

from __future__ import annotations

import logging

import grpc
import pytest

from tests.integration.helpers import resolve_req, upsert_req

SECRETS = ("+16502530042", "secret.person@example.com", "CRM-SECRET-1", "Sensitive Name")


def test_logs_never_contain_raw_identifiers(stub, server, caplog: pytest.LogCaptureFixture) -> None:  # noqa: ANN001
    caplog.set_level(logging.DEBUG)
    stub.Upsert(upsert_req(external_id=SECRETS[2], emails=(SECRETS[1],), phones=(SECRETS[0],),
                           attributes={"name": SECRETS[3]}))
    stub.Resolve(resolve_req(external_id=SECRETS[2], phones=(SECRETS[0],), explain=True))
    for bad in (upsert_req(external_id=SECRETS[2], phones=("+1650253004",), attributes={"name": SECRETS[3] * 9}),
                upsert_req("", emails=(SECRETS[1] + "@",))):
        with pytest.raises(grpc.RpcError):
            stub.Upsert(bad)
    server.service.sweep_ledger()
    text = "\n".join(r.getMessage() + (r.exc_text or "") for r in caplog.records)
    for secret in SECRETS:
        assert secret not in text
