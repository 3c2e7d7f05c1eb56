"""The servicer's methods for the outbound dead-letter list and counters (contract §5b; resolver.outbound): a mixin of
resolver.api.servicer.IdentityResolverServicer, which provides `service`, `_call` and the rest."""

from __future__ import annotations


class OutboundRpcs:
    """Mixed into IdentityResolverServicer."""
