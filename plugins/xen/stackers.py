"""Registers volatility3-xen's layers and stackers with Volatility.

Volatility imports every module under its plugin directories; importing the library here
is what makes plain ``vol -f guest.core linux.pslist`` stack our Xen layer (stackers are
found by subclassing).  From a source checkout (``vol -p plugins``) the library is not
installed, so fall back to the checkout that holds this file.
"""

import sys
from pathlib import Path

try:
    import volatility3_xen  # noqa: F401
except ImportError:  # running from a checkout: <repo>/plugins/xen/stackers.py
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    import volatility3_xen  # noqa: F401

from volatility3_xen.layers import magic, memory, pv, saveimage, stackers, windows  # noqa: E402,F401  (registration)
from volatility3_xen.layers import inguest  # noqa: E402,F401  (in-guest PV images)
