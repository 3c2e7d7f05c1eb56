"""What TLS and the token check cost the server (issue 16): server CPU per Resolve, plaintext without a token vs
TLS with a bearer token, in the same run.

    python -m bench.security [--rate 1000] [--seconds 15] [--rounds 5] [--workers 1] [--customers 2000]
                             [--out bench/out/security]

One data directory gets N customers (one phone each, one write transaction: bench/hostile.py's loader). Two
`resolver serve` processes run on it side by side (several servers may share a directory), both with the same
blueprint but for security:

- **plain**: no `[tls]`, no `[auth]`: plaintext, no token asked for;
- **secure**: `[tls]` with a certificate from tests/certs.py (EC P-256, the CA the client trusts), and, when
  resolver.auth exists, `[auth] tokens_file` with one `bench resolve sha256:HEX` line; every call then carries
  `authorization: Bearer TOKEN` (checked once before the run: a call without it must be refused).

`[logging] level = "WARNING"` in both: the access line of each call is the same work with or without TLS and
would only blur the difference.

A window: one client process (spawned; its own CPU is not counted) opens one channel (one connection: the TLS
handshake happens once, before the window, so this is the steady cost of encrypting calls and checking the
token, not of handshakes), sends Resolve of a known phone at --rate on a uniform open-loop schedule for
--seconds through the stub's `future()`, and waits for every answer. The server's CPU is utime+stime of the
serving process tree (bench/procstat.py) read before and after the window, divided by the calls answered OK;
every call must answer OK. Each configuration gets one unmeasured warm-up window, then each round runs both
configurations back to back, the order alternating each round, so drift on this shared machine hits both alike.
A figure is the median over rounds; the ratio and the cost (secure minus plain, µs per Resolve) are the median of
the per-round ratios and differences. Writes OUT/results.json and OUT/report.md; prints the report.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import random
import statistics
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from bench import procstat
from bench.hostile import load_customers, phone

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ("plain", "secure")
BLUEPRINT = textwrap.dedent(
    """
    version = 1
    [server]
    threads = 16
    [storage]
    map_size_mb = 256
    [logging]
    level = "WARNING"
    """
)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


@dataclass(frozen=True)
class Client:
    """How the client of one configuration connects: the CA it trusts (None: plaintext) and its token ("": none)."""

    root_certificates: bytes | None
    token: str


# -- the client process (spawned) ---------------------------------------------------------------------------------


def _client(target: str, client: Client, rate: float, seconds: float, phones: list[str], ready: Any, start: Any,
            out: Any) -> None:
    """Connect, warm up, report ready; at the start time sent by the parent, send `rate` Resolves per second for
    `seconds` (uniform schedule), wait for every answer, report the codes and how late the sends were."""
    import grpc

    from resolver.client import tls_credentials
    from resolver.v1 import resolver_pb2 as pb
    from resolver.v1 import resolver_pb2_grpc

    channel = (grpc.secure_channel(target, tls_credentials(client.root_certificates))
               if client.root_certificates is not None else grpc.insecure_channel(target))
    stub = resolver_pb2_grpc.IdentityResolverStub(channel)
    metadata = (("authorization", f"Bearer {client.token}"),) if client.token else None
    requests = [pb.ResolveRequest(identifiers=pb.Identifiers(phones=[p])) for p in phones]
    stub.Resolve(requests[0], timeout=10, metadata=metadata)  # connected (and handshaken) before the window
    ready.put(True)
    begin = start.get()
    codes: Counter[str] = Counter()
    lock = threading.Condition()
    pending = [0]

    def done(fut: Any) -> None:
        with lock:
            codes[fut.code().name] += 1
            pending[0] -= 1
            lock.notify_all()

    count, late = int(rate * seconds), 0
    for i in range(count):
        when = begin + i / rate
        wait = when - time.monotonic()
        if wait > 0:
            time.sleep(wait)
        elif wait < -0.001:
            late += 1
        with lock:
            pending[0] += 1
        stub.Resolve.future(requests[i % len(requests)], timeout=5, metadata=metadata).add_done_callback(done)
    with lock:
        lock.wait_for(lambda: pending[0] == 0, timeout=30)
    channel.close()
    out.put({"codes": dict(codes), "sent": count, "late_sends": late, "span_s": time.monotonic() - begin})


# -- the servers ----------------------------------------------------------------------------------------------------


class Server:
    """One `resolver serve` on the shared data directory; its port read from the "serving on" line."""

    def __init__(self, name: str, config: Path, data: Path, workers: int, work: Path) -> None:
        self.name = name
        self.log_path = work / f"server-{name}.log"
        with self.log_path.open("w") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "resolver", "serve", "--config", str(config), "--data-dir", str(data),
                 "--listen", "127.0.0.1:0", "--workers", str(workers)], stdout=out, stderr=subprocess.STDOUT,
                cwd=ROOT)
        deadline = time.monotonic() + 60
        while "serving on 127.0.0.1:" not in (text := self.log_path.read_text()):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise SystemExit(f"the {name} server did not start:\n{text[-2000:]}")
            time.sleep(0.1)
        self.port = int(text.split("serving on 127.0.0.1:")[1].split()[0])

    def cpu(self) -> float:
        return procstat.tree_cpu_seconds(self.proc.pid)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


def secure_config(work: Path) -> tuple[str, Client]:
    """The blueprint additions of the secure configuration, and how its client connects."""
    from tests.certs import make_pki

    pki = make_pki(work / "pki", name="bench")
    text = f'[tls]\ncert_file = "{pki.server_cert}"\nkey_file = "{pki.server_key}"\n'
    try:
        from resolver.auth import new_token
    except ImportError:  # no token check in this tree: TLS alone is measured (the report says so)
        return text, Client(pki.ca_cert.pem, "")
    token = new_token("bench", "resolve")
    tokens = work / "tokens"
    tokens.write_text(token.line + "\n")
    return text + f'[auth]\ntokens_file = "{tokens}"\n', Client(pki.ca_cert.pem, token.token)


def check_token_is_asked(port: int, client: Client) -> None:
    """The secure server refuses a call without the token (else the bench would not measure the check)."""
    import grpc

    from resolver.client import tls_credentials
    from resolver.v1 import resolver_pb2 as pb
    from resolver.v1 import resolver_pb2_grpc

    assert client.root_certificates is not None
    with grpc.secure_channel(f"127.0.0.1:{port}", tls_credentials(client.root_certificates)) as channel:
        try:
            resolver_pb2_grpc.IdentityResolverStub(channel).Resolve(
                pb.ResolveRequest(identifiers=pb.Identifiers(phones=[phone(0)])), timeout=10)
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.UNAUTHENTICATED:
                return
            raise SystemExit(f"a call without a token got {exc.code().name}, not UNAUTHENTICATED") from None
    raise SystemExit("the secure server answered a call without a token: the token check is not on")


def window(ctx: Any, server: Server, client: Client, rate: float, seconds: float, phones: list[str]) -> dict[str, Any]:
    """One measured window against `server`: calls, codes and the server's CPU µs per OK Resolve."""
    ready, start, out = ctx.Queue(), ctx.Queue(), ctx.Queue()
    proc = ctx.Process(target=_client, args=(f"127.0.0.1:{server.port}", client, rate, seconds, phones, ready, start,
                                             out))
    proc.start()
    try:
        ready.get(timeout=60)
        cpu0 = server.cpu()
        start.put(time.monotonic() + 0.2)
        got = out.get(timeout=seconds + 90)
        cpu = server.cpu() - cpu0
    finally:
        proc.join(30)
        if proc.is_alive():
            proc.kill()
    ok = got["codes"].get("OK", 0)
    # A stall of this VM can fill the server's max_concurrent_rpcs: those calls are refused (RESOURCE_EXHAUSTED),
    # counted and reported; any other failure means the configuration is wrong, and the figure would be too.
    wrong = {code: n for code, n in got["codes"].items() if code not in ("OK", "RESOURCE_EXHAUSTED")}
    if wrong or ok < got["sent"] * 0.9:
        raise SystemExit(f"{server.name}: {got['sent'] - ok} of {got['sent']} calls failed: {got['codes']}")
    return {**got, "refused": got["sent"] - ok, "server_cpu_s": cpu,
            "cpu_us_per_resolve": cpu / ok * 1e6, "achieved_rate": ok / got["span_s"]}


