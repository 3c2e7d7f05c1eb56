"""Secure by default (contract §8, issue 16 points 1 and 7), through the real `resolver serve` command line.

Off loopback without TLS and tokens, `serve` refuses to start with one sentence and exit 1; so does a source or
outbound destination whose secret cannot be read. `[server] insecure = true` starts anyway, with one warning.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from resolver.client import tls_credentials
from tests.certs import make_pki
from tests.conftest import SERVER_TOML
from tests.integration.test_tls import ROOT, ServeProcess

# tests of processes, signals and files: the pure pass runs the same code in process (Makefile test-pure)
pytestmark = pytest.mark.process

MISSING = "RESOLVER_TEST_SECRET_NOBODY_SET"
INSECURE = "[server] insecure = true"


def refused(tmp_path: Path, blueprint: str, *extra: str) -> subprocess.CompletedProcess[str]:
    config = tmp_path / "blueprint.toml"
    config.write_text(blueprint)
    return subprocess.run([sys.executable, "-m", "resolver", "serve", "--config", str(config), "--data-dir",
                           str(tmp_path / "data"), *extra], capture_output=True, text=True, cwd=ROOT, timeout=60,
                          env={k: v for k, v in os.environ.items() if k != MISSING})


def one_sentence(r: subprocess.CompletedProcess[str]) -> str:
    """The refusal: exit 1, nothing on stdout, one line on stderr (returned without its "resolver: " prefix)."""
    assert r.returncode == 1, r.stderr
    assert r.stdout == ""
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("resolver: refusing to start: "), r.stderr
    return lines[0].removeprefix("resolver: ")


def insecure(blueprint: str) -> str:
    return blueprint.replace("[server]\n", "[server]\ninsecure = true\n", 1)


def source_blueprint(secret: str) -> str:
    return SERVER_TOML + textwrap.dedent(
        f"""
        [sources.SALESFORCE]
        field_map = {{}}
        secrets = [{secret}]
        [events]
        http_listen = ""
        """)


def health(port: int, credentials: grpc.ChannelCredentials | None = None) -> int:
    target = f"127.0.0.1:{port}"
    with (grpc.secure_channel(target, credentials) if credentials else grpc.insecure_channel(target)) as channel:
        return int(health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10).status)


def test_off_loopback_without_tls_and_tokens_refuses_with_one_sentence(tmp_path: Path) -> None:
    r = refused(tmp_path, SERVER_TOML, "--listen", "0.0.0.0:0")
    assert one_sentence(r) == ("refusing to start: serving 0.0.0.0:0 off loopback without TLS and tokens; set [tls] "
                               "cert_file and key_file and [auth] tokens_file, or [server] insecure = true to allow it")
    assert not (tmp_path / "data").exists()  # refused before anything was opened


def test_the_webhook_endpoint_off_loopback_counts_too_and_tls_alone_is_not_enough(tmp_path: Path) -> None:
    pki = make_pki(tmp_path / "pki")
    blueprint = source_blueprint('{ file = "/dev/null" }').replace('http_listen = ""', 'http_listen = "[::]:0"')
    blueprint += f'[tls]\ncert_file = "{pki.server_cert}"\nkey_file = "{pki.server_key}"\n'
    sentence = one_sentence(refused(tmp_path, blueprint, "--listen", "127.0.0.1:0"))
    assert sentence.startswith("refusing to start: serving [::]:0 off loopback without tokens;"), sentence


def test_insecure_true_starts_off_loopback_with_one_warning(tmp_path: Path) -> None:
    config = tmp_path / "insecure.toml"
    config.write_text(insecure(SERVER_TOML))
    with ServeProcess(config, tmp_path / "data", "--listen", "0.0.0.0:0") as server:
        assert server.line.startswith("resolver: serving on 0.0.0.0:")
        assert health(server.port) == health_pb2.HealthCheckResponse.SERVING
        assert server.stop() == 0
        warnings = [line for line in server.log().splitlines() if INSECURE in line]
    assert len(warnings) == 1, server.log()
    assert "serving 0.0.0.0:0 off loopback without TLS and tokens" in warnings[0]


def test_tls_and_tokens_off_loopback_start(tmp_path: Path) -> None:
    pki = make_pki(tmp_path / "pki")
    tokens = tmp_path / "tokens"
    tokens.write_text(f"ops resolve sha256:{hashlib.sha256(b'a-token-nobody-uses').hexdigest()}\n")
    config = tmp_path / "secure.toml"
    config.write_text(SERVER_TOML + f'[tls]\ncert_file = "{pki.server_cert}"\nkey_file = "{pki.server_key}"\n'
                      f'[auth]\ntokens_file = "{tokens}"\n')
    with ServeProcess(config, tmp_path / "data", "--listen", "0.0.0.0:0") as server:
        assert health(server.port, tls_credentials(pki.ca_cert.pem)) == health_pb2.HealthCheckResponse.SERVING
        assert server.stop() == 0
        assert INSECURE not in server.log()


@pytest.mark.parametrize("kind", ["source", "outbound"])
def test_a_secret_that_cannot_be_read_stops_the_start_up(tmp_path: Path, kind: str) -> None:
    if kind == "source":
        blueprint, named = source_blueprint(f'{{ env = "{MISSING}" }}'), "source SALESFORCE"
    else:
        blueprint = SERVER_TOML + textwrap.dedent(
            f"""
            [outbound.CRM]
            url = "http://127.0.0.1:9/hooks"
            events = ["customer.created"]
            secrets = [{{ file = "{tmp_path / 'no-such-secret'}" }}]
            """)
        named = "outbound CRM"
    sentence = one_sentence(refused(tmp_path, blueprint, "--listen", "127.0.0.1:0"))
    reason = f"env {MISSING}" if kind == "source" else f"file {tmp_path / 'no-such-secret'}"
    assert sentence == (f"refusing to start: the secrets of {named} ({reason}) cannot be read; provide them, or "
                        "set [server] insecure = true to start without them")


def test_insecure_true_starts_without_the_secret_with_one_warning(tmp_path: Path) -> None:
    config = tmp_path / "insecure.toml"
    config.write_text(insecure(source_blueprint(f'{{ env = "{MISSING}" }}')))
    with ServeProcess(config, tmp_path / "data", env={MISSING: ""}) as server:
        assert health(server.port) == health_pb2.HealthCheckResponse.SERVING
        assert server.stop() == 0
        warnings = [line for line in server.log().splitlines() if INSECURE in line]
    assert len(warnings) == 1, server.log()
    assert f"the secrets of source SALESFORCE (env {MISSING}) cannot be read" in warnings[0]


def test_a_bad_certificate_at_start_up_names_the_file(tmp_path: Path) -> None:
    pki, other = make_pki(tmp_path / "pki"), make_pki(tmp_path / "other")
    blueprint = SERVER_TOML + f'[tls]\ncert_file = "{pki.server_cert}"\nkey_file = "{other.server_key}"\n'
    r = refused(tmp_path, blueprint, "--listen", "127.0.0.1:0")
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert f"tls.key_file: {other.server_key} is not the key of the certificate in {pki.server_cert}" in r.stderr
