"""TLS and mTLS on the gRPC port and the webhook endpoint (contract §8), and SIGHUP reloads (resolver.reload).

In process (build_server): the right certificates succeed, anything else fails (another CA, no client certificate,
plaintext, TLS 1.1); HTTPS webhooks; a bad file is a ConfigError naming it and, on reload, keeps the previous one.
As a real `resolver serve` with two workers: SIGHUP swaps the certificate for new connections while a connection
opened before keeps serving under load, with zero failed calls; a bad file on reload is logged and changes
nothing; SIGHUP swaps a source's webhook secret in the events process and in every worker's IngestEvents.
Certificates are made per test by tests/certs.py.
"""

from __future__ import annotations

import json
import os
import re
import select
import signal
import socket
import ssl
import subprocess
import sys
import textwrap
import threading
import time
import urllib.error
import urllib.request
import uuid
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import grpc
import pytest
from cryptography import x509

from resolver.bootstrap import Running
from resolver.client import ResolverClient, tls_credentials
from resolver.config import Settings, load_settings
from resolver.errors import ConfigError
from resolver.events.signatures import sign
from resolver.tls import read_material
from resolver.v1 import resolver_pb2 as pb
from resolver.v1 import resolver_pb2_grpc
from tests.certs import Pki, make_pki
from tests.conftest import SERVER_TOML

ROOT = Path(__file__).resolve().parents[2]
WAIT_S = 30.0  # bound of every wait for a server process to do something


# -- helpers ----------------------------------------------------------------------------------------------------

def with_tls(settings: Settings, pki: Pki, *, mtls: bool = False) -> Settings:
    return settings.with_overrides(cert_file=str(pki.server_cert), key_file=str(pki.server_key),
                                   client_ca_file=str(pki.ca_cert) if mtls else "")


def peer_serial(port: int, *cas: Pki) -> int:
    """The serial number of the certificate a new TLS connection to `port` is served, verified against `cas`."""
    context = ssl.create_default_context(cadata="".join(p.ca_cert.pem.decode() for p in cas))
    context.set_alpn_protocols(["h2", "http/1.1"])
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock, \
            context.wrap_socket(sock, server_hostname="127.0.0.1") as tls:
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der).serial_number


def resolve_code(port: int, credentials: grpc.ChannelCredentials | None) -> grpc.StatusCode:
    """The code of one Resolve on a new channel (OK, or why the call failed)."""
    channel = grpc.secure_channel(f"127.0.0.1:{port}", credentials) if credentials else \
        grpc.insecure_channel(f"127.0.0.1:{port}")
    try:
        resolver_pb2_grpc.IdentityResolverStub(channel).Resolve(
            pb.ResolveRequest(identifiers=pb.Identifiers(external_id="T-1")), timeout=5)
    except grpc.RpcError as exc:
        return exc.code()
    finally:
        channel.close()
    return grpc.StatusCode.OK


def tls11_client() -> ssl.SSLContext:
    """A client that speaks TLS 1.1 at most (security level 0, so OpenSSL 3 offers it at all)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.set_ciphers("DEFAULT:@SECLEVEL=0")
    with warnings.catch_warnings():  # the ssl module deprecates naming these versions; that is the point here
        warnings.simplefilter("ignore", DeprecationWarning)
        context.minimum_version = ssl.TLSVersion.TLSv1
        context.maximum_version = ssl.TLSVersion.TLSv1_1
    return context


def handshake(port: int, context: ssl.SSLContext) -> str:
    """The TLS version a handshake with `port` agrees on; ssl.SSLError / OSError if there is none."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock, context.wrap_socket(sock) as tls:
        return str(tls.version())


@contextmanager
def permissive_tls11_server(pki: Pki) -> Iterator[int]:
    """A bare TLS server that still accepts TLS 1.1: the control showing `tls11_client` can speak it here."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.set_ciphers("DEFAULT:@SECLEVEL=0")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        context.minimum_version = ssl.TLSVersion.TLSv1
    context.load_cert_chain(pki.server_cert.path, pki.server_key.path)
    listener = socket.create_server(("127.0.0.1", 0))

    def serve_one() -> None:
        conn, _ = listener.accept()
        with conn, context.wrap_socket(conn, server_side=True):
            pass

    thread = threading.Thread(target=serve_one, daemon=True)
    thread.start()
    try:
        yield listener.getsockname()[1]
    finally:
        thread.join(10)
        listener.close()


def events_blueprint(secret_file: Path, *, workers: int = 1, tls: Pki | None = None, cert_dir: Path | None = None,
                     http: bool = True) -> str:
    """A blueprint with one CRM source whose secret is the file `secret_file`; TLS from `cert_dir` (server.crt,
    server.key) when given."""
    text = SERVER_TOML.replace("workers = 1", f"workers = {workers}") + textwrap.dedent(
        f"""
        [attributes]
        tier = {{ type = "string" }}
        [sources.SALESFORCE]
        field_map = {{ Tier__c = "tier" }}
        secrets = [{{ file = "{secret_file}" }}]
        [events]
        http_listen = "{'127.0.0.1:0' if http else ''}"
        """)
    if cert_dir is not None:
        text += f'[tls]\ncert_file = "{cert_dir / "server.crt"}"\nkey_file = "{cert_dir / "server.key"}"\n'
    return text


def event_body(record_id: str) -> bytes:
    return json.dumps({"event_type": "CREATE", "source_system": "SALESFORCE", "timestamp": "2024-01-01T00:00:00Z",
                       "record_id": record_id, "object_type": "Account",
                       "change_set": {"Tier__c": {"new_value": "gold"}}}).encode()


def signed_headers(secret: bytes, body: bytes) -> dict[str, str]:
    wid, ts = f"msg_{uuid.uuid4().hex}", int(time.time())
    return {"webhook-id": wid, "webhook-timestamp": str(ts), "webhook-signature": sign(secret, wid, ts, body)}


def post_webhook(port: int, secret: bytes, *cas: Pki) -> int:
    """POST one signed event over HTTPS (a new connection, verified against `cas`): the HTTP status."""
    body = event_body(f"R-{uuid.uuid4().hex[:8]}")
    context = ssl.create_default_context(cadata="".join(p.ca_cert.pem.decode() for p in cas))
    req = urllib.request.Request(f"https://127.0.0.1:{port}/v1/webhooks/SALESFORCE", data=body, method="POST",
                                 headers={"content-type": "application/json", **signed_headers(secret, body)})
    try:
        with urllib.request.urlopen(req, timeout=10, context=context) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as err:
        with err:
            return int(err.code)


def ingest_code(port: int, secret: bytes, *cas: Pki) -> grpc.StatusCode:
    """One IngestEvents over TLS on a new channel to `port`: its code."""
    body = event_body(f"G-{uuid.uuid4().hex[:8]}")
    channel = grpc.secure_channel(f"127.0.0.1:{port}", tls_credentials(b"".join(p.ca_cert.pem for p in cas)))
    try:
        resolver_pb2_grpc.IdentityResolverStub(channel).IngestEvents(
            pb.IngestRequest(source="SALESFORCE", body=body, headers=signed_headers(secret, body)), timeout=10)
    except grpc.RpcError as exc:
        return exc.code()
    finally:
        channel.close()
    return grpc.StatusCode.OK


def wait_until(condition: Callable[[], bool], what: str, timeout: float = WAIT_S) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"not within {timeout:g}s: {what}"
        time.sleep(0.05)


def install(pki: Pki, cert_dir: Path) -> None:
    """Put `pki`'s server certificate and key where the blueprint names them, each file replaced in one step."""
    for source, name in ((pki.server_cert.pem, "server.crt"), (pki.server_key.pem, "server.key")):
        scratch = cert_dir / f".{name}.new"
        scratch.write_bytes(source)
        os.replace(scratch, cert_dir / name)