class AbServers(NamedTuple):
    """What `ab_servers` holds for a bench: its spawn context, the servers by configuration, the phones to resolve."""

    ctx: Any
    servers: dict[str, Server]
    phones: list[str]


@contextmanager
def ab_servers(a: argparse.Namespace, seed: int, blueprints: Callable[[Path], dict[str, str]]) -> Iterator[AbServers]:
    """A temporary directory with `a.customers` customers and one `resolver serve` (`a.workers` workers) on them per
    configuration (`blueprints(work)`: name -> blueprint text), all stopped on leaving; up to 1,000 of the customers'
    phones, drawn with `seed`, for the clients. A server stopped inside the block (to read its whole log) stays so."""
    rng = random.Random(seed)
    phones = [phone(i) for i in rng.sample(range(a.customers), min(a.customers, 1000))]
    with tempfile.TemporaryDirectory(prefix="bench-ab-") as tmp:
        work = Path(tmp)
        data = work / "data"
        log(f"{a.customers} customers -> {data}")
        load_customers(data, a.customers)
        servers: dict[str, Server] = {}
        try:
            for name, text in blueprints(work).items():
                config = work / f"{name}.toml"
                config.write_text(text)
                servers[name] = Server(name, config, data, a.workers, work)
            yield AbServers(multiprocessing.get_context("spawn"), servers, phones)
        finally:
            for server in servers.values():
                server.stop()


