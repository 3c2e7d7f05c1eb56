"""Build-time generator of resolver/_phonemeta.py: the phonenumbers metadata the fast phone path reads.

Run by setup.py before cythonize (``python resolver/_phonemeta_gen.py OUT`` also works). The output is
git-ignored and carries the phonenumbers version it was generated from; the fast path refuses to import a
table generated from another version. Only what phonenumbers' parse -> is_valid_number / is_possible_number
consult is copied, as the same pattern strings, so the fast path can evaluate them with `re` exactly as
phonenumbers does.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Any


def _desc_pattern(desc: Any) -> str | None:
    if desc is None or not desc.national_number_pattern:
        return None
    return str(desc.national_number_pattern)


def _record(md: Any) -> tuple[Any, ...]:
    """One metadata record: the fields phonenumbers' parse and validation read, in that form."""
    general = md.general_desc
    assert general is not None and general.possible_length, md.id
    npfp = md.national_prefix_for_parsing or None
    transform = md.national_prefix_transform_rule or None
    if npfp is not None and transform is not None:
        # phonenumbers indexes the last group when a transform rule exists; none means it would crash
        assert re.compile(npfp).groups > 0, md.id
    # _number_type_helper's order; mobile is skipped when it shares the fixed-line pattern
    descs = [md.premium_rate, md.toll_free, md.shared_cost, md.voip, md.personal_number, md.pager, md.uan,
             md.voicemail, md.fixed_line]
    if not md.same_mobile_and_fixed_line_pattern:
        descs.append(md.mobile)
    types = tuple(
        (tuple(d.possible_length), p) for d in descs if d is not None and (p := _desc_pattern(d)) is not None
    )
    return (
        int(md.country_code),
        md.international_prefix,  # "" would still be a pattern to phonenumbers: keep None apart
        npfp,
        transform,
        _desc_pattern(general),
        tuple(general.possible_length),
        tuple(general.possible_length_local_only),
        md.leading_digits,
        types,
    )


def build() -> dict[str, Any]:
    """The tables, from the installed phonenumbers."""
    import phonenumbers
    from phonenumbers import COUNTRY_CODE_TO_REGION_CODE, PhoneMetadata

    cc_keys: dict[int, tuple[str, ...]] = {}
    metadata: dict[str, tuple[Any, ...]] = {}
    for cc, regions in sorted(COUNTRY_CODE_TO_REGION_CODE.items()):
        keys = []
        for region in regions:
            if region == "001":
                key = f"+{cc}"
                md = PhoneMetadata.metadata_for_nongeo_region(cc, None)
            else:
                key = region
                md = PhoneMetadata.metadata_for_region(region, None)
            assert md is not None, (cc, region)
            metadata[key] = _record(md)
            keys.append(key)
        cc_keys[cc] = tuple(keys)
    first_digits = {key: tuple(first_digit_mask(rec[i]) for i in (1, 2, 7)) for key, rec in metadata.items()}
    index, blob = validation_tables(metadata)
    return {"version": phonenumbers.__version__, "cc_keys": cc_keys, "metadata": metadata,
            "first_digits": first_digits, "dfa_index": index, "dfa_blob": blob}


def first_digit_mask(pattern: str | None) -> int:
    """The digits a `re.match` of `pattern` on a digit string can start with (bit d = digit d).

    All ten when the pattern can match the empty string, is None (never consulted) or is not modelled.
    A string whose first digit is outside the mask cannot match: the `re` call can be skipped.
    """
    if pattern is None:
        return ALL_DIGITS
    try:
        nfa, start, final = nfa_of(pattern)
    except Unsupported:
        return ALL_DIGITS
    closure = nfa.closure({start})
    if final in closure:
        return ALL_DIGITS
    mask = 0
    for s in closure:
        for m, _ in nfa.edges[s]:
            mask |= m
    return mask


def validation_tables(metadata: dict[str, tuple[Any, ...]]) -> tuple[dict[str, dict[int, Any]], str]:
    """Per key and length, the DFA of "general and one type" (see `length_dfa`), packed in one blob.

    index[key][length] = (offset in int16 units, states), or None where the patterns are not modelled (the
    fast path then uses the folded regex); a length absent from index[key] can never be valid. Native
    byte order: the tables are generated on the machine that builds (and runs) the package.
    """
    import base64
    import zlib
    from array import array

    packed = array("h")
    index: dict[str, dict[int, Any]] = {}
    for key, rec in metadata.items():
        general, lengths, types = rec[4], rec[5], rec[8]
        per_length: dict[int, Any] = {}
        for length in lengths:
            alternatives = [p for ls, p in types if not ls or length in ls]
            if general is None or not alternatives:
                continue
            try:
                table, count = length_dfa(general, alternatives, length)
            except Unsupported:
                per_length[length] = None
                continue
            assert count < 32768, (key, length)
            per_length[length] = (len(packed), count)
            packed.extend(table)
        index[key] = per_length
    return index, base64.b64encode(zlib.compress(packed.tobytes(), 9)).decode("ascii")