class ServeProcess:
    """`resolver serve` in a subprocess of its own session; ports read from its "serving on" line, stderr kept in
    a file (`log()`). Use as a context manager: whatever is left of it is killed at the end."""

    LINE = re.compile(r"serving on [\d.]+:(\d+) .*?(?:webhooks on https?://[\d.]+:(\d+))?$")

    def __init__(self, config: Path, data: Path, *extra: str, env: dict[str, str] | None = None) -> None:
        self.log_path = data.parent / f"serve-{uuid.uuid4().hex[:6]}.log"
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "resolver", "serve", "--config", str(config), "--data-dir", str(data),
                 "--listen", "127.0.0.1:0", *extra],
                stdout=subprocess.PIPE, stderr=log, cwd=ROOT, start_new_session=True,
                env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})})
        assert self.proc.stdout is not None
        self.line = self._first_line()
        m = self.LINE.search(self.line)
        assert m, self.line
        self.port = int(m.group(1))
        self.http_port = int(m.group(2)) if m.group(2) else 0

    def _first_line(self) -> str:
        """The announce line; "" if the process exited first."""
        assert self.proc.stdout is not None
        deadline = time.monotonic() + WAIT_S * 2
        line = b""
        while not line.endswith(b"\n"):
            left = deadline - time.monotonic()
            assert left > 0, f"the server did not start: {self.log()}"
            if select.select([self.proc.stdout], [], [], min(left, 0.5))[0]:
                chunk = self.proc.stdout.read1(4096)  # type: ignore[attr-defined]
                if not chunk:
                    raise AssertionError(f"the server exited ({self.proc.wait(10)}): {self.log()}")
                line += chunk
        return line.decode()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def worker_ports(self, *cas: Pki) -> list[int]:
        channel = grpc.secure_channel(f"127.0.0.1:{self.port}", tls_credentials(b"".join(p.ca_cert.pem for p in cas)))
        try:
            info = resolver_pb2_grpc.IdentityResolverStub(channel).GetServerInfo(pb.GetServerInfoRequest(), timeout=10)
        finally:
            channel.close()
        return list(info.worker_ports)

    def hup(self) -> None:
        self.proc.send_signal(signal.SIGHUP)

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=60)

    def __enter__(self) -> ServeProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)
        assert self.proc.stdout is not None
        self.proc.stdout.close()


class SteadyLoad:
    """Resolve from a thread, one call every few milliseconds, until stopped: counts of answered and failed calls.
    `fresh=False`: every call on one channel opened at the start (one connection); `fresh=True`: a new channel
    (a new connection, a new handshake) for each call."""

    def __init__(self, port: int, credentials: grpc.ChannelCredentials, *, fresh: bool) -> None:
        self.port, self.credentials, self.fresh = port, credentials, fresh
        self.ok = 0
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._channel = None if fresh else grpc.secure_channel(f"127.0.0.1:{port}", credentials)
        if self._channel is not None:
            self._call(self._channel)  # the connection exists before the reload
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _call(self, channel: grpc.Channel) -> None:
        try:
            resolver_pb2_grpc.IdentityResolverStub(channel).Resolve(
                pb.ResolveRequest(identifiers=pb.Identifiers(external_id="T-1")), timeout=10)
            self.ok += 1
        except grpc.RpcError as exc:
            self.failures.append(f"{exc.code()}: {exc.details()}")

    def _run(self) -> None:
        while not self._stop.wait(0.005):
            if self._channel is not None:
                self._call(self._channel)
            else:
                with grpc.secure_channel(f"127.0.0.1:{self.port}", self.credentials) as channel:
                    self._call(channel)

    def more(self, calls: int) -> None:
        """Wait until `calls` more calls were made (bounded)."""
        target = self.ok + len(self.failures) + calls
        wait_until(lambda: self.ok + len(self.failures) >= target, f"{calls} more calls")

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(WAIT_S)
        if self._channel is not None:
            self._channel.close()


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    return make_pki(tmp_path / "pki")