def measure(a: argparse.Namespace) -> dict[str, Any]:
    clients = {"plain": Client(None, "")}

    def blueprints(work: Path) -> dict[str, str]:
        secure_text, clients["secure"] = secure_config(work)
        return {"plain": BLUEPRINT, "secure": BLUEPRINT + secure_text}

    with ab_servers(a, 16, blueprints) as ab:
        servers, secure_client = ab.servers, clients["secure"]
        if secure_client.token:
            check_token_is_asked(servers["secure"].port, secure_client)
        log(f"servers: plain :{servers['plain'].port}, secure :{servers['secure'].port} (TLS"
            f"{' + token' if secure_client.token else ', no token check in this tree'}); warm-up")
        for name in CONFIGS:
            window(ab.ctx, servers[name], clients[name], a.rate, min(a.seconds, 3.0), ab.phones)
        measured = ab_rounds(CONFIGS, a.rounds,
                             lambda name: window(ab.ctx, servers[name], clients[name], a.rate, a.seconds, ab.phones))
    return {"rate": a.rate, "seconds": a.seconds, "workers": a.workers, "customers": a.customers,
            "token_checked": bool(secure_client.token), "rounds": measured.rounds, "machine": measured.machine}


@dataclass(frozen=True)
class AbRounds:
    """What alternating rounds measured: each round's windows by configuration, and the machine over the rounds."""

    rounds: list[dict[str, Any]]
    machine: dict[str, Any]


def ab_rounds(configs: tuple[str, str], count: int, measure: Callable[[str], dict[str, Any]]) -> AbRounds:
    """`count` rounds, each a measured window (`measure(name)`, a `window` result) of both configurations back to
    back, the order alternating each round so that drift on this shared machine hits both alike; the machine's
    load, how busy it was and what other processes took, over the rounds."""
    watch = procstat.MachineWatch()
    rounds: list[dict[str, Any]] = []
    for r in range(count):
        order = configs if r % 2 == 0 else configs[::-1]
        got = {name: measure(name) for name in order}
        rounds.append(got)
        log(f"round {r + 1}/{count}: " + ", ".join(
            f"{n} {got[n]['cpu_us_per_resolve']:.0f} µs CPU per Resolve" for n in configs))
    return AbRounds(rounds, watch.figures())


