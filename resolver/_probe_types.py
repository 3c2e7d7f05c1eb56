"""The probe loop's vocabulary, written once: read by its twin (resolver/_probe_py.py), by the compiled module
(ext/_probe_c.pyx, which types the numbers as C ints) and by the Resolve use case.

Both implementations answer with these types, except that the compiled module's Decision is its own cdef class
with the same fields and the same tuple behaviour (built on every call: see ext/_probe_c.pyx).
"""

from __future__ import annotations

from typing import NamedTuple

from resolver.normalize import Kind

# Identifier kinds, as plain ints (the loop compares them; resolver.normalize.Kind is the proto's MatchKind).
EXTERNAL_ID, EMAIL, PHONE = int(Kind.EXTERNAL_ID), int(Kind.EMAIL), int(Kind.PHONE)
# Probe states: the proto's ProbeResult numbers.
HIT, MISS, SHARED, FAN_OUT, NOT_PROBED = 1, 2, 3, 4, 5
# Decision outcomes.
NOT_FOUND, MATCHED, AMBIGUOUS = 0, 1, 2


class Probed(NamedTuple):
    """What one index probe found (`Prober.probe`)."""

    entries: int  # index entries under the identifier's key
    uuids: list[bytes]  # the customers confirmed to hold it, in key order; empty when `entries` passed the limit


class Fanned(NamedTuple):
    """An identifier held by more customers than the fan-out limit: skipped, never decides."""

    kind: int
    value: str
    entries: int


class ProbeRow(NamedTuple):
    """One line of an explained decision: what probing one identifier found."""

    kind: int
    value: str
    state: int  # HIT | MISS | SHARED | FAN_OUT | NOT_PROBED
    hits: int  # confirmed holders; the index entries when FAN_OUT; 0 when NOT_PROBED


class Decision(NamedTuple):
    """Contract §3's decision for one normalized identifier set (`Prober.decide`)."""

    outcome: int  # NOT_FOUND | MATCHED | AMBIGUOUS
    kind: int  # the deciding kind, 0 when NOT_FOUND
    # Tuples, not lists: a batch makes one Decision per request, and tuples of plain values (an empty one is
    # shared) leave nothing for the cyclic collector to walk.
    uuids: tuple[bytes, ...]  # the match (one uuid) or the candidates, in probe order
    conflicts: tuple[bytes, ...]  # MATCHED: customers that lower kinds point at instead
    fanned: tuple[Fanned, ...]
    probes: tuple[ProbeRow, ...]  # only when explain was asked, else ()
