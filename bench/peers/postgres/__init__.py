"""The PostgreSQL peer: the same Resolve semantics over indexed normalized keys in PostgreSQL 15.

cluster.py installs PostgreSQL (apt-get) if missing and runs a throwaway cluster on 127.0.0.1; load.py loads the
benchmark's customers file; server.py serves resolver.v1 Resolve and grpc.health.v1 like resolver.server does.
"""
