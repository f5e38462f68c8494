"""``python -m volatility3_xen.triage``: the same as ``vol-xen-triage``."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
