"""Encryption at rest (contract §8): sensitive attributes and CRM event bodies, AES-256-GCM under a key ring.

Key ring (`[encryption] keys`): the first key encrypts, every key decrypts; each ciphertext names the id of the
key it was made with, so a rotation is: put the new key first (servers restarted), `resolver rekey`
(resolver.rekey), then drop the old key.

A ciphertext is a 96-bit nonce, then the AES-GCM ciphertext and its 16-byte tag. The nonce is random, except for
the values sealed while a replicated command is applied: there it is derived from the command, the value and its
place (resolver.nonces), so that every node stores the same bytes. Its associated data binds it to its place: a
value moved to another customer or attribute, or a body moved to another event, fails its tag check and is refused
(DecryptionFailed), never decrypted to something else:

| what                           | associated data                                      |
| ------------------------------ | ---------------------------------------------------- |
| a sensitive attribute's value  | b"attribute\\0" + customer uuid + b"\\0" + attribute name |
| a CRM event body (inbox, DLQ)  | b"event\\0" + source + b"\\0" + webhook id             |

Stored form of a sensitive value (records are orjson: resolver.records): the object {"enc": "v1:KEYID:BASE64"},
BASE64 the nonce + ciphertext + tag, the plaintext the value's orjson bytes (so text, numbers and booleans come
back with their JSON type). An attribute value is never an object (resolver.attributes accepts scalars only), so
the type alone tells a sealed value from a clear one: values written in clear (before the attribute was declared
sensitive, or under `[server] insecure` without keys) stay readable, and `resolver rekey` seals them.

`Sealer` applies this to what the store keeps: records, change-log entries and merge journal entries seal the
blueprint's sensitive attributes (resolver.store calls it at its encode/decode points, the one place each kind of
data is written: each transaction holds the sealer it seals with, the store's own, or in the transaction of a
replicated command's apply `for_command`'s); reads open them, or leave them out for callers without the
`sensitive` scope (`reveal`).
"""

from __future__ import annotations

import base64
import binascii
import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, NamedTuple

import orjson
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from resolver.config import Settings
from resolver.config.tables import EncryptionKey
from resolver.errors import DecryptionFailed
from resolver.nonces import NONCE_BYTES, CommandNonces, nonce_key
from resolver.records import Record, encode_json

FORMAT = "v1"
SEALED = "enc"  # the one key of a sealed value's object
KEY_BYTES = 32


class Ciphertext(NamedTuple):
    """One encrypted payload: the id of its key, and nonce + ciphertext + tag (a NamedTuple: one is parsed per
    sensitive value a Resolve shows, and a frozen dataclass costs twice as much to make)."""

    key_id: str
    blob: bytes


def new_key() -> str:
    """A fresh random AES-256 key in base64, as `[encryption] keys` reads it (`resolver key new`)."""
    return base64.b64encode(os.urandom(KEY_BYTES)).decode("ascii")


def attribute_aad(customer_uuid: str, name: str) -> bytes:
    return b"attribute\0" + customer_uuid.encode() + b"\0" + name.encode()


def event_aad(source: str, webhook_id: str) -> bytes:
    return b"event\0" + source.encode() + b"\0" + webhook_id.encode()


