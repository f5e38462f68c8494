"""The one exception type for damaged or unsupported Xen dump-core files."""

from volatility3.framework import exceptions


class XenCoreFormatException(exceptions.LayerException):
    """A Xen dump-core file is malformed, truncated or unsupported.

    The message is one line that names the problem and, where there is one, the file
    offset (``str(exc)`` is meant to be shown to an analyst as is).  It subclasses
    Volatility's ``LayerException`` so that Volatility's own handlers treat it as a layer
    problem, not as a bug.
    """

    def __init__(self, layer_name: str, message: str) -> None:
        message = printable(message)
        super().__init__(layer_name, message)
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
