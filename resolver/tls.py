"""TLS for the gRPC port and the webhook endpoint, from `[tls]` (contract §8): TLS 1.2 at least, optional mTLS.

Files are read and checked here, once per (re)load, with `cryptography`: a file that cannot be read, holds no
PEM certificate or key, or a key that is not the certificate's own, is a ConfigError naming the file, before
anything serves it. Both transports then reload without a restart (SIGHUP, resolver.reload):

- gRPC (`GrpcTls`): `grpc.dynamic_ssl_server_credentials`; gRPC asks each port's fetcher before every new
  handshake, and the fetcher hands over a new certificate once after a reload. Connections already open keep
  theirs. gRPC's TLS stack refuses anything below TLS 1.2. With `client_ca_file`, client certificates are
  required and verified against it (mTLS).
- the webhook endpoint (`WebhookTls`): one `ssl.SSLContext` (minimum TLS 1.2); a reload loads the new chain into
  that same context, on the endpoint's event loop (resolver.events.http), after it loaded into a scratch context
  first, so a file OpenSSL would refuse never half-replaces what serves.

`client_ca_file` applies to gRPC only. A CRM that posts webhooks proves who it is with the HMAC signature of
each request (per-source secrets, resolver.events.signatures), and most CRMs cannot present a client
certificate; the webhook endpoint therefore asks for none, and TLS there protects the payload in transit.

The chain and key reach OpenSSL through anonymous in-memory files (memfd, Linux): the bytes loaded are the
bytes checked, and no copy of the key is written to disk.
"""

from __future__ import annotations

import os
import ssl
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization

from resolver.config import TlsSettings
from resolver.errors import ConfigError

if TYPE_CHECKING:
    import grpc

MINIMUM_VERSION = ssl.TLSVersion.TLSv1_2


@dataclass(frozen=True)
class TlsMaterial:
    """What `[tls]` names, read and checked: the server's chain and key (PEM), the client CA bundle (mTLS; None
    without), and the leaf certificate's serial number (for the log)."""

    cert_pem: bytes
    key_pem: bytes = field(repr=False)
    client_ca_pem: bytes | None
    serial: int

    def describe(self) -> str:
        return f"certificate serial {self.serial:x}" + (", client certificates required" if self.client_ca_pem
                                                        else "")


def _read(path: str, key: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError([f"tls.{key}: cannot read {path}: {exc.strerror}"]) from None


def _certificates(pem: bytes, path: str, key: str) -> list[x509.Certificate]:
    try:
        return x509.load_pem_x509_certificates(pem)
    except ValueError:
        raise ConfigError([f"tls.{key}: {path} holds no PEM certificate"]) from None


def read_material(tls: TlsSettings) -> TlsMaterial:
    """Read `[tls]`'s files and check them: ConfigError naming the file that cannot be used."""
    cert_pem = _read(tls.cert_file, "cert_file")
    key_pem = _read(tls.key_file, "key_file")
    leaf = _certificates(cert_pem, tls.cert_file, "cert_file")[0]
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except TypeError:
        raise ConfigError([f"tls.key_file: {tls.key_file} is encrypted; give the key without a passphrase "
                           "(readable by the server's user only)"]) from None
    except (ValueError, UnsupportedAlgorithm):
        raise ConfigError([f"tls.key_file: {tls.key_file} holds no PEM private key"]) from None
    der, spki = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    if key.public_key().public_bytes(der, spki) != leaf.public_key().public_bytes(der, spki):
        raise ConfigError([f"tls.key_file: {tls.key_file} is not the key of the certificate in {tls.cert_file}"])
    client_ca = None
    if tls.client_ca_file:
        client_ca = _read(tls.client_ca_file, "client_ca_file")
        _certificates(client_ca, tls.client_ca_file, "client_ca_file")
    return TlsMaterial(cert_pem, key_pem, client_ca, leaf.serial_number)


# -- gRPC -------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class _Version:
    number: int
    config: grpc.ServerCertificateConfiguration


class GrpcTls:
    """The gRPC side's certificate (a Reloadable). `credentials()` for each `add_secure_port`."""

    what = "the gRPC TLS certificate"

    def __init__(self, tls: TlsSettings, material: TlsMaterial | None = None) -> None:
        self.settings = tls
        self.material = material or read_material(tls)
        self._current = _Version(0, self._config(self.material))
        self._lock = threading.Lock()

    @staticmethod
    def _config(material: TlsMaterial) -> grpc.ServerCertificateConfiguration:
        import grpc

        return grpc.ssl_server_certificate_configuration([(material.key_pem, material.cert_pem)],
                                                         root_certificates=material.client_ca_pem)

    def credentials(self) -> grpc.ServerCredentials:
        """Server credentials for one port. Each port has its own fetcher: gRPC asks each port's before that
        port's handshakes, and each must hand a new certificate over once."""
        import grpc

        seen = self._current.number

        def fetch() -> grpc.ServerCertificateConfiguration | None:
            nonlocal seen
            current = self._current
            if current.number == seen:
                return None  # unchanged: gRPC keeps the handshaker it has
            seen = current.number
            return current.config

        return grpc.dynamic_ssl_server_credentials(self._current.config, fetch,
                                                   require_client_authentication=bool(self.settings.client_ca_file))

    def reload(self) -> None:
        material = read_material(self.settings)
        config = self._config(material)
        with self._lock:
            self.material = material
            self._current = _Version(self._current.number + 1, config)


# -- the webhook endpoint ---------------------------------------------------------------------------------------

def _memfd(name: str, data: bytes) -> int:
    fd = os.memfd_create(name, os.MFD_CLOEXEC)
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]
    return fd


def load_chain(context: ssl.SSLContext, material: TlsMaterial) -> None:
    """Load the chain and key of `material` into `context` (ConfigError if OpenSSL refuses them)."""
    cert_fd = _memfd("resolver-tls-cert", material.cert_pem)
    try:
        key_fd = _memfd("resolver-tls-key", material.key_pem)
        try:
            context.load_cert_chain(f"/proc/self/fd/{cert_fd}", f"/proc/self/fd/{key_fd}")
        except ssl.SSLError as exc:
            raise ConfigError([f"tls: OpenSSL refuses the certificate and key: {exc.reason or exc}"]) from None
        finally:
            os.close(key_fd)
    finally:
        os.close(cert_fd)


def server_context(material: TlsMaterial) -> ssl.SSLContext:
    """A server-side SSLContext serving `material`, TLS 1.2 at least, asking for no client certificate."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = MINIMUM_VERSION
    load_chain(context, material)
    return context


def _at_once(change: Callable[[], None]) -> None:
    change()


class WebhookTls:
    """The webhook endpoint's certificate (a Reloadable): `context` is handed to the server once; `reload()`
    changes it in place through `run_change` (the endpoint sets it to run on its event loop, so the context is
    never changed while its loop starts a handshake with it)."""

    what = "the webhook endpoint's TLS certificate"

    def __init__(self, tls: TlsSettings, material: TlsMaterial | None = None) -> None:
        self.settings = tls
        self.material = material or read_material(tls)
        self.context = server_context(self.material)
        self.run_change: Callable[[Callable[[], None]], None] = _at_once

    def reload(self) -> None:
        material = read_material(self.settings)
        server_context(material)  # a scratch context first: what OpenSSL refuses never reaches `context`
        self.run_change(lambda: load_chain(self.context, material))
        self.material = material
