"""Bearer tokens with scopes: the tokens file, the set a server checks calls against, `resolver token new`.

The tokens file (`[auth] tokens_file`) holds one token per line, `NAME SCOPES sha256:HEX`: a name (logged as the
caller), scopes comma-separated from resolver.api.caller.SCOPES, and the SHA-256 of the token in hex, never the
token. `#` starts a comment; blank lines are ignored. Several tokens are valid at once, so a token is rotated by
adding the new line, moving the clients over, then removing the old line; each change takes effect on SIGHUP
(TokenSet.reload, through resolver.reload) without a restart.

A bad file is refused whole, with every bad line named (line number and what is wrong; a hash is never echoed in
full, a field that may be a token never at all): at start-up the server does not start, on reload the previous set
stays in force.
"""

from __future__ import annotations

import argparse
import hashlib
import re
import secrets
import sys
from dataclasses import dataclass
from pathlib import Path

from resolver.api.caller import SCOPES, Caller
from resolver.errors import ConfigError

TOKEN_PREFIX = "rsv_"  # recognisable in a leaked config or a secret scanner; part of the token, and of its hash
HASH_PREFIX = "sha256:"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")  # no '@' or '+': a caller's name is logged, never PII
_HEX = re.compile(r"[0-9A-Fa-f]{64}")
_SCOPE_WORD = re.compile(r"[a-z]{1,16}")  # an unknown scope is named only if it cannot be a pasted token


def digest(token: str) -> bytes:
    """The SHA-256 of a token, as the tokens file holds it (in hex)."""
    return hashlib.sha256(token.encode()).digest()


@dataclass(frozen=True, slots=True)
class NewToken:
    """A fresh token (shown once, stored nowhere) and the tokens-file line that admits it."""

    token: str
    line: str


def new_token(name: str, scopes: str) -> NewToken:
    """A random token (`rsv_` + 32 random bytes, URL-safe) for `name` with `scopes` ("resolve,write").
    ConfigError if the name or a scope is not valid (the same rules as the tokens file)."""
    problems = _name_problems(name) + _scope_problems(scopes)
    if problems:
        raise ConfigError(problems)
    token = TOKEN_PREFIX + secrets.token_urlsafe(32)
    held = set(scopes.split(","))
    return NewToken(token, f"{name} {','.join(s for s in SCOPES if s in held)} {HASH_PREFIX}{digest(token).hex()}")


def parse_tokens(text: str, source: str) -> dict[bytes, Caller]:
    """The callers a tokens file admits, by the SHA-256 digest of their token.

    ConfigError lists every problem, each as `SOURCE line N: what is wrong`: a line that is not three fields, a
    bad name or scope, a hash that is not `sha256:` and 64 hex digits, a name or token given twice, no token at
    all (an empty file would refuse every call: more likely a mistake, such as a file caught half-written)."""
    callers: dict[bytes, Caller] = {}
    lines_of_names: dict[str, int] = {}
    lines_of_digests: dict[bytes, int] = {}
    problems: list[str] = []
    for number, raw in enumerate(text.splitlines(), start=1):
        fields = raw.split("#", 1)[0].split()
        if not fields:
            continue
        where = f"{source} line {number}"
        if len(fields) != 3:
            # the fields are not echoed: a line of one field may well be a token pasted by mistake
            problems.append(f"{where}: expected NAME SCOPES sha256:HEX (3 fields), got {len(fields)} field(s)")
            continue
        name, scopes, hashed = fields
        line_problems = _name_problems(name) + _scope_problems(scopes) + _hash_problems(hashed)
        problems.extend(f"{where}: {p}" for p in line_problems)
        if line_problems:
            continue
        key = bytes.fromhex(hashed[len(HASH_PREFIX):])
        if name in lines_of_names:
            problems.append(f"{where}: the name {name!r} is already given on line {lines_of_names[name]}")
            continue
        if key in lines_of_digests:
            problems.append(f"{where}: the same token ({HASH_PREFIX}{key.hex()[:8]}...) is already given on line "
                            f"{lines_of_digests[key]}")
            continue
        lines_of_names[name], lines_of_digests[key] = number, number
        callers[key] = Caller(name, frozenset(scopes.split(",")))
    if not callers and not problems:
        problems.append(f"{source}: no token in it (every call would be refused): one `NAME SCOPES sha256:HEX` "
                        f"line per token, from `resolver token new`")
    if problems:
        raise ConfigError(problems)
    return callers


