"""Selector for the Resolve wire codec: ext/_rwire_c.pyx compiled, or its pure twin resolver/_rwire_py.py.

The same switch as resolver._hotpath, read there once. Not selected in resolver._hotpath itself: the codec builds
resolver.resolve's and resolver.identifiers' types, and both import resolver._hotpath (normalization, keys), so
importing the codec from there would be an import cycle (tests/unit/test_import_graph.py).
"""

from __future__ import annotations

from resolver._hotpath import IMPLEMENTATION, MISSING_BUILD, NO_EXTENSIONS

if NO_EXTENSIONS:
    from resolver._rwire_py import decode_resolve, encode_resolve
else:
    try:
        from resolver._rwire_c import decode_resolve, encode_resolve
    except ImportError as exc:  # pragma: no cover - exercised by a broken build only
        raise ImportError(MISSING_BUILD) from exc

__all__ = ["IMPLEMENTATION", "decode_resolve", "encode_resolve"]