@pytest.fixture
def other(tmp_path: Path) -> Pki:
    return make_pki(tmp_path / "other", name="another")


# -- in process -------------------------------------------------------------------------------------------------

def test_tls_succeeds_with_the_servers_ca_and_fails_with_another_ca_or_in_plaintext(make_server, settings, pki,
                                                                                    other) -> None:  # noqa: ANN001
    running: Running = make_server(with_tls(settings, pki))
    with ResolverClient(f"127.0.0.1:{running.port}", root_certificates=pki.ca_cert.pem) as client:
        written = client.upsert(external_id="T-1")
        assert client.resolve(external_id="T-1").customer_uuid == written.customer_uuid
    assert resolve_code(running.port, tls_credentials(other.ca_cert.pem)) == grpc.StatusCode.UNAVAILABLE
    assert resolve_code(running.port, None) == grpc.StatusCode.UNAVAILABLE  # plaintext to the TLS port
    assert peer_serial(running.port, pki) == pki.server_serial


def test_mtls_needs_a_client_certificate_its_ca_signed(make_server, settings, pki, other) -> None:  # noqa: ANN001
    running: Running = make_server(with_tls(settings, pki, mtls=True))
    ca = pki.ca_cert.pem
    assert resolve_code(running.port, tls_credentials(ca, pki.client_cert.pem, pki.client_key.pem)) == grpc.StatusCode.OK
    assert resolve_code(running.port, tls_credentials(ca)) == grpc.StatusCode.UNAVAILABLE  # no client certificate
    assert resolve_code(running.port, tls_credentials(ca, other.client_cert.pem, other.client_key.pem)) == \
        grpc.StatusCode.UNAVAILABLE  # a client certificate another CA signed
    with ResolverClient(f"127.0.0.1:{running.port}", root_certificates=ca, client_cert=pki.client_cert.pem,
                        client_key=pki.client_key.pem) as client:
        assert client.upsert(external_id="T-2").customer_uuid


def test_webhook_endpoint_serves_https_and_accepts_a_signed_event(make_server, tmp_path, pki) -> None:  # noqa: ANN001
    secret = tmp_path / "sf.secret"
    secret.write_bytes(b"first-secret")
    config = tmp_path / "events.toml"
    config.write_text(events_blueprint(secret))
    s = load_settings(config, data_dir=str(tmp_path / "data"), listen="127.0.0.1:0")
    running: Running = make_server(with_tls(s, pki, mtls=True))  # client_ca applies to gRPC only
    assert running.http_port
    assert post_webhook(running.http_port, b"first-secret", pki) == 202  # no client certificate needed here
    assert post_webhook(running.http_port, b"wrong-secret", pki) == 401
    assert peer_serial(running.http_port, pki) == pki.server_serial
    plain = urllib.request.Request(f"http://127.0.0.1:{running.http_port}/v1/webhooks/SALESFORCE", data=b"{}",
                                   method="POST")
    with pytest.raises((urllib.error.URLError, ConnectionError)):  # plaintext HTTP to the HTTPS port
        urllib.request.urlopen(plain, timeout=10).close()


def test_a_tls_1_1_client_cannot_handshake_with_either_port(make_server, tmp_path, pki) -> None:  # noqa: ANN001
    with permissive_tls11_server(pki) as control:  # the client does speak TLS 1.1 on this machine ...
        assert handshake(control, tls11_client()) == "TLSv1.1"
    secret = tmp_path / "sf.secret"
    secret.write_bytes(b"s")
    config = tmp_path / "events.toml"
    config.write_text(events_blueprint(secret))
    running: Running = make_server(with_tls(load_settings(config, data_dir=str(tmp_path / "data"),
                                                          listen="127.0.0.1:0"), pki))
    for port in (running.http_port, running.port):  # ... and neither of ours agrees to it
        with pytest.raises((ssl.SSLError, ConnectionError)):
            handshake(port, tls11_client())
    modern = ssl.create_default_context(cadata=pki.ca_cert.pem.decode())
    modern.check_hostname = False
    assert handshake(running.http_port, modern) in ("TLSv1.2", "TLSv1.3")


