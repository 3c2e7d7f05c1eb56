"""A process that holds one LMDB read transaction open on a data directory until told to let go (the long-reader
test of test_limits). Not part of the product: what a backup, an export or a stuck analytics job does to a server.

    python -m tests.reliability.read_holder DATA_DIR

Prints one JSON line once the transaction is open ({"pid", "txnid", "records"}), waits for a line (or EOF) on
stdin, counts the records again in the same transaction (the snapshot must not have moved), prints a second line
({"records"}) and exits.
"""

from __future__ import annotations

import json
import os
import sys

import lmdb

MAX_DBS = 64  # above what the store names (resolver.store); only "records" is opened here


def main(data_dir: str) -> None:
    env = lmdb.open(data_dir, readonly=True, lock=True, max_dbs=MAX_DBS, map_size=0)
    try:
        with env.begin() as txn:
            records = env.open_db(b"records", txn=txn, create=False)
            print(json.dumps({"pid": os.getpid(), "txnid": txn.id(), "records": txn.stat(records)["entries"]}), flush=True)
            sys.stdin.readline()
            print(json.dumps({"records": txn.stat(records)["entries"]}), flush=True)
    finally:
        env.close()


if __name__ == "__main__":
    main(sys.argv[1])
