"""Peers: what a team would build instead of resolver, behind the same gRPC API, for the benchmark."""
