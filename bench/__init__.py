"""Benchmarks (bench/README.md). Servers they start read examples/blueprint.toml or blueprints of their own."""

import base64
import os
import secrets

# examples/blueprint.toml encrypts its sensitive attribute with the key in this variable: a fixed, public bench key
# unless the caller set one (the servers a bench starts inherit it).
os.environ.setdefault("RESOLVER_ENCRYPTION_KEY", base64.b64encode(bytes(range(32))).decode())
# Its two CRM sources' webhook secrets: `resolver serve` refuses to start without them (contract: secrets that cannot
# be read stop the server). No bench signs with them, so each run makes random ones unless the caller set them.
for _name in ("RESOLVER_SALESFORCE_SECRET", "RESOLVER_BILLING_SECRET", "RESOLVER_BILLING_SECRET_PREVIOUS"):
    os.environ.setdefault(_name, "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode())
