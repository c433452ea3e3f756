"""User-facing errors: the CLI prints these as one line, without a traceback."""

from __future__ import annotations


class BertrecError(Exception):
    """A mistake the user can fix (bad input file, missing model, bad flag)."""


class DataError(BertrecError):
    """Malformed input data, located by file and line so the user can find it."""

    def __init__(self, path: str, message: str, line: int | None = None) -> None:
        where = f"{path}:{line}" if line is not None else path
        super().__init__(f"{where}: {message}")
        self.path = path
        self.line = line


class ArtifactError(BertrecError):
    """A model version is missing, incomplete or corrupted."""
