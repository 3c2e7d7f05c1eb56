"""Customer uuids: UUIDv7 (RFC 9562), time-ordered, so that customers created together sit together in the
records database and a bulk load appends instead of inserting at random.

The layout (RFC 9562 §5.7), most significant bit first:

    unix_ts_ms (48) | version = 0b0111 (4) | rand_a (12) | variant = 0b10 (2) | rand_b (62)

Both generators fill rand_a and the top 30 bits of rand_b with a 42-bit counter (§6.2, method 1, "fixed
bit-length dedicated counter") and the last 32 bits with fresh random bits:

- `new_customer_uuid()` (one per process): the counter is seeded at random, with its top bit clear, each new
  millisecond and incremented within one; when the clock steps back, the last timestamp is kept. So the uuids
  one process makes increase strictly. This is what Upsert, events and interactions call when they prepare a
  command (the uuid is fixed in the command, never made inside an apply step: contract §10).
- `LoadUuids` (one per import): the import's start in milliseconds and a counter seeded once at random, plus
  the row's line number. A row's uuid follows from its line, so the uuids of one file increase in file order
  although worker processes prepare its rows in parallel: its records are appended in key order.

Nothing reads a uuid's version: ids issued before (version 4, random) stay valid everywhere, and a stored
uuid is only ever compared and sorted as 16 bytes.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable

_COUNTER_BITS = 42
_COUNTER_MAX = (1 << _COUNTER_BITS) - 1
_SEED_MASK = (1 << (_COUNTER_BITS - 1)) - 1  # a seed leaves the counter's top bit clear: room to count
_TS_MASK = (1 << 48) - 1
_FLAGS = (0x7 << 76) | (0b10 << 62)  # version 7, RFC 9562 variant


def uuid7_int(unix_ms: int, counter: int, tail: int) -> int:
    """The 128-bit UUIDv7 of a timestamp (ms), a 42-bit counter and 32 random bits."""
    return ((unix_ms & _TS_MASK) << 80 | (counter >> 30 & 0xFFF) << 64 | (counter & 0x3FFF_FFFF) << 32
            | (tail & 0xFFFF_FFFF) | _FLAGS)


def text(value: int) -> str:
    """The canonical text form of a 128-bit uuid (what str(uuid.UUID(int=value)) prints)."""
    h = f"{value:032x}"
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def unix_ms_of(value: str) -> int:
    """The timestamp (ms since the epoch) of a version-7 uuid in text form."""
    return int(value[:8] + value[9:13], 16)


class _Entropy:
    """Random 32-bit tails from one getrandom call per 1,024 (a fork starts its own: see register_at_fork)."""

    __slots__ = ("_pool", "_at")

    def __init__(self) -> None:
        self._pool = b""
        self._at = 0

    def tail(self) -> int:
        if self._at >= len(self._pool):
            self._pool, self._at = os.urandom(4096), 0
        at = self._at
        self._at = at + 4
        return int.from_bytes(self._pool[at:at + 4], "big")

    def reset(self) -> None:
        self._pool, self._at = b"", 0


_entropy = _Entropy()


class Uuid7:
    """A generator of strictly increasing UUIDv7s (thread-safe). `clock_ns` and `random` are for tests."""

    def __init__(self, clock_ns: Callable[[], int] = time.time_ns,
                 random: Callable[[int], bytes] = os.urandom) -> None:
        self._clock_ns = clock_ns
        self._random = random
        self._lock = threading.Lock()
        self._last_ms = -1
        self._counter = 0

    def __call__(self) -> str:
        """A new uuid, greater than every one this generator made before."""
        with self._lock:
            ms = self._clock_ns() // 1_000_000
            if ms > self._last_ms:
                self._counter = int.from_bytes(self._random(6), "big") & _SEED_MASK
            else:  # the same millisecond, or the clock stepped back: count on from the last one
                ms = self._last_ms
                self._counter += 1
                if self._counter > _COUNTER_MAX:  # 2^41 uuids in one millisecond: borrow the next one
                    ms += 1
                    self._counter = int.from_bytes(self._random(6), "big") & _SEED_MASK
            self._last_ms = ms
            tail = int.from_bytes(self._random(4), "big")
            return text(uuid7_int(ms, self._counter, tail))

    def reset(self) -> None:
        """Forget the last timestamp and counter (a forked child starts its own sequence; a lock another
        thread held at the fork would never be released in the child, so it gets a new one)."""
        self._lock = threading.Lock()
        self._last_ms, self._counter = -1, 0


_process = Uuid7()


def new_customer_uuid() -> str:
    """A new customer uuid (UUIDv7, canonical text), strictly greater than the previous one of this process."""
    return _process()


class LoadUuids:
    """The uuids of one import: `for_line(n)` is the uuid a row starting on line `n` creates.

    `unix_ms`: when the import started; `seed`: the counter's random start (below 2^41, so a line number up to
    2^41 still fits); the last 32 bits are fresh random bits per uuid. Picklable (the worker processes get a
    copy), and the same for every process of one import.
    """

    __slots__ = ("unix_ms", "seed")

    def __init__(self, unix_ms: int, seed: int) -> None:
        if not 0 <= seed <= _SEED_MASK:
            raise ValueError("the seed of an import's uuids is below 2^41")
        self.unix_ms = unix_ms
        self.seed = seed

    @classmethod
    def start(cls) -> LoadUuids:
        """The uuids of an import starting now."""
        return cls(time.time_ns() // 1_000_000, int.from_bytes(os.urandom(6), "big") & _SEED_MASK)

    def for_line(self, line: int) -> str:
        """The uuid of the customer the row on `line` (1, 2, ...) creates: increasing with `line`."""
        return text(uuid7_int(self.unix_ms, self.seed + line, _entropy.tail()))


def _after_fork() -> None:
    # a child must not repeat its parent's random bits, nor continue its counter
    _entropy.reset()
    _process.reset()


os.register_at_fork(after_in_child=_after_fork)
