"""The benches serve examples/blueprint.toml: importing the bench package must give `resolver serve` every secret that
blueprint names, or each bench's server refuses to start (contract §8) on a machine where nobody exported them."""

from __future__ import annotations

import base64
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

_PROBE = """
import bench
from pathlib import Path
from resolver.config import load_settings
from resolver.server import secure_by_default
settings = load_settings(Path("examples/blueprint.toml"), data_dir="unused")
print(secure_by_default(settings))
"""


def test_the_bench_package_lets_the_example_blueprint_serve_with_no_secret_exported() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RESOLVER_")}
    out = subprocess.run([sys.executable, "-c", _PROBE], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=60, check=True)
    assert out.stdout.strip() == "None", out.stdout + out.stderr


def test_without_the_bench_package_the_example_blueprint_is_refused() -> None:
    """The probe above can fail: the same check, without the bench's defaults, names the missing secrets."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RESOLVER_")}
    env["RESOLVER_ENCRYPTION_KEY"] = base64.b64encode(bytes(32)).decode()  # settings load; the webhook secrets lack
    probe = _PROBE.replace("import bench\n", "")
    out = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=60, check=True)
    assert "RESOLVER_SALESFORCE_SECRET" in out.stdout, out.stdout + out.stderr