def _name_problems(name: str) -> list[str]:
    if _NAME.fullmatch(name):
        return []
    return [f"the name ({len(name)} characters) must be 1 to 64 letters, digits, '.', '_' or '-', starting with a "
            f"letter or digit"]


def _scope_problems(scopes: str) -> list[str]:
    problems = []
    for index, scope in enumerate(scopes.split(","), start=1):
        if scope in SCOPES:
            continue
        named = repr(scope) if _SCOPE_WORD.fullmatch(scope) else f"number {index} ({len(scope)} characters)"
        problems.append(f"unknown scope {named}: scopes are comma-separated from {', '.join(SCOPES)}")
    return problems


def _hash_problems(hashed: str) -> list[str]:
    if hashed.startswith(HASH_PREFIX) and _HEX.fullmatch(hashed[len(HASH_PREFIX):]):
        return []
    if hashed.startswith(TOKEN_PREFIX):
        return ["the third field is a token itself: the file holds its hash, never the token (`resolver token new` "
                "prints the line to add)"]
    return [f"the third field ({len(hashed)} characters) must be {HASH_PREFIX} and the 64 hex digits of the "
            f"token's SHA-256"]


class TokenSet:
    """The tokens a server admits, read from the tokens file; `check` a presented token, `reload` on SIGHUP.

    Checking hashes the presented token with SHA-256 and looks the digest up in a dict. That is constant-time
    enough: the lookup's timing depends only on the digest of what the client sent, and steering that digest
    towards a stored one (to learn it byte by byte from early-exit comparisons) would take SHA-256 preimages;
    nothing an attacker measures tells them anything about a stored hash, let alone a token. Comparing against
    every entry with hmac.compare_digest buys nothing on top, and costs a pass over the file per call.

    A reload builds the new dict aside and swaps it in with one assignment: a call checks against the old set or
    the new one, never a mix; a bad file raises (ConfigError, every bad line named) and the old set stays.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.what = f"tokens file {self.path}"
        self._callers = self._read()

    def check(self, token: str) -> Caller | None:
        """The caller `token` belongs to, None if it is no token of the file."""
        return self._callers.get(digest(token))

    @property
    def names(self) -> tuple[str, ...]:
        """The names of the tokens admitted now (the order of the file)."""
        return tuple(c.name for c in self._callers.values())

    def reload(self) -> None:
        """Read the file again and admit its tokens from now on; on a bad file, raise with the reason and keep
        admitting the previous ones."""
        self._callers = self._read()

    def _read(self) -> dict[bytes, Caller]:
        try:
            text = self.path.read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError([f"{self.what}: cannot read it: {exc.strerror or exc}"]) from None
        except UnicodeDecodeError:
            raise ConfigError([f"{self.what}: not UTF-8 text"]) from None
        return parse_tokens(text, self.what)


def add_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add `token new NAME --scopes ...` to the command line's subparsers."""
    p = sub.add_parser("token", help="bearer tokens for [auth] tokens_file")
    commands = p.add_subparsers(dest="token_command", required=True)
    new = commands.add_parser("new", help="print a fresh random token (once) and the tokens-file line that admits it")
    new.add_argument("name", help="the token's name (logged as the caller of its calls)")
    new.add_argument("--scopes", required=True, metavar="SCOPE,...",
                     help=f"comma-separated, from {', '.join(SCOPES)}")


def run_token(args: argparse.Namespace) -> int:
    """`resolver token new`: the token on the first line of stdout, the tokens-file line on the second; what to
    do with them on stderr. Exit 2 on a bad name or scope."""
    try:
        made = new_token(args.name, args.scopes)
    except ConfigError as exc:
        print("resolver: " + "; ".join(exc.problems), file=sys.stderr)
        return 2
    print(made.token)
    print(made.line)
    print("resolver: the first line is the token, shown this once and stored nowhere: hand it to the client "
          "(authorization: Bearer TOKEN). Add the second line to the tokens file, then send SIGHUP to the server.",
          file=sys.stderr)
    return 0
