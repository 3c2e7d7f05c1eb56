"""RESOLVER_NO_EXTENSIONS picks the implementation of every hot-path module: the pure twins when it is set, the
compiled modules otherwise. The pure pass (Makefile test-pure) runs this with it set; the differential tests,
which load both implementations themselves and compare them, run once, in the compiled pass."""

from __future__ import annotations

import os

from resolver import (
    _email_c,
    _email_py,
    _hotpath,
    _keys_c,
    _keys_py,
    _load_c,
    _load_py,
    _phone_c,
    _phone_py,
    _probe_c,
    _probe_py,
    _rwire,
    _rwire_c,
    _rwire_py,
)

PURE = os.environ.get("RESOLVER_NO_EXTENSIONS", "") not in ("", "0")


def test_the_switch_picks_every_hot_path_module() -> None:
    assert _hotpath.IMPLEMENTATION == _rwire.IMPLEMENTATION == ("pure" if PURE else "compiled")
    chosen = {  # what the application calls: (the twin's, the compiled module's)
        "normalize_email": (_hotpath.normalize_email, _email_py.normalize_email, _email_c.normalize_email),
        "email_stats": (_hotpath.email_stats, _email_py.email_stats, _email_c.email_stats),
        "normalize_phone": (_hotpath.normalize_phone, _phone_py.normalize_phone, _phone_c.normalize_phone),
        "phone_stats": (_hotpath.phone_stats, _phone_py.phone_stats, _phone_c.phone_stats),
        "KeyHasher": (_hotpath.KeyHasher, _keys_py.KeyHasher, _keys_c.KeyHasher),
        "Prober": (_hotpath.Prober, _probe_py.Prober, _probe_c.Prober),
        "RowPlanner": (_hotpath.RowPlanner, _load_py.RowPlanner, _load_c.RowPlanner),
        "CreateQueue": (_hotpath.CreateQueue, _load_py.CreateQueue, _load_c.CreateQueue),
        "KeyFilter": (_hotpath.KeyFilter, _load_py.KeyFilter, _load_c.KeyFilter),
        "entry_derived": (_hotpath.entry_derived, _load_py.entry_derived, _load_c.entry_derived),
        "decode_resolve": (_rwire.decode_resolve, _rwire_py.decode_resolve, _rwire_c.decode_resolve),
        "encode_resolve": (_rwire.encode_resolve, _rwire_py.encode_resolve, _rwire_c.encode_resolve),
    }
    wrong = [name for name, (selected, twin, compiled) in chosen.items() if selected is not (twin if PURE else compiled)]
    assert not wrong, wrong
    assert type(_hotpath.KeyHasher("xxh3-128")).__module__ == ("resolver._keys_py" if PURE else "resolver._keys_c")
