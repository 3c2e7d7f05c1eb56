"""Command line: argv -> Settings -> run. `resolver serve | import | export | backup | restore | check | compact |
dlq | outbound | forget | audit | rekey | key new | lookup | stats | blueprint check`."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from resolver.config import describe, load_settings
from resolver.errors import ClusterError, ConfigError, StoreError
from resolver.logs import setup_logging

DEFAULT_CONFIG_HELP = "blueprint TOML file (default: none, built-in defaults)"


def _store_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", metavar="FILE", help=DEFAULT_CONFIG_HELP)
    p.add_argument("--data-dir", metavar="DIR", help="LMDB data directory (default: ./data)")


# With [cluster] every change goes through the replicated log (resolver.cluster): commands that would change one
# node's customers behind it are refused, with the way that keeps every node equal.
CLUSTER_REFUSED = {
    "import": "a cluster node's store changes only through the replicated log: import into a store without [cluster], "
              "then start every node from a `resolver backup` of it (README \"Past one machine\")",
    "forget": "a cluster node's store changes only through the replicated log: erase through the Forget RPC of any "
              "node",
    "dlq": "a cluster node's store changes only through the replicated log: use the dead-letter RPCs of the node "
           "that accepted the event (ListDeadLetters, ReplayDeadLetter, DiscardDeadLetter)",
    "outbound": "a cluster node's store changes only through the replicated log: use the outbound RPCs of any node "
                "(ListOutboundDeadLetters, ReplayOutboundDeadLetter, DiscardOutboundDeadLetter, GetOutboundCounters)",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="resolver", description="Real-time customer identity resolution.")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="serve the gRPC API")
    _store_args(serve)
    serve.add_argument("--listen", metavar="HOST:PORT", help="address to serve on (default: 127.0.0.1:50051)")
    serve.add_argument("--workers", type=int, metavar="N", help="worker processes sharing the port (default: CPUs)")
    serve.add_argument("--cluster", metavar="URLS", help="NATS servers (nats://HOST:PORT,...): writes go through "
                       "their replicated log, this node applies it to its own store ([cluster] nats; one worker)")

    imp = sub.add_parser("import", help="bulk-load customers from JSON lines or CSV")
    _store_args(imp)
    imp.add_argument("file", help="input file (JSON lines of UpsertRequest, or CSV)")
    imp.add_argument("--format", choices=("jsonl", "csv", "export"),
                     help="input format (default: a `resolver export` file by its first line, else from the name)")
    imp.add_argument("--batch-size", type=int, default=2000, metavar="N", help="rows per write transaction")
    imp.add_argument("--rejects", metavar="FILE", help="where rejected rows go (default: FILE.rejected.jsonl)")
    imp.add_argument("--default-region", metavar="CC", default="", help="region for national phone numbers")
    imp.add_argument("--source-system", default="", help="source_system for rows that do not name one")
    imp.add_argument("--no-progress", action="store_true", help="no progress bar")
    imp.add_argument("--commit-every-batch", action="store_true",
                     help="into an empty store too, commit each batch (default there: one transaction, all or nothing)")

    check = sub.add_parser("check", help="verify that indexes and records agree (exit 1 if not)")
    _store_args(check)

    backup = sub.add_parser("backup", help="copy the store, compacted and checked, into DIR with a manifest "
                                           "(while servers serve and write)")
    _store_args(backup)
    backup.add_argument("dir", metavar="DIR", help="a new or empty directory")
    restore = sub.add_parser("restore", help="restore a backup into an empty data directory (verified, checked)")
    _store_args(restore)
    restore.add_argument("dir", metavar="DIR", help="the backup's directory (data.mdb and manifest.json)")
    export = sub.add_parser("export", help="write every customer as JSON lines (`resolver import` loads the file "
                                           "into an empty store)")
    _store_args(export)
    export.add_argument("file", metavar="FILE", help="the file to write (must not exist)")

    compact = sub.add_parser("compact", help="rewrite the store with its live data only, dropping the bytes of "
                                             "deleted data (stop every server on the directory first)")
    _store_args(compact)

    reindex = sub.add_parser("reindex", help="rebuild the identifier indexes under the [index] hash and key of "
                                             "--config (stop every server on the directory first)")
    reindex.add_argument("--config", metavar="NEW.toml", required=True, help="the blueprint whose [index] to use")
    reindex.add_argument("--data-dir", metavar="DIR", help="LMDB data directory (default: ./data)")
    reindex.add_argument("--drop-record-tombstones", action="store_true",
                         help="forget which deleted CRM records were deleted (their keys cannot follow a new key)")

    dlq = sub.add_parser("dlq", help="dead-letter queue of CRM change events: list, show, replay, discard")
    dlq_sub = dlq.add_subparsers(dest="dlq_command", required=True)
    for name, text in (("list", "list dead letters (payloads masked)"), ("show", "one dead letter, PII masked"),
                       ("replay", "re-run validation, mapping and apply with the current blueprint"),
                       ("discard", "delete a dead letter for good")):
        cmd = dlq_sub.add_parser(name, help=text)
        _store_args(cmd)
        if name != "list":
            cmd.add_argument("id", type=int, help="dead-letter id (from `resolver dlq list`)")
        else:
            cmd.add_argument("--after", type=int, default=0, metavar="ID", help="start after this id")
            cmd.add_argument("--limit", type=int, default=100, metavar="N")

    from resolver.outbound.cli import add_parser as add_outbound

    add_outbound(sub, _store_args)

    from resolver.forget_cli import add_parsers as add_forget

    add_forget(sub, _store_args)

    from resolver.auth import add_parser as add_token

    add_token(sub)

    from resolver.rekey import add_parsers as add_rekey

    add_rekey(sub, _store_args)

    from resolver.lookup import add_parser as add_lookup
    from resolver.stats import add_parser as add_stats

    add_lookup(sub)
    add_stats(sub, _store_args)

    bp = sub.add_parser("blueprint", help="blueprint tools")
    bp_sub = bp.add_subparsers(dest="blueprint_command", required=True)
    bp_check = bp_sub.add_parser("check", help="validate a blueprint and print a summary")
    bp_check.add_argument("file")

    bench = sub.add_parser("bench", help="benchmark tools (from a source checkout)")
    bench_sub = bench.add_subparsers(dest="bench_command", required=True)
    load = bench_sub.add_parser("load", help="open-loop load generator (bench/loadgen); --help for its options",
                                add_help=False)
    load.add_argument("args", nargs=argparse.REMAINDER)
    return parser


def run_bench_load(argv: list[str]) -> int:
    """`resolver bench load ...`: the load generator lives in the source checkout's bench/, not the package."""
    from pathlib import Path

    for root in (Path.cwd(), Path(__file__).resolve().parent.parent):  # the checkout: here, or where we are installed from
        if (root / "bench" / "loadgen").is_dir() and str(root) not in sys.path:
            sys.path.insert(0, str(root))
            break
    try:
        from bench.loadgen.__main__ import main as load_main
    except ImportError as exc:
        print(f"resolver: bench load needs a source checkout of resolver (run it from the repository root) "
              f"with the bench extras installed (pip install -e '.[bench]'): {exc}", file=sys.stderr)
        return 2
    return load_main(argv, prog="resolver bench load")


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:2] == ["bench", "load"]:  # every option after it is the load generator's
        return run_bench_load(argv[2:])
    args = build_parser().parse_args(argv)
    try:
        if args.command == "token":  # needs no blueprint: it only makes a token and its tokens-file line
            from resolver.auth import run_token

            return run_token(args)
        if args.command == "key":  # needs no blueprint either: it only prints a fresh key
            from resolver.rekey import run_key

            return run_key(args)
        if args.command == "lookup":  # a client of a running server: no blueprint, no store
            from os import environ

            from resolver.lookup import run_lookup

            return run_lookup(args, environ)
        if args.command == "blueprint":
            settings = load_settings(args.file)
            print(describe(settings))
            print("blueprint OK")
            return 0
        overrides = {"data_dir": args.data_dir}
        if args.command == "serve":
            overrides |= {"listen": args.listen, "workers": args.workers}
            if args.cluster:  # a cluster node serves with one worker unless told otherwise (and then refuses)
                overrides |= {"nats": tuple(args.cluster.split(",")), "workers": args.workers or 1}
        settings = load_settings(args.config, **overrides)
        setup_logging(settings)
        if settings.cluster.nats and args.command in CLUSTER_REFUSED:
            print(f"resolver: {args.command}: {CLUSTER_REFUSED[args.command]}", file=sys.stderr)
            return 2
        if args.command == "serve":
            from resolver.server import serve

            return serve(settings, announce=lambda line: print(line, flush=True))
        if args.command == "import":
            from resolver.importer import run_import

            return run_import(settings, args)
        if args.command == "check":
            from resolver.check import run_check

            return run_check(settings)
        if args.command == "stats":
            from resolver.stats import run_stats

            return run_stats(settings, as_json=args.json)
        if args.command in ("backup", "restore"):
            from pathlib import Path

            from resolver.backup import run_backup, run_restore

            return (run_backup if args.command == "backup" else run_restore)(settings, Path(args.dir))
        if args.command == "export":
            from pathlib import Path

            from resolver.export import run_export

            return run_export(settings, Path(args.file))
        if args.command == "compact":
            from resolver.compact import run_compact

            return run_compact(settings)
        if args.command == "reindex":
            from resolver.reindex import run_reindex

            return run_reindex(settings, drop_record_tombstones=args.drop_record_tombstones)
        if args.command == "rekey":
            from resolver.rekey import run_rekey

            return run_rekey(settings, args)
        if args.command == "dlq":
            from resolver.events.cli import run_dlq

            return run_dlq(settings, args)
        if args.command == "outbound":
            from resolver.outbound.cli import run_outbound

            return run_outbound(settings, args)
        if args.command == "forget":
            from resolver.forget_cli import run_forget

            return run_forget(settings, args)
        if args.command == "audit":
            from resolver.forget_cli import run_audit

            return run_audit(settings, args)
    except ConfigError as exc:
        print(f"resolver: {exc}", file=sys.stderr)
        return 2
    except (StoreError, ClusterError, OSError) as exc:  # ClusterError: NATS unreachable, another stream's store
        print(f"resolver: {exc}", file=sys.stderr)
        return 2
    raise AssertionError(f"unhandled command {args.command}")


if __name__ == "__main__":
    sys.exit(main())