def ab_table(res: dict[str, Any], labels: dict[str, str], what: str) -> list[str]:
    """The report rows two alternating configurations share (`labels`: baseline first, then the one costed):
    per-configuration medians, the cost and ratio as medians of per-round differences and ratios, the machine."""
    (base, base_label), (other, other_label) = labels.items()
    per = {n: [r[n]["cpu_us_per_resolve"] for r in res["rounds"]] for n in labels}
    ratio = statistics.median(r[other]["cpu_us_per_resolve"] / r[base]["cpu_us_per_resolve"] for r in res["rounds"])
    cost = statistics.median(r[other]["cpu_us_per_resolve"] - r[base]["cpu_us_per_resolve"] for r in res["rounds"])
    m = res["machine"]
    rows = ["| configuration | server µs CPU per Resolve, median | min..max | achieved Resolve/s, median | refused |",
            "| --- | ---: | ---: | ---: | ---: |"]
    for name, label in ((base, base_label), (other, other_label)):
        rates = [r[name]["achieved_rate"] for r in res["rounds"]]
        rows.append(f"| {label} | {statistics.median(per[name]):.0f} | {min(per[name]):.0f}..{max(per[name]):.0f} | "
                    f"{statistics.median(rates):,.0f} | {sum(r[name].get('refused', 0) for r in res['rounds'])} |")
    return rows + ["", f"**Cost of {what}: {cost:+.0f} µs CPU per Resolve, ratio {ratio:.3f}** (medians of per-round "
                   "differences and ratios).", "",
                   f"Machine: {m['cores']} cores ({m['cpu_model']}), busy {m['busy']:.0%}, other processes "
                   f"{m['foreign_cores']} cores, load average {m['loadavg_before']:.2f} → {m['loadavg_after']:.2f}."]


def report(res: dict[str, Any]) -> str:
    secure = "TLS + bearer token" if res["token_checked"] else "TLS (no token check in this tree)"
    return "\n".join([
        "# Server CPU per Resolve: plaintext without a token vs TLS with a token", "",
        f"{res['rate']:g} Resolve/s for {res['seconds']:g} s per window, {len(res['rounds'])} rounds (order alternating), "
        f"{res['workers']} worker(s), {res['customers']} customers; one connection per window (handshake before it).",
        "", *ab_table(res, {"plain": "plaintext, no token", "secure": secure}, secure)])


def ab_parser(prog: str, doc: str | None, out: str) -> argparse.ArgumentParser:
    """The options of a bench that alternates two server configurations (this one, bench.metrics)."""
    p = argparse.ArgumentParser(prog=prog, description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rate", type=float, default=1000.0, help="Resolve calls per second in a window (default 1000)")
    p.add_argument("--seconds", type=float, default=15.0, help="seconds per window (default 15)")
    p.add_argument("--rounds", type=int, default=5, help="rounds, both configurations once per round (default 5)")
    p.add_argument("--workers", type=int, default=1, help="worker processes of each server (default 1)")
    p.add_argument("--customers", type=int, default=2000, help="customers in the data directory (default 2000)")
    p.add_argument("--out", default=str(ROOT / "bench" / "out" / out), help="where the report goes")
    return p


def ab_args_problem(a: argparse.Namespace) -> str | None:
    if a.rate <= 0 or a.seconds <= 0 or a.rounds < 1 or a.workers < 1 or a.customers < 1:
        return "--rate and --seconds above 0; --rounds, --workers and --customers at least 1"
    return None


def write_report(res: dict[str, Any], out: Path, text: str) -> None:
    """OUT/results.json and OUT/report.md; the report printed."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(res, indent=1))
    (out / "report.md").write_text(text + "\n")
    print(text)


def ab_main(p: argparse.ArgumentParser, argv: list[str] | None, measure: Callable[[argparse.Namespace], dict[str, Any]],
            report: Callable[[dict[str, Any]], str],
            problem: Callable[[argparse.Namespace], str | None] = ab_args_problem) -> int:
    """A bench of two alternating configurations end to end: `argv` parsed by `p` (ab_parser's, with the bench's
    own options), refused with what `problem` finds, measured, then the report (with the command and the date)
    written and printed."""
    a = p.parse_args(argv)
    found = problem(a)
    if found:
        p.error(found)
    res = measure(a)
    res["command"] = f"{p.prog} " + " ".join(argv if argv is not None else sys.argv[1:])
    res["date"] = time.strftime("%Y-%m-%d %H:%M")
    write_report(res, Path(a.out), report(res))
    return 0


def main(argv: list[str] | None = None) -> int:
    return ab_main(ab_parser("python -m bench.security", __doc__, "security"), argv, measure, report)


if __name__ == "__main__":
    sys.exit(main())
