"""The exception the Volatility layers raise for an unusable Xen file."""

from __future__ import annotations

from volatility3.framework import exceptions

from ..formats.errors import XenFormatError, printable


class XenCoreFormatException(exceptions.LayerException, XenFormatError):
    """A Xen memory file cannot be mapped (a Volatility ``LayerException``).

    Also a ``XenFormatError``, so one ``except XenFormatError`` catches what the format
    readers and the layers raise.  ``str(exc)`` is one line, safe to print.
    """

    def __init__(self, layer_name: str, message: str) -> None:
        message = printable(message)
        # Both bases' __init__ chain through super() with different signatures: set
        # what each one would set, once.
        Exception.__init__(self, layer_name, message)
        self.layer_name = layer_name
        self.source = layer_name
        self.message = message

    def __str__(self) -> str:
        return self.message

    @classmethod
    def from_format_error(cls, layer_name: str, error: XenFormatError) -> XenCoreFormatException:
        return cls(layer_name, error.message)
