"""`python -m resolver` is the `resolver` command."""

import sys

from resolver.cli import main

if __name__ == "__main__":  # a spawned worker imports this module too: only the real entry point runs main
    sys.exit(main())
