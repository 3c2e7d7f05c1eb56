"""Benchmarks (bench/README.md). Servers they start read examples/blueprint.toml or blueprints of their own."""

import base64
import os

# examples/blueprint.toml encrypts its sensitive attribute with the key in this variable: a fixed, public bench key
# unless the caller set one (the servers a bench starts inherit it).
os.environ.setdefault("RESOLVER_ENCRYPTION_KEY", base64.b64encode(bytes(range(32))).decode())
