"""Logging set-up of every resolver process (the CLI, each serving worker, the events process).

Log lines never carry request payloads: identifiers and attribute values reach a log only masked
(resolver.normalize.mask), and the call sites log no payload at all.
"""

from __future__ import annotations

import logging
import sys

from resolver.config import Settings

FORMAT = "%(asctime)s %(levelname)s %(name)s[%(process)d]: %(message)s"


def setup_logging(settings: Settings) -> None:
    """Log to stderr at the blueprint's `[logging] level` (first call in a process wins, as logging.basicConfig)."""
    logging.basicConfig(level=getattr(logging, settings.logging.level), format=FORMAT, stream=sys.stderr)