def test_unusable_files_are_config_errors_naming_the_file(settings, pki, other, tmp_path) -> None:  # noqa: ANN001
    def problem(**files: str) -> str:
        with pytest.raises(ConfigError) as err:
            read_material(with_tls(settings, pki).with_overrides(**files).tls)
        return "; ".join(err.value.problems)

    missing = tmp_path / "nope.crt"
    assert problem(cert_file=str(missing)) == f"tls.cert_file: cannot read {missing}: No such file or directory"
    assert problem(cert_file=str(pki.server_key)) == f"tls.cert_file: {pki.server_key} holds no PEM certificate"
    assert problem(key_file=str(pki.server_cert)) == f"tls.key_file: {pki.server_cert} holds no PEM private key"
    assert problem(key_file=str(other.server_key)) == \
        f"tls.key_file: {other.server_key} is not the key of the certificate in {pki.server_cert}"
    assert problem(client_ca_file=str(pki.server_key)) == \
        f"tls.client_ca_file: {pki.server_key} holds no PEM certificate"
    assert read_material(with_tls(settings, pki).tls).serial == pki.server_serial


def test_reload_swaps_both_certificates_and_a_bad_file_keeps_them(make_server, tmp_path, pki, other) -> None:  # noqa: ANN001
    cert_dir = tmp_path / "tls"
    cert_dir.mkdir()
    install(pki, cert_dir)
    secret = tmp_path / "sf.secret"
    secret.write_bytes(b"s")
    config = tmp_path / "events.toml"
    config.write_text(events_blueprint(secret, cert_dir=cert_dir))
    running: Running = make_server(load_settings(config, data_dir=str(tmp_path / "data"), listen="127.0.0.1:0"))
    with grpc.secure_channel(f"127.0.0.1:{running.port}", tls_credentials(pki.ca_cert.pem)) as before:
        stub = resolver_pb2_grpc.IdentityResolverStub(before)
        stub.Upsert(pb.UpsertRequest(idempotency_key="k1", identifiers=pb.Identifiers(external_id="T-1")),
                    timeout=10)
        install(other, cert_dir)
        assert running.reload() == []
        for port in (running.port, running.http_port):
            assert peer_serial(port, other) == other.server_serial
        assert resolve_code(running.port, tls_credentials(pki.ca_cert.pem)) == grpc.StatusCode.UNAVAILABLE
        assert stub.Resolve(pb.ResolveRequest(identifiers=pb.Identifiers(external_id="T-1")), timeout=10).customer_uuid

        (cert_dir / "server.crt").write_bytes(b"not a certificate")
        failures = running.reload()
        assert failures == [f"{what}: tls.cert_file: {cert_dir / 'server.crt'} holds no PEM certificate"
                            for what in ("the gRPC TLS certificate", "the webhook endpoint's TLS certificate")]
        for port in (running.port, running.http_port):
            assert peer_serial(port, other) == other.server_serial
        assert post_webhook(running.http_port, b"s", other) == 202


# -- a real `resolver serve`, SIGHUP -----------------------------------------------------------------------------

