"""Selector: the compiled hot path (built from ext/) or its pure-Python twin.

The environment switch is read once, here. RESOLVER_NO_EXTENSIONS=1 forces the pure twins; otherwise the
compiled modules must import — a missing build is an error, never a silent fallback to slow code.
"""

from __future__ import annotations

import os

NO_EXTENSIONS = os.environ.get("RESOLVER_NO_EXTENSIONS", "") not in ("", "0")
MISSING_BUILD = ("resolver's compiled modules are not built (run `make build`); "
                 "set RESOLVER_NO_EXTENSIONS=1 to run on the pure-Python twins on purpose")

if NO_EXTENSIONS:
    from resolver._email_py import email_stats, normalize_email
    from resolver._keys_py import KeyHasher
    from resolver._load_py import CreateQueue, KeyFilter, RowPlanner, entry_derived
    from resolver._phone_py import normalize_phone, phone_stats
    from resolver._probe_py import Prober
else:
    try:
        from resolver._email_c import email_stats, normalize_email
        from resolver._keys_c import KeyHasher
        from resolver._load_c import CreateQueue, KeyFilter, RowPlanner, entry_derived
        from resolver._phone_c import normalize_phone, phone_stats
        from resolver._probe_c import Prober
    except ImportError as exc:  # pragma: no cover - exercised by a broken build only
        raise ImportError(MISSING_BUILD) from exc

IMPLEMENTATION = "pure" if NO_EXTENSIONS else "compiled"

__all__ = ["IMPLEMENTATION", "MISSING_BUILD", "CreateQueue", "KeyFilter", "KeyHasher", "Prober", "RowPlanner",
           "email_stats", "entry_derived", "normalize_email", "normalize_phone", "phone_stats"]
