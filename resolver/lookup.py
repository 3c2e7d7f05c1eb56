"""`resolver lookup`: ask a running server who a caller is, from a shell, and print the answer as JSON.

One Resolve through resolver.client.ResolverClient (one connection, no spreading over workers: one call), over TLS
when `--ca-file` names the CA that signed the server's certificate (`--client-cert` + `--client-key` for mTLS).
The bearer token comes from `--token-file` or the environment variable RESOLVER_TOKEN, never from the command line:
an argument shows in `ps` and in the shell's history.

Masked by default: the identifiers asked about and every attribute value (the answer's and each candidate's) go
through the project's one masking rule (resolver.normalize.mask / mask_value); probe and skipped values come
masked from the server already, and every text of the answer or of an error passes resolver.redact on top.
`--reveal` prints the identifiers and attribute values as they are, and only for a token the *server* grants the
admin scope: before resolving, the command makes one admin-only call (GetOutboundCounters: read-only, and served
whatever the blueprint enables) with that token and refuses to go on unless it succeeds. A server without
`[auth]` grants every scope to every caller (it listens on loopback only, unless the blueprint says `[server]
insecure = true`), so there `--reveal` needs no token. Probe values stay masked even with `--reveal` (the server
never sends them in clear), and sensitive attributes come only to a token with the `sensitive` scope.

Exit status: 0 MATCHED; 1 NOT_FOUND or AMBIGUOUS (the JSON's `outcome` says which); 2 an error: the gRPC
status with its google.rpc.Status details (masked) as JSON on stdout and one sentence on stderr, or a local
problem (a token or certificate file that cannot be read).
"""

from __future__ import annotations

import argparse
import json
import secrets
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from resolver.errors import ConfigError
from resolver.normalize import Kind, mask, mask_value
from resolver.redact import redact

if TYPE_CHECKING:  # gRPC is loaded when a lookup runs, not when the command line is parsed
    import grpc

    from resolver.v1 import resolver_pb2 as pb

TOKEN_ENV = "RESOLVER_TOKEN"
DEFAULT_TARGET = "127.0.0.1:50051"
EXIT_MATCHED, EXIT_UNMATCHED, EXIT_ERROR = 0, 1, 2
REQUEST_ID = "x-request-id"
ADMIN_CHECK = "GetOutboundCounters"  # admin-only (resolver.api.interceptors.METHOD_SCOPES), read-only, always served


def add_parser(sub: Any) -> None:
    """The `lookup` subcommand of `resolver` (`sub`: the command line's subparsers)."""
    p = sub.add_parser("lookup", help="ask a running server who a caller is (Resolve); the answer as JSON, masked")
    p.add_argument("--target", metavar="HOST:PORT", default=DEFAULT_TARGET,
                   help=f"the server's address (default: {DEFAULT_TARGET})")
    p.add_argument("--phone", action="append", default=[], metavar="P", help="a phone number (repeatable)")
    p.add_argument("--email", action="append", default=[], metavar="E", help="an email address (repeatable)")
    p.add_argument("--external-id", default="", metavar="X", help="the CRM record id")
    p.add_argument("--region", default="", metavar="CC", help="region for national phone numbers (default: the "
                                                               "server's)")
    p.add_argument("--explain", action="store_true", help="list each probe the server made")
    shown = p.add_mutually_exclusive_group()
    shown.add_argument("--view", default="", metavar="V", help="a named view of the blueprint")
    shown.add_argument("--field", action="append", default=[], metavar="F", help="an attribute to return (repeatable)")
    p.add_argument("--token-file", metavar="FILE",
                   help=f"file holding the bearer token (default: the environment variable {TOKEN_ENV})")
    p.add_argument("--ca-file", metavar="FILE", help="PEM CA of the server's certificate: connect over TLS")
    p.add_argument("--client-cert", metavar="FILE", help="PEM client certificate, for a server that asks for one")
    p.add_argument("--client-key", metavar="FILE", help="PEM key of --client-cert")
    p.add_argument("--reveal", action="store_true",
                   help="print identifiers and attribute values unmasked (the token must hold the admin scope)")
    p.add_argument("--timeout", type=float, default=5.0, metavar="S", help="deadline of each call in seconds")