class KeyRing:
    """AES-256-GCM keys by id: the first encrypts, all decrypt. With no key (`enabled` False) nothing is sealed
    and a sealed payload cannot be opened."""

    __slots__ = ("_aead", "_nonce_keys", "current", "ids")

    def __init__(self, keys: Sequence[EncryptionKey]) -> None:
        self._aead = {k.id: AESGCM(k.key) for k in keys}
        self._nonce_keys = {k.id: nonce_key(k.key) for k in keys}
        self.ids = tuple(k.id for k in keys)
        self.current = self.ids[0] if self.ids else ""

    @property
    def enabled(self) -> bool:
        return bool(self.ids)

    def seal(self, plaintext: bytes, aad: bytes, nonces: CommandNonces | None = None) -> Ciphertext:
        """`plaintext` encrypted under the first key (RuntimeError without a key), with a random nonce, or with the
        one `nonces` derives (a replicated command's apply: resolver.nonces)."""
        if not self.current:
            raise RuntimeError("no [encryption] key to encrypt with")
        key_id = self.current
        nonce = os.urandom(NONCE_BYTES) if nonces is None else nonces.derive(key_id, plaintext, aad)
        return Ciphertext(key_id, nonce + self._aead[key_id].encrypt(nonce, plaintext, aad))

    def command_nonces(self, identity: bytes) -> CommandNonces:
        """The nonces of the apply of the command `identity` (resolver.nonces.command_identity)."""
        return CommandNonces(self._nonce_keys, identity)

    def open(self, ct: Ciphertext, aad: bytes, what: str) -> bytes:
        """The plaintext of `ct`; DecryptionFailed (naming `what`, never a value) when its key is not in the ring,
        or it was altered, or it belongs to other associated data (another customer, attribute or event)."""
        aead = self._aead.get(ct.key_id)
        if aead is None:
            held = ", ".join(self.ids) or "none"
            raise DecryptionFailed(f"{what} is encrypted under key id {ct.key_id!r}, which [encryption] keys does "
                                   f"not hold (held: {held}); restore that key (run `resolver rekey` before "
                                   "dropping a key)", reason="ENCRYPTION_KEY_UNKNOWN")
        try:
            return aead.decrypt(ct.blob[:NONCE_BYTES], ct.blob[NONCE_BYTES:], aad)
        except InvalidTag:
            raise DecryptionFailed(f"{what} cannot be decrypted: its ciphertext was altered, or belongs to another "
                                   "customer, attribute or event") from None

    def seal_token(self, plaintext: bytes, aad: bytes, nonces: CommandNonces | None = None) -> str:
        """`seal` as the text "v1:KEYID:BASE64"."""
        ct = self.seal(plaintext, aad, nonces)
        return f"{FORMAT}:{ct.key_id}:{base64.b64encode(ct.blob).decode('ascii')}"

    def open_token(self, token: Any, aad: bytes, what: str) -> bytes:
        """`open` of a `seal_token` text; DecryptionFailed for anything malformed."""
        return self.open(parse_token(token, what), aad, what)


def parse_token(token: Any, what: str) -> Ciphertext:
    """The Ciphertext of a "v1:KEYID:BASE64" text; DecryptionFailed when it is not one."""
    parts = token.split(":", 2) if isinstance(token, str) else ()
    if len(parts) == 3 and parts[0] == FORMAT:
        try:
            blob = binascii.a2b_base64(parts[2], strict_mode=True)
        except (binascii.Error, ValueError):
            blob = b""
        if len(blob) > NONCE_BYTES + 16:
            return Ciphertext(parts[1], blob)
    raise DecryptionFailed(f"{what} is not a well-formed ciphertext", reason="CIPHERTEXT_MALFORMED")


def is_sealed(value: Any) -> bool:
    """Whether a stored attribute value is sealed (an object: no attribute value is one)."""
    return type(value) is dict


def key_id_of(value: Any) -> str:
    """The key id a sealed value names ("" when it is malformed)."""
    token = value.get(SEALED) if type(value) is dict else None
    parts = token.split(":", 2) if isinstance(token, str) else ()
    return parts[1] if len(parts) == 3 else ""


def _what(customer_uuid: str, name: str) -> str:
    return f"attribute {name} of customer {customer_uuid or '(none)'}"


