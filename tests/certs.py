"""Test certificates made with `cryptography`: a CA, a server certificate for 127.0.0.1 / localhost signed by it,
and a client certificate signed by it, as PEM files in a directory (EC P-256 keys: a set takes milliseconds).

    pki = make_pki(tmp_path / "pki")          # pki.ca_cert, pki.server_cert, pki.server_key, pki.client_cert, ...
    other = make_pki(tmp_path / "other")      # an unrelated CA: a client trusting it cannot verify `pki`'s server

Every call makes a new CA (its own key and name), so two sets never trust each other; each certificate gets a
random serial number.
"""

from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


@dataclass(frozen=True)
class PemFile:
    """One PEM file written by `make_pki`: its path and its bytes."""

    path: Path
    pem: bytes = field(repr=False)

    def __str__(self) -> str:
        return str(self.path)


@dataclass(frozen=True)
class Pki:
    """A CA and the server and client certificates it signed (each with its key), as written to `directory`."""

    directory: Path
    ca_cert: PemFile
    ca_key: PemFile
    server_cert: PemFile
    server_key: PemFile
    client_cert: PemFile
    client_key: PemFile
    server_serial: int


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _certificate(subject: str, key: ec.EllipticCurvePrivateKey, issuer: x509.Name | None,
                 issuer_key: ec.EllipticCurvePrivateKey, *, ca: bool = False, server: bool = False,
                 client: bool = False) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    builder = (x509.CertificateBuilder()
               .subject_name(name)
               .issuer_name(issuer or name)
               .public_key(key.public_key())
               .serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(minutes=5))
               .not_valid_after(now + datetime.timedelta(days=2))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
               .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False))
    if ca:
        builder = builder.add_extension(
            x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
                          key_encipherment=False, data_encipherment=False, key_agreement=False,
                          encipher_only=False, decipher_only=False), critical=True)
    else:
        builder = builder.add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()), critical=False)
        usages = ([ExtendedKeyUsageOID.SERVER_AUTH] if server else []) + ([ExtendedKeyUsageOID.CLIENT_AUTH]
                                                                          if client else [])
        builder = builder.add_extension(x509.ExtendedKeyUsage(usages), critical=False)
    if server:
        builder = builder.add_extension(x509.SubjectAlternativeName([
            x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def make_pki(directory: Path, name: str = "resolver test") -> Pki:
    """Make a fresh CA, a server certificate (127.0.0.1, localhost) and a client certificate, and write the six
    PEM files into `directory` (created if absent)."""
    directory.mkdir(parents=True, exist_ok=True)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = _certificate(f"{name} CA", ca_key, None, ca_key, ca=True)
    server_key = ec.generate_private_key(ec.SECP256R1())
    server = _certificate("localhost", server_key, ca.subject, ca_key, server=True)
    client_key = ec.generate_private_key(ec.SECP256R1())
    client = _certificate(f"{name} client", client_key, ca.subject, ca_key, client=True)

    def write(filename: str, pem: bytes) -> PemFile:
        path = directory / filename
        path.write_bytes(pem)
        return PemFile(path, pem)

    encode = serialization.Encoding.PEM
    return Pki(
        directory=directory,
        ca_cert=write("ca.crt", ca.public_bytes(encode)),
        ca_key=write("ca.key", _key_pem(ca_key)),
        server_cert=write("server.crt", server.public_bytes(encode)),
        server_key=write("server.key", _key_pem(server_key)),
        client_cert=write("client.crt", client.public_bytes(encode)),
        client_key=write("client.key", _key_pem(client_key)),
        server_serial=server.serial_number,
    )
