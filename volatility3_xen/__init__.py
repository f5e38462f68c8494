"""volatility3-xen: Xen dump-core (``xl dump-core``) support for Volatility 3.

Importing the package registers its stackers with Volatility (stackers are found by
subclassing), so ``vol`` picks Xen cores up once the plugin shim imports it.
"""

__version__ = "0.1.0"