@pytest.mark.process
def test_sighup_swaps_the_certificate_without_failing_a_call(tmp_path: Path, pki: Pki, other: Pki) -> None:
    cert_dir = tmp_path / "tls"
    cert_dir.mkdir()
    install(pki, cert_dir)
    config = tmp_path / "tls.toml"
    config.write_text(SERVER_TOML.replace("workers = 1", "workers = 2")
                      + f'[tls]\ncert_file = "{cert_dir / "server.crt"}"\nkey_file = "{cert_dir / "server.key"}"\n')
    with ServeProcess(config, tmp_path / "data") as server:
        assert server.line.rstrip().endswith(", TLS)"), server.line
        workers = server.worker_ports(pki)
        assert len(workers) == 2
        with ResolverClient(f"127.0.0.1:{server.port}", root_certificates=pki.ca_cert.pem) as client:
            client.upsert(external_id="T-1")
        kept = SteadyLoad(server.port, tls_credentials(pki.ca_cert.pem), fresh=False)  # trusts the old CA only
        fresh = SteadyLoad(server.port, tls_credentials(pki.ca_cert.pem + other.ca_cert.pem), fresh=True)
        try:
            kept.more(20)
            install(other, cert_dir)
            server.hup()
            for port in workers:  # every worker: a new connection is served the new certificate
                wait_until(lambda p=port: peer_serial(p, pki, other) == other.server_serial, f"worker :{port} reloads")
            assert peer_serial(server.port, other) == other.server_serial
            kept.more(20)
            fresh.more(5)
        finally:
            kept.stop()
            fresh.stop()
        assert (kept.failures, fresh.failures) == ([], [])  # the old connection kept serving; no handshake failed
        assert kept.ok >= 40 and fresh.ok >= 5
        assert resolve_code(server.port, tls_credentials(pki.ca_cert.pem)) == grpc.StatusCode.UNAVAILABLE

        (cert_dir / "server.crt").write_bytes(b"-----BEGIN CERTIFICATE-----\ntruncated\n")
        server.hup()
        why = f"reload of the gRPC TLS certificate failed, keeping the previous one: tls.cert_file: " \
              f"{cert_dir / 'server.crt'} holds no PEM certificate"
        wait_until(lambda: server.log().count(why) == 2, "both workers log the failed reload")
        for port in workers:
            assert peer_serial(port, other) == other.server_serial
            assert resolve_code(port, tls_credentials(other.ca_cert.pem)) == grpc.StatusCode.OK
        assert server.stop() == 0


@pytest.mark.process
def test_sighup_swaps_a_webhook_secret_and_certificate_in_every_process(tmp_path: Path, pki: Pki,
                                                                        other: Pki) -> None:
    cert_dir = tmp_path / "tls"
    cert_dir.mkdir()
    install(pki, cert_dir)
    secret = tmp_path / "sf.secret"
    secret.write_bytes(b"old-secret\n")
    config = tmp_path / "events.toml"
    config.write_text(events_blueprint(secret, workers=2, cert_dir=cert_dir))
    with ServeProcess(config, tmp_path / "data") as server:
        assert server.http_port and "webhooks on https://" in server.line
        workers = server.worker_ports(pki)
        assert post_webhook(server.http_port, b"old-secret", pki) == 202
        for port in workers:
            assert ingest_code(port, b"old-secret", pki) == grpc.StatusCode.OK

        secret.write_bytes(b"new-secret\n")
        install(other, cert_dir)
        server.hup()
        # the events process reloads its parts one after the other: wait for both
        wait_until(lambda: post_webhook(server.http_port, b"old-secret", pki, other) == 401,
                   "the events process refuses the old secret")
        wait_until(lambda: peer_serial(server.http_port, pki, other) == other.server_serial,
                   "the events process serves the new certificate")
        assert post_webhook(server.http_port, b"new-secret", other) == 202  # over the new certificate
        for port in workers:
            wait_until(lambda p=port: ingest_code(p, b"old-secret", pki, other) == grpc.StatusCode.UNAUTHENTICATED,
                       f"worker :{port} refuses the old secret")
            assert ingest_code(port, b"new-secret", other) == grpc.StatusCode.OK

        secret.unlink()  # a secret that cannot be read: the reload fails, the last good secret stays
        server.hup()
        why = f"reload of the webhook secrets of [sources.*] failed, keeping the previous one: sources.SALESFORCE: " \
              f"file {secret} cannot be read"
        wait_until(lambda: server.log().count(why) == 3, "two workers and the events process log the failure")
        assert post_webhook(server.http_port, b"new-secret", other) == 202
        for port in workers:
            assert ingest_code(port, b"new-secret", other) == grpc.StatusCode.OK
        assert server.stop() == 0