def generate(out: Path) -> None:
    """Write the tables as a Python module, unless it is newer than this generator and of the same phonenumbers
    version (building the automata takes seconds); the file is only rewritten when its content changes."""
    import phonenumbers

    if out.exists() and out.stat().st_mtime >= Path(__file__).stat().st_mtime:
        if f"PHONENUMBERS_VERSION = {phonenumbers.__version__!r}\n" in out.read_text():
            return
    tables = build()
    text = (
        '"""GENERATED by resolver/_phonemeta_gen.py from the installed phonenumbers; do not edit."""\n'
        "# ruff: noqa\n\n"
        f"PHONENUMBERS_VERSION = {tables['version']!r}\n\n"
        "# country calling code -> metadata keys, in phonenumbers' order (the first is the main region)\n"
        f"CC_KEYS = {tables['cc_keys']!r}\n\n"
        "# key (region code, or '+<cc>' for a non-geographic code) -> (country_code, international_prefix,\n"
        "# national_prefix_for_parsing, national_prefix_transform_rule, general pattern, general possible\n"
        "# lengths, general local-only lengths, leading_digits, ((type possible lengths, type pattern), ...))\n"
        f"METADATA = {tables['metadata']!r}\n\n"
        "# key -> digits a match of (international_prefix, national_prefix_for_parsing, leading_digits) can\n"
        "# start with, bit d for digit d (all ten: no filter)\n"
        f"FIRST_DIGITS = {tables['first_digits']!r}\n\n"
        "# key -> {length: (offset, states) of its validation DFA in DFA_BLOB, or None: use the regex}\n"
        f"DFA_INDEX = {tables['dfa_index']!r}\n\n"
        "# zlib + base64 of native-order int16 transition tables (state * 10 + digit -> state, -1 dead)\n"
        f"DFA_BLOB = {tables['dfa_blob']!r}\n"
    )
    if not out.exists() or out.read_text() != text:
        out.write_text(text)


# --- pattern tables: the metadata's regular expressions as automata over the ten digits -------------------


class Unsupported(Exception):
    """A construct the automaton builder does not model exactly: the caller keeps using `re` for it."""


ALL_DIGITS = (1 << 10) - 1


class _Nfa:
    """A Thompson NFA over the digits 0-9: per state, (digit mask, next) edges and epsilon edges."""

    def __init__(self) -> None:
        self.edges: list[list[tuple[int, int]]] = []
        self.eps: list[list[int]] = []

    def state(self) -> int:
        self.edges.append([])
        self.eps.append([])
        return len(self.edges) - 1

    def closure(self, states: frozenset[int] | set[int]) -> frozenset[int]:
        seen = set(states)
        stack = list(states)
        while stack:
            for nxt in self.eps[stack.pop()]:
                if nxt not in seen:
                    seen.add(nxt)
                    stack.append(nxt)
        return frozenset(seen)

    def step(self, states: frozenset[int], digit: int) -> frozenset[int]:
        bit = 1 << digit
        return self.closure({nxt for s in states for mask, nxt in self.edges[s] if mask & bit})


def _charset_mask(items: Any) -> int:
    from re import _constants as c  # type: ignore[attr-defined]

    mask = 0
    negate = False
    for op, arg in items:
        if op is c.NEGATE:
            negate = True
        elif op is c.LITERAL:
            if 48 <= arg <= 57:
                mask |= 1 << (arg - 48)
        elif op is c.RANGE:
            lo, hi = arg
            for d in range(10):
                if lo <= 48 + d <= hi:
                    mask |= 1 << d
        elif op is c.CATEGORY:
            if arg in (c.CATEGORY_DIGIT, c.CATEGORY_NOT_SPACE, c.CATEGORY_WORD):
                mask |= ALL_DIGITS
            elif arg not in (c.CATEGORY_NOT_DIGIT, c.CATEGORY_SPACE, c.CATEGORY_NOT_WORD):
                raise Unsupported(str(arg))
        else:
            raise Unsupported(str(op))
    return ALL_DIGITS & ~mask if negate else mask


