"""The servicer's methods for WatchChanges, the change feed (contract §7; resolver.feed): a mixin of
resolver.api.servicer.IdentityResolverServicer, which provides `service`, `_call` and the rest."""

from __future__ import annotations


class FeedRpcs:
    """Mixed into IdentityResolverServicer."""
