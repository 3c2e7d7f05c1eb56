"""The fast phone path's constants, written once: read by its twin (resolver/_phone_py.py) and by
ext/_phone_c.pyx, which types the numbers as C ints and builds its character table from the strings."""

from __future__ import annotations

from phonenumbers import ValidationResult

# phonenumbers' ValidationResult values (what its _test_number_length answers)
IS_POSSIBLE = ValidationResult.IS_POSSIBLE
TOO_SHORT = ValidationResult.TOO_SHORT
TOO_LONG = ValidationResult.TOO_LONG
IS_POSSIBLE_LOCAL_ONLY = ValidationResult.IS_POSSIBLE_LOCAL_ONLY
INVALID_LENGTH = ValidationResult.INVALID_LENGTH

# outcomes of one parse attempt. UNSETTLED: parsed, but its E.164 form, parsed again, may give another national
# number (from a whole attempt, accepted and exact: it will)
OK, ERROR, FALLBACK, UNSETTLED = 0, 1, 2, 3

# parse errors, as the reference words them (normalize._parse_error_message)
NOT_A_NUMBER_MSG = "value does not look like a phone number"
INVALID_CC_MSG = "phone number has no recognisable country code (write it as +<country code> or give a region)"
TOO_SHORT_MSG = "phone number is too short"
TOO_LONG_MSG = "phone number is too long"

MAX_INPUT = 250  # phonenumbers' _MAX_INPUT_STRING_LENGTH
MIN_NSN, MAX_NSN = 2, 17  # phonenumbers' _MIN_LENGTH_FOR_NSN, _MAX_LENGTH_FOR_NSN

# The fast path's input shape, ['+'] (digit | separator)*, and the first characters it takes.
SEPARATORS = " -.()/"
FAST_START = "+0123456789("  # no placeholder word starts with one of these
URI_START = "tTsS"  # tel:, sip:, sips:
