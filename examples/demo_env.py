"""Print the demo's secrets as shell exports (`make run` writes them once to ./data/demo.env, mode 0600).

The example blueprint names its secrets by environment variable: the encryption key of its sensitive attributes and
the webhook secrets of its two CRM sources. The demo makes fresh random ones, so no secret is ever committed.
"""

import base64
import secrets


def _random(n: int) -> str:
    return base64.b64encode(secrets.token_bytes(n)).decode()


for name, prefix in (("RESOLVER_ENCRYPTION_KEY", ""), ("RESOLVER_SALESFORCE_SECRET", "whsec_"),
                     ("RESOLVER_BILLING_SECRET", "whsec_"), ("RESOLVER_BILLING_SECRET_PREVIOUS", "whsec_")):
    print(f"export {name}={prefix}{_random(32)}")
