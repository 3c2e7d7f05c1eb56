"""Resolve on the wire: ResolveRequest bytes -> ResolveInput, ResolveResult -> ResolveResponse bytes.

Pure-Python twin of ext/_rwire_c.pyx, and its readable specification: the protobuf library does the wire work
here, so what this module answers is by definition what protobuf answers. The compiled module decodes and
encodes the bytes by hand and must give the same ResolveInput (or None, see `decode_resolve`) and bytes that
parse to the same ResolveResponse (tests/unit/test_rwire.py compares them, and both with protobuf).

The proto <-> domain mapping of Resolve lives here, once (resolver.api.servicer imports it): `resolve_input`
and `resolve_response` are also what ResolveStream and the general decoding path use.
"""

from __future__ import annotations

from google.protobuf.message import DecodeError

from resolver.identifiers import RawIdentifiers, Skipped
from resolver.resolve import ResolveInput, ResolveResult
from resolver.v1 import resolver_pb2 as pb

OUTCOMES = {"MATCHED": pb.OUTCOME_MATCHED, "AMBIGUOUS": pb.OUTCOME_AMBIGUOUS, "NOT_FOUND": pb.OUTCOME_NOT_FOUND}


def raw_identifiers(msg: pb.Identifiers) -> RawIdentifiers:
    """An Identifiers message as the caller sent it."""
    # an empty repeated field is not copied: tuple() over a protobuf container costs ~0.6 µs even when empty
    return RawIdentifiers(msg.external_id, tuple(msg.emails) if msg.emails else (),
                          tuple(msg.phones) if msg.phones else ())


def skipped_pb(items: list[Skipped] | tuple[Skipped, ...]) -> list[pb.SkippedIdentifier]:
    """Skipped identifiers as SkippedIdentifier messages, in order."""
    return [
        pb.SkippedIdentifier(kind=pb.MatchKind.ValueType(s.kind.value), masked_value=s.masked, reason=s.reason,
                             detail=s.detail)
        for s in items
    ]


def resolve_input(req: pb.ResolveRequest) -> ResolveInput:
    """A decoded ResolveRequest as the Resolve use case takes it."""
    return ResolveInput(
        identifiers=raw_identifiers(req.identifiers),
        default_region=req.default_region,
        fields=tuple(req.fields) if req.fields else (),
        view=req.view,
        explain=req.explain,
        min_sequence=req.min_sequence,
    )


def resolve_response(r: ResolveResult) -> pb.ResolveResponse:
    """A Resolve answer as a ResolveResponse message (attributes through Struct.update)."""
    # Built in place and only with what is there: this runs on every Resolve (about half the cost of the
    # keyword-argument form with empty lists and a separately built Struct).
    resp = pb.ResolveResponse(
        outcome=OUTCOMES[r.outcome],
        customer_uuid=r.customer_uuid,
        matched_on=pb.MatchKind.ValueType(r.matched_on.value if r.matched_on is not None else 0),
        version=r.version,
    )
    if r.attributes:
        resp.attributes.update(r.attributes)
    for c in r.candidates:
        candidate = resp.candidates.add(customer_uuid=c.customer_uuid)
        if c.attributes:
            candidate.attributes.update(c.attributes)
    if r.conflicts:
        resp.conflicts.extend(r.conflicts)
    for p in r.probes:
        resp.probes.add(kind=pb.MatchKind.ValueType(p.kind.value), masked_value=p.masked,
                        result=pb.ProbeResult.ValueType(p.result), hits=p.hits)
    if r.skipped:
        resp.skipped.extend(skipped_pb(r.skipped))
    return resp


def decode_resolve(data: bytes, max_size: int) -> ResolveInput | None:
    """`resolve_input` of the ResolveRequest `data` holds; None when the caller must take the general path.

    None: `data` is longer than `max_size` bytes (the caller passes the size below which no `[limits]` key can
    be broken, so a value returned needs no limit check), or it is not a valid ResolveRequest (corrupt,
    truncated, invalid UTF-8 in a string). The compiled twin may answer None in more cases, never otherwise.
    """
    if len(data) > max_size:
        return None
    try:
        req = pb.ResolveRequest.FromString(data)
    except (DecodeError, RuntimeError, ValueError):  # what resolver.api.wire.Decoder treats as undecodable
        return None
    return resolve_input(req)


def encode_resolve(r: ResolveResult) -> bytes:
    """The serialized ResolveResponse for `r` (`resolve_response(r)`), or the exception building it raises."""
    return resolve_response(r).SerializeToString()
