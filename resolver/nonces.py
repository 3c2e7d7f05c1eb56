"""Nonces of the values sealed while a replicated command is applied: derived, not drawn (contract §10, issue 19).

Every node applies the same command to the same state, so it seals the same plaintexts; with a random nonce each
node would still store its own ciphertext, and replicas would differ byte for byte. Inside a replicated apply the
nonce is therefore a function of what is sealed and where:

    nonce = first 12 bytes of HMAC-SHA256(nonce key, command identity | counter | AAD | plaintext)

- nonce key: HKDF-SHA256 of the AES key (`nonce_key`), used for nothing else: the AES key never keys the PRF.
- command identity: the stream name and sequence of the command being applied (`command_identity`); the stream
  assigns each appended message its own sequence, so a command published again (under a new message id, after a
  crash) is another identity.
- counter: the number of values this apply sealed before (the order of an apply's seals is as deterministic as
  the apply), so two values sealed in one command, even under the same AAD, get different nonces.
- AAD and plaintext: the value itself and its place.

Why no (key, nonce) pair can seal two different plaintexts: the plaintext is an input of the PRF, so two different
plaintexts give independent nonces, whatever else they share (this is the synthetic-IV construction: SIV,
RFC 5297), and they meet only by a 96-bit collision, as likely as two random nonces meeting. No uniqueness of the
identity is needed for that: a stream recreated under the same name, a command applied twice, or an apply that is
not deterministic after all can only produce another nonce, never reuse one for another value. The identity and
the counter keep each seal's nonce its own, so equal ciphertexts never tell that a customer's value repeated
(across its change-log entries, say); they are equal only where they must be: the same seal on two replicas.

Outside a replicated apply (one machine, `resolver rekey`, imports, the events inbox) nonces stay random
(resolver.crypto.KeyRing.seal without nonces).
"""

from __future__ import annotations

import hmac
import struct
from collections.abc import Mapping

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

NONCE_BYTES = 12
_INFO = b"resolver: AES-GCM nonce derivation key, v1"
_U32 = struct.Struct(">I")
_U64 = struct.Struct(">Q")


def nonce_key(data_key: bytes) -> bytes:
    """The key that derives nonces for the AES key `data_key` (HKDF-SHA256, its own label: never the AES key)."""
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=_INFO).derive(data_key)


def command_identity(stream: str, sequence: int) -> bytes:
    """The identity of the command at `sequence` of `stream`: what makes its seals' nonces its own."""
    name = stream.encode()
    return _U32.pack(len(name)) + name + _U64.pack(sequence)


class CommandNonces:
    """The nonces of one command's apply (module docstring): `derive` the next one for each value sealed.

    One instance per apply attempt: a batch applied again (after its transaction failed) starts a fresh one, so its
    counter starts from zero again, as on every other node."""

    __slots__ = ("_keys", "_prefix", "_count")

    def __init__(self, keys: Mapping[str, bytes], identity: bytes) -> None:
        self._keys = keys  # nonce key by key id
        self._prefix = _U32.pack(len(identity)) + identity
        self._count = 0

    def derive(self, key_id: str, plaintext: bytes, aad: bytes) -> bytes:
        """The nonce for sealing `plaintext` with associated data `aad` under key `key_id`."""
        message = b"".join((self._prefix, _U32.pack(self._count), _U32.pack(len(aad)), aad, plaintext))
        self._count += 1
        return hmac.digest(self._keys[key_id], message, "sha256")[:NONCE_BYTES]
