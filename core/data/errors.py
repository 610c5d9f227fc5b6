"""Errors a site's data can raise, and the record of items skipped because of them.

Every problem with a site's files is found when the site is opened, not hours into training,
and the message says which file, what is wrong and how to fix it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


class DatasetError(ValueError):
    """A site's datalist or one of its images is unusable.

    ``path`` is the offending file (the image, or the datalist for schema problems); the message
    reads ``"<path>: <problem>. Fix: <fix>"``.
    """

    def __init__(self, path: str | Path, problem: str, fix: str) -> None:
        self.path = Path(path)
        self.problem = problem
        self.fix = fix
        super().__init__(f"{self.path}: {problem}. Fix: {fix}")


@dataclass(frozen=True)
class SkippedItem:
    """An item left out of a site opened with ``on_error="skip"``, and why."""

    split: str
    position: int  # index in the datalist's split
    path: Path
    reason: str