class Sealer:
    """The blueprint's sensitive attributes under one key ring: how the store seals them and reads them back.

    `names`: the attributes declared `sensitive = true`. `active`: there is something to seal (a key and a
    sensitive attribute); without a key (`[server] insecure`), values are stored in clear. `nonces`: None, random
    nonces; else this sealer belongs to one replicated command's apply (`for_command`) and derives them.
    """

    __slots__ = ("ring", "names", "_names", "active", "nonces")

    def __init__(self, ring: KeyRing, sensitive: Iterable[str], nonces: CommandNonces | None = None) -> None:
        self.ring = ring
        self.names = tuple(sorted(sensitive))
        self._names = frozenset(self.names)
        self.active = ring.enabled and bool(self.names)
        self.nonces = nonces

    @classmethod
    def from_settings(cls, settings: Settings) -> Sealer:
        return cls(KeyRing(settings.encryption.keys),
                   (name for name, spec in settings.attributes.items() if spec.sensitive))

    def sensitive(self, name: str) -> bool:
        return name in self._names

    def for_command(self, identity: bytes) -> Sealer:
        """This sealer for the apply of one replicated command (resolver.nonces.command_identity): what it seals
        is the same bytes on every node that applies the command. Itself when there is nothing to seal."""
        if not self.active:
            return self
        return Sealer(self.ring, self.names, self.ring.command_nonces(identity))

    # -- one value -------------------------------------------------------------------------------------------
    def seal_value(self, customer_uuid: str, name: str, value: Any) -> Any:
        """The stored form of a sensitive attribute's value (None and sealed values are kept as they are)."""
        if value is None or type(value) is dict or not self.ring.enabled:
            return value
        return {SEALED: self.ring.seal_token(orjson.dumps(value), attribute_aad(customer_uuid, name), self.nonces)}

    def open_value(self, customer_uuid: str, name: str, value: Any) -> Any:
        """The plaintext of a stored value (a clear one as it is); DecryptionFailed when it cannot be opened."""
        if type(value) is not dict:
            return value
        what = _what(customer_uuid, name)
        return orjson.loads(self.ring.open_token(value.get(SEALED), attribute_aad(customer_uuid, name), what))

    # -- attribute maps ----------------------------------------------------------------------------------------
    def sealed(self, customer_uuid: str, attributes: Mapping[str, Any]) -> Mapping[str, Any]:
        """`attributes` with every sensitive value sealed (`attributes` itself when there is nothing to seal)."""
        if not self.active:
            return attributes
        out: dict[str, Any] | None = None
        for name in self.names:
            value = attributes.get(name)
            if value is not None and type(value) is not dict:
                if out is None:
                    out = dict(attributes)
                out[name] = self.seal_value(customer_uuid, name, value)
        return attributes if out is None else out

    def open_all(self, customer_uuid: str, attributes: dict[str, Any]) -> dict[str, Any]:
        """Open every sealed value of `attributes` in place (also of an attribute no longer declared sensitive);
        returns `attributes`."""
        for name, value in attributes.items():
            if type(value) is dict:
                attributes[name] = self.open_value(customer_uuid, name, value)
        return attributes

    def reveal(self, customer_uuid: str, attributes: dict[str, Any], names: Iterable[str],
               visible: bool) -> dict[str, Any]:
        """What a reader is shown of the sensitive attributes `names` among `attributes` (a dict of its own, edited
        in place and returned): opened when `visible`, else left out."""
        for name in names:
            value = attributes.get(name)
            if value is None:
                continue
            if visible:
                attributes[name] = self.open_value(customer_uuid, name, value)
            else:
                del attributes[name]
        return attributes

    # -- records -----------------------------------------------------------------------------------------------
    def encode_record(self, rec: Record) -> bytes:
        """`rec.encode()` with its sensitive values sealed under the record's uuid."""
        sealed = self.sealed(rec.uuid, rec.attributes)
        if sealed is rec.attributes:
            return rec.encode()
        d = rec.to_json()
        d["attributes"] = sealed
        return encode_json(d)

    def record_json(self, d: dict[str, Any]) -> dict[str, Any]:
        """A record's JSON form (`Record.to_json`) with its sensitive values sealed (the merge journal)."""
        sealed = self.sealed(d["uuid"], d["attributes"])
        return d if sealed is d["attributes"] else {**d, "attributes": sealed}

    def decode_record(self, raw: bytes) -> Record:
        """The stored record with every value opened."""
        rec = Record.decode(raw)
        self.open_all(rec.uuid, rec.attributes)
        return rec

    def open_record(self, rec: Record) -> Record:
        """`rec` (decoded as stored) with every value opened, in place."""
        self.open_all(rec.uuid, rec.attributes)
        return rec

    # -- change log and merge journal -----------------------------------------------------------------------
    def seal_change(self, change: dict[str, Any]) -> dict[str, Any]:
        """A change-log entry with the sensitive values it copies sealed under its customer: `attributes`,
        `attributes_old` and the values of an event's `conflicts` (`change` itself when there are none)."""
        if not self.active:
            return change
        customer = change.get("customer_uuid") or ""
        out = change
        for key in ("attributes", "attributes_old"):
            values = change.get(key)
            if values:
                sealed = self.sealed(customer, values)
                if sealed is not values:
                    out = {**out, key: sealed}
        conflicts = change.get("conflicts")
        if conflicts and any(c.get("field") in self._names for c in conflicts):
            out = {**out, "conflicts": [self._seal_conflict(customer, c) for c in conflicts]}
        return out

    def _seal_conflict(self, customer: str, conflict: dict[str, Any]) -> dict[str, Any]:
        name = conflict.get("field")
        if name not in self._names:
            return conflict
        return {**conflict, "expected_old": self.seal_value(customer, name, conflict.get("expected_old")),
                "stored": self.seal_value(customer, name, conflict.get("stored"))}

    def seal_journal(self, entry: dict[str, Any]) -> dict[str, Any]:
        """A merge journal entry with the records it keeps sealed, each under its own uuid."""
        if not self.active:
            return entry
        return {**entry, "survivor_before": self.record_json(entry["survivor_before"]),
                "merged": [self.record_json(m) for m in entry["merged"]]}