@dataclass(frozen=True, slots=True)
class Query:
    """What is asked: the identifiers as typed, and how the answer is shaped."""

    external_id: str
    emails: tuple[str, ...]
    phones: tuple[str, ...]
    region: str
    fields: tuple[str, ...]
    view: str
    explain: bool

    def shown(self, reveal: bool) -> dict[str, Any]:
        """The identifiers asked about, for the output: as typed with `reveal`, else masked."""
        if reveal:
            return {"external_id": self.external_id, "emails": list(self.emails), "phones": list(self.phones)}
        return {"external_id": mask_value(self.external_id) if self.external_id else "",
                "emails": [mask(Kind.EMAIL, e) for e in self.emails],
                "phones": [mask(Kind.PHONE, p) for p in self.phones]}


@dataclass(frozen=True, slots=True)
class Connection:
    """How to reach the server: address, token ("" for none) and TLS material (PEM bytes; None: plaintext)."""

    target: str
    token: str
    root_certificates: bytes | None
    client_cert: bytes | None
    client_key: bytes | None


def run_lookup(args: argparse.Namespace, environ: Mapping[str, str]) -> int:
    """`resolver lookup`: print the answer (or the error) as JSON on stdout; the exit status as the module says.
    ConfigError for a token, certificate or key file that cannot be read (the CLI prints it, exit 2)."""
    query = Query(args.external_id, tuple(args.email), tuple(args.phone), args.region, tuple(args.field), args.view,
                  args.explain)
    if not (query.external_id or query.emails or query.phones):
        print("resolver lookup: nothing to look up: give --phone, --email or --external-id", file=sys.stderr)
        return EXIT_ERROR
    connection = Connection(args.target, read_token(args.token_file, environ), _read(args.ca_file, "--ca-file"),
                            _read(args.client_cert, "--client-cert"), _read(args.client_key, "--client-key"))
    if (connection.client_cert is None) != (connection.client_key is None):
        raise ConfigError(["--client-cert and --client-key go together"])
    result = lookup(connection, query, reveal=args.reveal, timeout=args.timeout)
    print(json.dumps(result.document, indent=2, ensure_ascii=False))
    if result.complaint:
        print(f"resolver lookup: {result.complaint}", file=sys.stderr)
    return result.exit_code


@dataclass(frozen=True, slots=True)
class LookupResult:
    """What `lookup` prints: the JSON document, the exit status, and a sentence for stderr ("" for none)."""

    document: dict[str, Any]
    exit_code: int
    complaint: str = ""


def lookup(connection: Connection, query: Query, *, reveal: bool, timeout: float) -> LookupResult:
    """Resolve `query` on the server (after the admin check when `reveal`); never raises for a gRPC error."""
    import grpc

    from resolver.client import ResolverClient
    from resolver.v1 import resolver_pb2 as pb

    request_id = "lookup-" + secrets.token_hex(6)  # sent, so that the server's access line can be found
    with ResolverClient(connection.target, spread=False, token=connection.token,
                        root_certificates=connection.root_certificates, client_cert=connection.client_cert,
                        client_key=connection.client_key, metadata=((REQUEST_ID, request_id),),
                        resolve_timeout=timeout) as client:
        if reveal:  # the server decides who may see values: one admin-only call with the same token
            try:
                client.stub.GetOutboundCounters(pb.GetOutboundCountersRequest(), timeout=timeout,
                                                metadata=client.metadata)
            except grpc.RpcError as exc:
                return failure(exc, request_id, refused_reveal=exc.code() == grpc.StatusCode.PERMISSION_DENIED)
        try:
            response = client.resolve(external_id=query.external_id, emails=query.emails, phones=query.phones,
                                      default_region=query.region, fields=query.fields, view=query.view,
                                      explain=query.explain)
        except grpc.RpcError as exc:
            return failure(exc, request_id)
    document = answer(response, query, reveal=reveal)
    document["request_id"] = request_id
    outcome = document["outcome"]
    code = EXIT_MATCHED if outcome == "MATCHED" else EXIT_UNMATCHED if outcome in ("NOT_FOUND", "AMBIGUOUS") \
        else EXIT_ERROR
    return LookupResult(document, code, "" if code != EXIT_ERROR else f"the server answered outcome {outcome}")