def _build(nfa: _Nfa, items: Any, start: int) -> int:
    """Add the parsed pattern `items` from state `start`; returns its end state."""
    from re import _constants as c  # type: ignore[attr-defined]

    cur = start
    for op, arg in items:
        if op is c.LITERAL or op is c.NOT_LITERAL or op is c.ANY or op is c.IN:
            if op is c.LITERAL:
                mask = 1 << (arg - 48) if 48 <= arg <= 57 else 0
            elif op is c.NOT_LITERAL:
                mask = ALL_DIGITS & ~(1 << (arg - 48)) if 48 <= arg <= 57 else ALL_DIGITS
            elif op is c.ANY:
                mask = ALL_DIGITS
            else:
                mask = _charset_mask(arg)
            nxt = nfa.state()
            if mask:
                nfa.edges[cur].append((mask, nxt))
            cur = nxt
        elif op is c.BRANCH:
            end = nfa.state()
            for alternative in arg[1]:
                s = nfa.state()
                nfa.eps[cur].append(s)
                nfa.eps[_build(nfa, alternative, s)].append(end)
            cur = end
        elif op is c.SUBPATTERN:
            _group, add_flags, del_flags, sub = arg
            if add_flags or del_flags:
                raise Unsupported("inline flags")
            cur = _build(nfa, sub, cur)
        elif op is c.MAX_REPEAT or op is c.MIN_REPEAT:
            lo, hi, sub = arg
            for _ in range(lo):
                cur = _build(nfa, sub, cur)
            if hi is c.MAXREPEAT:
                loop = nfa.state()
                nfa.eps[cur].append(loop)
                nfa.eps[_build(nfa, sub, loop)].append(loop)
                cur = loop
            else:
                end = nfa.state()
                for _ in range(hi - lo):
                    nfa.eps[cur].append(end)
                    cur = _build(nfa, sub, cur)
                nfa.eps[cur].append(end)
                cur = end
        else:
            raise Unsupported(str(op))
    return cur


def nfa_of(pattern: str) -> tuple[_Nfa, int, int]:
    """(nfa, start, final) of a pattern, for matching digit strings; Unsupported if not modelled exactly."""
    from re import _parser  # type: ignore[attr-defined]

    parsed = _parser.parse(pattern)
    if parsed.state.flags & ~(32 | 256):  # only the defaults (re.UNICODE) and the pattern's own re.ASCII
        raise Unsupported("flags")
    nfa = _Nfa()
    start = nfa.state()
    final = _build(nfa, parsed, start)
    return nfa, start, final


def length_dfa(general: str, types: list[str], length: int) -> tuple[list[int], int]:
    """A DFA accepting exactly the digit strings of `length` that fullmatch `general` and one of `types`.

    Returned as a flat transition table (state * 10 + digit -> state, -1 dead; state 0 is the start) and the
    number of states; a string of `length` digits is accepted iff its walk never dies: states of the last
    layer are only created for accepting subsets.
    """
    g, g_start, g_final = nfa_of(general)
    u = _Nfa()
    u_start = u.state()
    u_final = u.state()
    for pattern in types:
        t, t_start, t_final = nfa_of(pattern)
        offset = len(u.edges)
        u.edges.extend([[(m, n + offset) for m, n in e] for e in t.edges])
        u.eps.extend([[n + offset for n in e] for e in t.eps])
        u.eps[u_start].append(t_start + offset)
        u.eps[t_final + offset].append(u_final)
    table: list[int] = []
    layer = {(g.closure({g_start}), u.closure({u_start})): 0}
    count = 1
    table.extend([-1] * 10)
    for depth in range(length):
        last = depth == length - 1
        following: dict[tuple[frozenset[int], frozenset[int]], int] = {}
        for (gs, us), sid in layer.items():
            for digit in range(10):
                ng, nu = g.step(gs, digit), u.step(us, digit)
                if not ng or not nu or (last and (g_final not in ng or u_final not in nu)):
                    continue
                key = (ng, nu)
                nid = following.get(key)
                if nid is None:
                    nid = following[key] = count
                    count += 1
                    table.extend([-1] * 10)
                table[sid * 10 + digit] = nid
        layer = following
    return table, count


if __name__ == "__main__":
    generate(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).with_name("_phonemeta.py"))
