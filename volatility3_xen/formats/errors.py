"""The one exception type the format readers raise for damaged or unsupported files."""

from __future__ import annotations


class XenFormatError(Exception):
    """A Xen memory file (dump-core, save image, ...) is malformed, truncated or unsupported.

    The message is one line that names the problem and, where there is one, the file
    offset (``str(exc)`` is meant to be shown to an analyst as is).  The format readers
    import nothing of Volatility; the layers re-raise this as
    ``volatility3_xen.layers.errors.XenFormatError`` (a Volatility
    ``LayerException`` that is also a ``XenFormatError``).
    """

    def __init__(self, source: str, message: str) -> None:
        message = printable(message)
        super().__init__(source, message)
        self.source = source
        self.message = message

    def __str__(self) -> str:
        return self.message


def printable(text: str) -> str:
    """``text`` with every non-printable character escaped (``\\n``, ``\\x1b``, ``\\x00``).

    Names and strings come from the file: a control character would forge output lines,
    or drive the analyst's terminal with escape sequences, when printed or logged.
    """
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode() for c in text)
