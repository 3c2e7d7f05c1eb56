"""Writes vs reads (issue 13, point 3: "writes must not slow reads"), one or more server variants, same run.

    .venv/bin/python -m bench.writes_vs_reads [--work /tmp/wvr] [--rounds 3] [--window 8] [--rate 2000]
        [--clients 4] [--pin] [--shared-port] [--variant NAME[:KEY=VAL;KEY=VAL...]] ... [--json FILE]

What it runs. A 200k-customer dataset (bench/dataset.py) imported once with `resolver import` into
WORK/data (kept and reused by the next run with the same WORK). Each variant gets its own copy of that data
directory and its own `resolver serve` (the blueprint's workers, events process included) on a free port; all
servers run for the whole run and are stopped at the end. Then, for each round, for each variant (the order
rotates every round), three windows of open-loop load from `--clients` client processes (one gRPC channel
each, round_robin over every worker's own port as ResolverClient opens it; `--shared-port`: to the shared port;
`--pin`: servers on CPU 0, clients on CPU 1; requests on one absolute timeline, latency = completion -
*intended* send time, as bench.loadgen):

  before : call-setup (Resolve only) at --rate
  mixed  : the loadgen's `mixed` scenario at --rate (95% Resolve, 5% Upsert with fresh idempotency keys)
  after  : call-setup again, right after the writes

and once per round, with no RPC load, the disk's own flush latency: 4 KiB pwrite + fdatasync on a file in the
data directory's filesystem (`disk1`), and the pair LMDB does per synced commit (data pages + fdatasync, then
the meta page + fdatasync: `disk2`), paced at 100/s.

What it prints, per round and variant, then medians over rounds per variant:

  alone p99   Resolve p99 in `before`                 mixed p99   Resolve p99 in `mixed` (Resolves only)
  ratio       mixed / alone              (target <= 1.3)
  slice       p99 of the worst 100 ms slice of Resolves in `after` / the same in `before` (target <= 2)
  upsert p99  Upsert p99 in `mixed`; upsert/disk1 = upsert p99 / disk1 p99 of the same round (target <= 3)
  cpu         server CPU (all processes, cores) and kernel threads (kworker/jbd2/ksoftirqd...) per window,
              the load clients' own CPU, /proc/vmstat pgpgout and the peak of Dirty+Writeback, disk flushes
              (/proc/diskstats) per window
  other       cores used by processes outside the run (the worst of the round's three windows): discard rounds
              where it is not ~0, a neighbour was measured

Variant keys: `tree=DIR` runs `python -m resolver serve` with DIR first on PYTHONPATH (a copy of another
version of the package, e.g. the code before a change); `preload=LIB` sets LD_PRELOAD (e.g.
/usr/lib/x86_64-linux-gnu/libeatmydata.so: every fsync a no-op, the no-durability reference);
`env.NAME=VALUE` any environment variable of the server; `workers=N`. Without --variant: one variant, `main`.
Example (before/after a change, plus the no-fsync reference):

    .venv/bin/python -m bench.writes_vs_reads --rounds 3 --variant before:tree=/tmp/wvr/before_tree \\
        --variant after --variant nofsync:preload=/usr/lib/x86_64-linux-gnu/libeatmydata.so

The figures of every window go to --json (default WORK/results-<time>.json).
"""

