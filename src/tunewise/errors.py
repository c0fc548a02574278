"""The one error type a user mistake raises: a message that names file, line, field and fix.

The CLI catches `TunewiseError`, prints `str(err)` and exits with code 2; anything else is a
bug in tunewise and keeps its traceback.
"""

from __future__ import annotations

from pathlib import Path


class TunewiseError(Exception):
    """A problem with the user's input, explained so that they can fix it."""

    def __init__(
        self,
        message: str,
        *,
        file: str | Path | None = None,
        line: int | None = None,
        field: str | None = None,
        fix: str | None = None,
    ) -> None:
        self.message = message
        self.file = str(file) if file is not None else None
        self.line = line
        self.field = field
        self.fix = fix
        super().__init__(str(self))

    def __str__(self) -> str:
        where = ""
        if self.file:
            where = self.file + (f":{self.line}" if self.line is not None else "")
        head = ": ".join(p for p in (where, f"field '{self.field}'" if self.field else "") if p)
        text = f"{head}: {self.message}" if head else self.message
        if self.fix:
            text += f"\n  fix: {self.fix}"
        return text