def answer(response: pb.ResolveResponse, query: Query, *, reveal: bool) -> dict[str, Any]:
    """The JSON form of a ResolveResponse (enum names without their prefixes, Structs as objects): attribute
    values masked unless `reveal`; the server's masked values and texts pass resolver.redact."""
    from google.protobuf import json_format

    from resolver.v1 import resolver_pb2 as pb

    def attrs(struct: Any) -> dict[str, Any]:
        values = json_format.MessageToDict(struct)
        return values if reveal else {name: mask_value(v) for name, v in values.items()}

    return {
        "outcome": _name(pb.Outcome.Name(response.outcome), "OUTCOME_"),
        "customer_uuid": response.customer_uuid,
        "matched_on": _name(pb.MatchKind.Name(response.matched_on), "MATCH_KIND_"),
        "version": response.version,
        "attributes": attrs(response.attributes),
        "candidates": [{"customer_uuid": c.customer_uuid, "attributes": attrs(c.attributes)}
                       for c in response.candidates],
        "conflicts": list(response.conflicts),
        "probes": [{"kind": _name(pb.MatchKind.Name(p.kind), "MATCH_KIND_"), "value": redact(p.masked_value),
                    "result": _name(pb.ProbeResult.Name(p.result), "PROBE_RESULT_"), "hits": p.hits}
                   for p in response.probes],
        "skipped": [{"kind": _name(pb.MatchKind.Name(s.kind), "MATCH_KIND_"), "value": redact(s.masked_value),
                     "reason": s.reason, "detail": redact(s.detail)} for s in response.skipped],
        "query": query.shown(reveal),
        "revealed": reveal,
    }


def failure(exc: grpc.RpcError, request_id: str, refused_reveal: bool = False) -> LookupResult:
    """The JSON form of a failed call (code, message and google.rpc.Status details, every text redacted), and the
    sentence for stderr; `refused_reveal`: the admin check failed, which is said in so many words."""
    from google.protobuf import json_format
    from google.rpc import error_details_pb2  # noqa: F401  (registers the detail types MessageToDict unpacks)
    from grpc_status import rpc_status

    status = rpc_status.from_call(exc)  # a failed unary call is also its grpc.Call
    details = [_redacted(json_format.MessageToDict(d)) for d in status.details] if status is not None else []
    trailing = dict(exc.trailing_metadata() or ())
    code = exc.code().name
    message = redact(exc.details() or "")
    error: dict[str, Any] = {"code": code, "message": message, "details": details}
    document = {"error": error, "request_id": trailing.get(REQUEST_ID, request_id)}
    if refused_reveal:
        error["refused"] = "--reveal"
        return LookupResult(document, EXIT_ERROR,
                            "--reveal needs a token with the admin scope, and the server refused this token an admin "
                            f"call ({ADMIN_CHECK}: {code}); nothing was looked up")
    return LookupResult(document, EXIT_ERROR, f"{code}: {message}")


def read_token(path: str | None, environ: Mapping[str, str]) -> str:
    """The bearer token: the first line of the file at `path`, else the environment's RESOLVER_TOKEN, else "".
    ConfigError if the file cannot be read or holds no token (its content is never echoed)."""
    if path is None:
        return environ.get(TOKEN_ENV, "").strip()
    raw = _read(path, "--token-file")
    token = (raw or b"").decode("utf-8", "replace").strip().splitlines()
    if not token or not token[0].strip():
        raise ConfigError([f"--token-file {path} holds no token"])
    return token[0].strip()


def _read(path: str | None, option: str) -> bytes | None:
    if path is None:
        return None
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError([f"{option} {path}: cannot read it: {exc.strerror}"]) from None


def _name(full: str, prefix: str) -> str | None:
    """An enum value's name without its prefix ("OUTCOME_MATCHED" -> "MATCHED"); None for *_UNSPECIFIED."""
    name = full.removeprefix(prefix)
    return None if name == "UNSPECIFIED" else name


def _redacted(value: Any) -> Any:
    """`value` (JSON: dicts, lists, scalars) with every string passed through resolver.redact."""
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, list):
        return [_redacted(v) for v in value]
    if isinstance(value, dict):
        return {k: _redacted(v) for k, v in value.items()}
    return value
