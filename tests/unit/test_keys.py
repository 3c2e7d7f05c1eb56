"""Index keys: the compiled module and its pure twin give byte-identical keys; the selector is honest."""

from __future__ import annotations

import hashlib

import pytest
import xxhash
from hypothesis import given, settings
from hypothesis import strategies as st

# The compiled module is built by `make build` in every mode; the switch only decides which one serves.
from resolver import _keys_c, _keys_py

# compiled module against twin (and the reference library), both loaded here: the same test in either pass, run once
# (tests/unit/test_selection.py checks which one the switch picks)
pytestmark = pytest.mark.differential

IMPLEMENTATIONS = [pytest.param(_keys_py, id="pure"), pytest.param(_keys_c, id="compiled")]


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_key_definition(impl) -> None:  # noqa: ANN001
    h = impl.KeyHasher("xxh3-128")
    assert h.key(3, "+15550199888") == xxhash.xxh3_128_digest(b"\x03+15550199888")
    k = impl.KeyHasher("blake2b", b"secret")
    assert k.key(2, "jane@example.com") == hashlib.blake2b(b"\x02jane@example.com", digest_size=16,
                                                          key=b"secret").digest()
    assert len(h.key(1, "")) == 16
    assert h.key(1, "x") != h.key(2, "x")  # kinds never collide by construction
    assert h.keys(3, ["a", "b"]) == [h.key(3, "a"), h.key(3, "b")]


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@pytest.mark.parametrize("args", [("md5", None), ("blake2b", None), ("blake2b", b"x" * 65), ("xxh3-128", b"k")])
def test_bad_hasher_configuration_is_refused(impl, args) -> None:  # noqa: ANN001
    with pytest.raises(ValueError):
        impl.KeyHasher(*args)


@settings(max_examples=500, deadline=None)
@given(kind=st.integers(1, 3), value=st.text(max_size=80), secret=st.binary(min_size=1, max_size=64))
def test_compiled_equals_pure(kind: int, value: str, secret: bytes) -> None:
    for alg, key in (("xxh3-128", None), ("blake2b", secret)):
        assert _keys_c.KeyHasher(alg, key).key(kind, value) == _keys_py.KeyHasher(alg, key).key(kind, value)


@settings(max_examples=200, deadline=None)
@given(kind=st.integers(0, 255), value=st.text(min_size=100, max_size=700))
def test_compiled_equals_xxhash_for_long_values(kind: int, value: str) -> None:
    """Every xxh3 length class (129-240 bytes, the long loop) and the heap buffer past 512 bytes of input."""
    assert _keys_c.KeyHasher().key(kind, value) == xxhash.xxh3_128_digest(bytes((kind,)) + value.encode("utf-8"))
