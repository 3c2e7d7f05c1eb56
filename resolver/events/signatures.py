"""Standard Webhooks authenticity: HMAC-SHA256 over `id.timestamp.body`, several secrets, constant time.

https://www.standardwebhooks.com: headers `webhook-id`, `webhook-timestamp` (Unix seconds) and
`webhook-signature` ("v1,<base64>" entries separated by spaces, so a sender can sign with an old and a new
secret during rotation).

`SourceSecrets` holds the secrets each source is checked with, and swaps them on SIGHUP (resolver.reload).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import logging
from collections.abc import Mapping, Sequence

from resolver.config import Settings, load_settings
from resolver.errors import ConfigError, Unauthenticated
from resolver.redact import redact as redact_text

log = logging.getLogger("resolver.events.signatures")

MAX_ID_LENGTH = 255
SIGNATURE_HEADERS = ("webhook-signature",)


def sign(secret: bytes, webhook_id: str, timestamp: int, body: bytes) -> str:
    """The `webhook-signature` value ("v1,<base64>") for a body: for senders and tests."""
    mac = hmac.new(secret, f"{webhook_id}.{timestamp}.".encode() + body, hashlib.sha256).digest()
    return "v1," + base64.b64encode(mac).decode("ascii")


def verify(headers: Mapping[str, str], body: bytes, secrets: Sequence[bytes], now_s: float,
           tolerance_s: float) -> str:
    """The webhook-id of a correctly signed, fresh request; Unauthenticated otherwise (header names lower-case)."""
    webhook_id = headers.get("webhook-id", "")
    stamp = headers.get("webhook-timestamp", "")
    signature = headers.get("webhook-signature", "")
    missing = [h for h, v in (("webhook-id", webhook_id), ("webhook-timestamp", stamp),
                              ("webhook-signature", signature)) if not v]
    if missing:
        raise Unauthenticated(f"missing header(s): {', '.join(missing)}")
    if len(webhook_id) > MAX_ID_LENGTH or not webhook_id.isprintable():
        raise Unauthenticated("webhook-id: at most 255 printable characters")
    try:
        timestamp = int(stamp)
    except ValueError:
        raise Unauthenticated("webhook-timestamp: not an integer number of seconds") from None
    if not now_s - tolerance_s <= timestamp <= now_s + tolerance_s:  # exact: no float holds a 309-digit int
        raise Unauthenticated(f"webhook-timestamp is more than {tolerance_s:g}s from the server's clock")
    if not secrets:
        raise Unauthenticated("no secret is configured for this source")
    signed = f"{webhook_id}.{timestamp}.".encode() + body
    expected = [base64.b64encode(hmac.new(s, signed, hashlib.sha256).digest()) for s in secrets]
    ok = False
    for entry in signature.split():
        version, _, value = entry.partition(",")
        if version != "v1":
            continue
        candidate = value.encode("ascii", "replace")
        for exp in expected:  # no early exit: the time taken does not say which secret matched
            ok |= hmac.compare_digest(candidate, exp)
    if not ok:
        raise Unauthenticated("no valid signature")
    return webhook_id


def redact(headers: Mapping[str, str]) -> dict[str, str]:
    """Headers to keep with a dead letter: signatures and credentials replaced by "[redacted]", every other value
    through the masking choke point (resolver.redact: a token or an address in any header)."""
    secret_like = {*SIGNATURE_HEADERS, "authorization", "cookie", "x-api-key"}
    return {k: ("[redacted]" if k in secret_like else redact_text(v)) for k, v in headers.items()}


class SourceSecrets:
    """The webhook secrets of each `[sources.*]`, as the signature check reads them (a Reloadable).

    `reload()` reads the blueprint again (`settings.blueprint_path`, with resolver.config.load_settings: the same
    validation as at start-up) and swaps in the secrets of every source it declares, all at once. A blueprint that
    no longer loads, or a secret that cannot be read (unless `[server] insecure = true`), fails the reload and
    the previous secrets stay. Only secrets change: a source added or removed needs a restart (logged). A secret
    given by environment variable keeps the value the server started with (its environment does not change); to
    rotate one without a restart, reference a file, or list the new variable beside the old one.
    """

    what = "the webhook secrets of [sources.*]"

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._by_source: Mapping[str, tuple[bytes, ...]] = {n: s.secrets for n, s in settings.sources.items()}

    def of(self, source: str) -> tuple[bytes, ...]:
        """The secrets a request from `source` may be signed with (empty: none usable, every request refused)."""
        return self._by_source.get(source, ())

    def reload(self) -> None:
        if self.settings.blueprint_path is None:
            return  # the built-in defaults declare no source
        fresh = load_settings(self.settings.blueprint_path).sources
        unresolved = [f"sources.{n}: {', '.join(s.unresolved)}" for n, s in fresh.items()
                      if s.unresolved and n in self._by_source]
        if unresolved and not self.settings.server.insecure:
            raise ConfigError([f"{u} cannot be read" for u in unresolved])
        changed = sorted(set(fresh) ^ set(self._by_source))
        if changed:
            log.warning("sources added or removed in the blueprint (%s) take effect at the next restart; only "
                        "secrets were reloaded", ", ".join(changed))
        self._by_source = {name: fresh[name].secrets if name in fresh else current
                           for name, current in self._by_source.items()}
