#!/bin/sh
# Install PostgreSQL 15 if missing (apt-get) and start a throwaway cluster on 127.0.0.1 in DIR; prints the DSN.
# Usage: bench/peers/postgres/setup.sh DIR   (stop: python -m bench.peers.postgres.cluster stop DIR)
set -eu
cd "$(dirname "$0")/../../.."
exec "${PYTHON:-.venv/bin/python}" -m bench.peers.postgres.cluster start "${1:?usage: setup.sh DIR}"
