"""The tokens file, the token check, `resolver token new`, the scope table and the metadata an API call presents."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from resolver.api.caller import SCOPES
from resolver.api.interceptors import METHOD_SCOPES, REQUEST_ID, presented, scope_for
from resolver.auth import TOKEN_PREFIX, TokenSet, new_token, parse_tokens
from resolver.cli import main
from resolver.errors import ConfigError
from resolver.v1 import resolver_pb2 as pb


def sha(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def test_a_tokens_file_admits_each_token_with_its_scopes() -> None:
    text = (f"# who may call\n\n"
            f"crm-sync  write,resolve  sha256:{sha('one')}   # inline comment\n"
            f"\tops\tadmin,sensitive\tsha256:{sha('two').upper()}\n")
    callers = parse_tokens(text, "tokens")
    assert {c.name: c.scopes for c in callers.values()} == {"crm-sync": {"resolve", "write"},
                                                           "ops": {"admin", "sensitive"}}
    assert set(callers) == {hashlib.sha256(b"one").digest(), hashlib.sha256(b"two").digest()}


def test_every_bad_line_is_reported_with_its_number_and_never_a_hash_or_token_in_full() -> None:
    token = TOKEN_PREFIX + "A" * 43
    good = sha("good")
    lines = [
        f"alice resolve sha256:{good}",          # 1: fine
        token,                                   # 2: a token pasted alone: one field
        f"bob resolve sha256:{sha('b')} extra",  # 3: four fields
        f"c@rol resolve sha256:{sha('c')}",      # 4: a name that could be an email
        f"dave resolve,wirte sha256:{sha('d')}",  # 5: a misspelt scope
        f"erin {token} sha256:{sha('e')}",       # 6: a token in the scopes' place
        f"frank resolve {token}",                # 7: the token where its hash belongs
        f"gina resolve sha256:{sha('g')[:40]}",  # 8: a short hash
        f"hank resolve md5:{sha('h')}",          # 9: another algorithm
        f"alice write sha256:{sha('other')}",    # 10: a name given twice
        f"ivan resolve sha256:{good}",           # 11: a token given twice
        "",
        "# the end",
    ]
    with pytest.raises(ConfigError) as caught:
        parse_tokens("\n".join(lines), "tokens.txt")
    problems = caught.value.problems
    assert [int(p.split(" line ")[1].split(":")[0]) for p in problems] == [2, 3, 4, 5, 6, 7, 8, 9, 10, 11]
    assert all(p.startswith("tokens.txt line ") for p in problems)
    assert "'wirte'" in problems[3] and "'alice'" in problems[8] and "line 1" in problems[8]
    assert "a token itself" in problems[5]
    report = str(caught.value)
    assert token not in report and TOKEN_PREFIX not in report  # no token, nor a piece of one
    for line in lines:  # no hash in full, of any line, good or bad
        for field in line.split():
            if len(field) >= 40 and field != token:
                assert field.split(":")[-1] not in report


@pytest.mark.parametrize("text", ["", "\n\n", "# only a comment\n   # and another\n"])
def test_a_file_without_a_token_is_refused(text: str) -> None:
    with pytest.raises(ConfigError, match="no token in it"):
        parse_tokens(text, "tokens")


def test_check_admits_the_token_whose_sha256_is_listed_and_nothing_near_it(tmp_path: Path) -> None:
    path = tmp_path / "tokens"
    path.write_text(f"app resolve sha256:{sha('s3cret')}\n")
    tokens = TokenSet(path)
    who = tokens.check("s3cret")
    assert who is not None and who.name == "app" and who.scopes == {"resolve"}
    # the hash itself is no token; neither is the token with a byte more, a byte less, another case, nothing
    for wrong in (sha("s3cret"), f"sha256:{sha('s3cret')}", "s3cret ", "s3cre", "S3CRET", ""):
        assert tokens.check(wrong) is None
    assert tokens.names == ("app",)
    assert tokens.what == f"tokens file {path}"


def test_reload_admits_the_new_file_and_a_bad_file_keeps_the_previous_set(tmp_path: Path) -> None:
    path = tmp_path / "tokens"
    path.write_text(f"old resolve sha256:{sha('old')}\n")
    tokens = TokenSet(path)
    path.write_text(f"new write sha256:{sha('new')}\n")
    tokens.reload()
    assert tokens.check("old") is None
    who = tokens.check("new")
    assert who is not None and who.name == "new"

    path.write_text(f"broken resolve sha256:{sha('x')[:10]}\n")
    with pytest.raises(ConfigError, match="line 1"):
        tokens.reload()
    path.unlink()
    with pytest.raises(ConfigError, match="cannot read it"):
        tokens.reload()
    assert tokens.check("new") is not None and tokens.names == ("new",)  # still the last good file


def test_a_missing_tokens_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read it"):
        TokenSet(tmp_path / "absent")


def test_token_new_prints_a_token_and_a_line_that_admits_it(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["token", "new", "crm-sync", "--scopes", "write,resolve"]) == 0
    out = capsys.readouterr()
    token, line = out.out.splitlines()
    assert token.startswith(TOKEN_PREFIX) and len(token) > 40
    assert token not in line and line == f"crm-sync resolve,write sha256:{sha(token)}"
    assert "SIGHUP" in out.err
    path = tmp_path / "tokens"
    path.write_text("# generated\n" + line + "\n")
    who = TokenSet(path).check(token)
    assert who is not None and who.name == "crm-sync" and who.scopes == {"resolve", "write"}

    assert main(["token", "new", "crm-sync", "--scopes", "resolve"]) == 0
    assert capsys.readouterr().out.splitlines()[0] != token  # fresh each time


def test_token_new_refuses_a_bad_name_or_scope(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["token", "new", "ann@example.com", "--scopes", "resolve,everything"]) == 2
    out = capsys.readouterr()
    assert out.out == "" and "the name" in out.err and "'everything'" in out.err
    with pytest.raises(ConfigError):
        new_token("ok", "")


def test_every_method_of_the_service_has_the_scope_the_issue_gives_it_and_a_new_one_needs_admin() -> None:
    expected = {"Resolve": "resolve", "ResolveStream": "resolve", "GetCustomer": "resolve",
                "ListInteractions": "resolve", "WatchChanges": "resolve", "GetServerInfo": "resolve",
                "Upsert": "write", "RecordInteraction": "write", "IngestEvents": "events"}
    service = pb.DESCRIPTOR.services_by_name["IdentityResolver"]
    for method in service.methods:
        assert scope_for(method.name) == expected.get(method.name, "admin"), method.name
    assert scope_for("SomeMethodAddedLater") == "admin"
    assert set(METHOD_SCOPES.values()) <= set(SCOPES)


def test_the_metadata_a_call_presents() -> None:
    assert presented(()) == (None, None)
    assert presented(None) == (None, None)
    md = (("user-agent", "grpc"), ("authorization", "Bearer rsv_abc"), (REQUEST_ID, "req-1.2:3_x"))
    assert presented(md) == ("req-1.2:3_x", "rsv_abc")
    assert presented((("authorization", "bearer rsv_abc"),)).token == "rsv_abc"  # the scheme is case-insensitive
    assert presented((("authorization", "Basic dXNlcjpwdw=="),)).token is None
    assert presented((("authorization", "Bearer "),)).token is None
    # a request id that is not a short token is not taken (it would be logged): long, spaces, an email
    for bad in ("x" * 65, "a b", "ann@example.com", "+16502530001", ""):
        assert presented(((REQUEST_ID, bad),)).request_id is None
