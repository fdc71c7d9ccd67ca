"""The sites package's exceptions."""

from __future__ import annotations

from dataclasses import dataclass


class SiteError(Exception):
    """Base class of every error raised by `sites`."""


@dataclass(frozen=True)
class DataProblem:
    """One problem in a data file, located by file, row and column."""

    file: str
    row: int | None
    column: str | None
    message: str

    def __str__(self) -> str:
        where = self.file
        if self.row is not None:
            where += f", row {self.row}"
        if self.column is not None:
            where += f", column {self.column}"
        return f"{where}: {self.message}"


class DataError(SiteError):
    """A dataset does not match the contract; carries every problem found."""

    def __init__(self, problems: list[DataProblem]) -> None:
        self.problems = tuple(problems)
        shown = "; ".join(str(problem) for problem in problems[:5])
        more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
        super().__init__(f"{shown}{more}")
