"""Customer uuids (resolver.uuids): RFC 9562 version 7, time-ordered, strictly increasing per process, and an
import's uuids increasing with the line."""

from __future__ import annotations

import itertools
import os
import time
import uuid

from hypothesis import given, settings
from hypothesis import strategies as st

from resolver.uuids import LoadUuids, Uuid7, new_customer_uuid, unix_ms_of, uuid7_int

MS = 1_000_000


def well_formed(text: str) -> uuid.UUID:
    u = uuid.UUID(text)
    assert str(u) == text  # canonical text
    assert u.version == 7 and (u.int >> 76) & 0xF == 7  # the version nibble
    assert u.variant == uuid.RFC_4122 and (u.int >> 62) & 0b11 == 0b10  # the variant bits
    return u


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, 2**47), min_size=1, max_size=60), st.integers(0, 2**32))
def test_a_process_makes_version_7_uuids_that_increase_strictly_whatever_the_clock_does(
        clock_ms: list[int], seed: int) -> None:
    readings = iter(clock_ms)
    rnd = itertools.count(seed)
    make = Uuid7(clock_ns=lambda: next(readings) * MS + 123,
                 random=lambda n: (next(rnd) % 2**(8 * n)).to_bytes(n, "big"))
    made = [make() for _ in clock_ms]
    parsed = [well_formed(t) for t in made]
    assert all(a.int < b.int for a, b in itertools.pairwise(parsed))  # strictly increasing, as 16 bytes
    assert made == sorted(made)  # and as text
    # the timestamp is the clock's, or the last one used when the clock stepped back
    latest = list(itertools.accumulate(clock_ms, max))
    assert [unix_ms_of(t) for t in made] == latest


def test_a_burst_within_one_millisecond_counts_on() -> None:
    make = Uuid7(clock_ns=lambda: 1_700_000_000_000 * MS)
    made = [make() for _ in range(1000)]
    assert len(set(made)) == 1000 and made == sorted(made)
    assert {unix_ms_of(t) for t in made} == {1_700_000_000_000}


def test_the_process_generator_makes_time_ordered_v7() -> None:
    before = time.time_ns() // MS
    made = [new_customer_uuid() for _ in range(100)]
    assert made == sorted(made) and len(set(made)) == 100
    assert before <= unix_ms_of(made[0]) <= unix_ms_of(made[-1]) <= time.time_ns() // MS + 1
    for t in made:
        well_formed(t)


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 2**48 - 1), st.integers(0, 2**41 - 1), st.lists(st.integers(1, 2**40), min_size=2, max_size=50))
def test_an_import_s_uuids_increase_with_the_line(unix_ms: int, seed: int, lines: list[int]) -> None:
    uuids = LoadUuids(unix_ms, seed)
    lines = sorted(set(lines))
    made = [uuids.for_line(n) for n in lines]
    assert [well_formed(t) for t in made] == sorted(well_formed(t) for t in made)
    assert made == sorted(made) and len(set(made)) == len(made)
    assert {unix_ms_of(t) for t in made} == {unix_ms}


def test_an_import_s_seed_leaves_room_for_its_lines() -> None:
    assert LoadUuids.start().seed < 2**41
    top = LoadUuids(5, 2**41 - 1)
    assert well_formed(top.for_line(2**41)).int >> 80 == 5  # the counter never carries into the timestamp
    try:
        LoadUuids(5, 2**41)
    except ValueError:
        pass
    else:
        raise AssertionError("a seed of 2^41 must be refused")


def test_the_bit_layout_is_rfc_9562_section_5_7() -> None:
    value = uuid7_int(0x0123_4567_89AB, (0xABC << 30) | 0x1234_5678, 0xDEAD_BEEF)
    assert f"{value:032x}" == "0123456789ab" "7abc" "9234" "5678" "deadbeef"  # (0b10 << 62) | counter's low 30 bits


def test_a_forked_child_does_not_repeat_its_parents_random_bits() -> None:
    uuids = LoadUuids(1_700_000_000_000, 0)
    uuids.for_line(1)  # the parent has drawn from its pool of random bits
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: the same line, its own random bits
        os.write(write, uuids.for_line(2).encode())
        os._exit(0)
    os.close(write)
    child = os.read(read, 64).decode()
    os.close(read)
    os.waitpid(pid, 0)
    mine = uuids.for_line(2)
    assert child[:23] == mine[:23] and child != mine  # the same time and counter; the random tail differs
