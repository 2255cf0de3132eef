"""User-facing errors: one readable line, no traceback."""

from __future__ import annotations


class VcellError(Exception):
    """A problem with the user's input or request.

    The CLI prints ``error: <message>`` on one line and exits with status 2; the message must name
    the file, column or value at fault so the user can fix it without reading a traceback.
    """

    exit_code = 2

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))
