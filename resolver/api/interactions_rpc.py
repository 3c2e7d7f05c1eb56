"""The servicer's methods for RecordInteraction and ListInteractions (contract §7; resolver.interactions): a mixin of
resolver.api.servicer.IdentityResolverServicer, which provides `service`, `_call` and the rest."""

from __future__ import annotations


class InteractionRpcs:
    """Mixed into IdentityResolverServicer."""
