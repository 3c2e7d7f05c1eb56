"""The fast email path's constants, written once: read by its twin (resolver/_email_py.py) and by
ext/_email_c.pyx, which types the limits as C ints and builds its character table from LABEL_CHARS.

Limits and messages are the reference's (resolver.normalize.normalize_email), in the order it checks them.
"""

from __future__ import annotations

MAX_LOCAL = 64  # characters of the local part
MAX_LABEL = 63  # characters of a domain label
MAX_ADDRESS = 254  # characters of the whole address
LABEL_CHARS = "abcdefghijklmnopqrstuvwxyz0123456789-"  # of a lower-cased ASCII domain label

PLACEHOLDER_MSG = "email is a configured placeholder value"
NO_AT_MSG = "email has no '@'"
TWO_ATS_MSG = "email has more than one '@'"
EMPTY_LOCAL_MSG = "email has an empty local part"
LONG_LOCAL_MSG = f"email local part is longer than {MAX_LOCAL} characters"
LOCAL_CHAR_MSG = "email local part contains whitespace or a control character"
LOCAL_DOT_MSG = "email local part has a leading, trailing or doubled dot"
IDNA_MSG = "email domain cannot be IDNA-encoded"
NO_DOT_MSG = "email domain has no dot"
LABEL_MSG = "email domain has an empty or malformed label"
DIGIT_TLD_MSG = "email top-level domain is all digits"
LONG_ADDRESS_MSG = f"email is longer than {MAX_ADDRESS} characters"
KNOWN_PLACEHOLDER_MSG = "email is a placeholder address"
