"""Every exception the library raises on bad input, in a module that imports nothing heavy.

Each carries a one-line message meant for the user: entry points print it
as ``error: <message>`` and exit with code 2; scoring turns an
:class:`ImageDecodeError` into an error row.
"""

from __future__ import annotations

import re


class HeadCLIPError(ValueError):
    """Base of the errors below: bad input, described in one line."""


class CheckpointError(HeadCLIPError):
    """A checkpoint that cannot be read, or does not fit the backbone."""


class InputError(HeadCLIPError):
    """An input that cannot be listed (missing, empty, malformed manifest)."""


class InputNotFoundError(InputError):
    """An input location that does not exist (as opposed to one that exists but holds no images)."""


class EmptyInputError(InputError):
    """An input location that exists but holds no images."""


class PlanError(InputError):
    """A stored run plan that is damaged (edited, truncated, a piece missing); the message says how to recover."""


class OutputError(HeadCLIPError):
    """An output location that cannot be read or written."""


class DatasetError(HeadCLIPError):
    """A labelled data set that cannot be loaded as asked."""


class ImageDecodeError(HeadCLIPError):
    """An image that cannot be scored. ``width``/``height`` are set when known."""

    def __init__(self, message: str, width: int | None = None, height: int | None = None):
        super().__init__(message)
        self.width = width
        self.height = height


class ThresholdsError(HeadCLIPError):
    """A thresholds file that cannot be read, or was calibrated with another checkpoint."""


class UsageError(HeadCLIPError):
    """Bad flags or arguments of an entry point, found before any work starts."""


class JobError(HeadCLIPError):
    """A run that cannot go on (output that cannot be written, shards that keep failing); one line."""


class PlacementError(UsageError):
    """Scoring actors whose resources no node of the cluster can provide, within the wait allowed."""


class LockedError(HeadCLIPError):
    """Another live process holds the lock of what this one would write (an audit of the same day)."""


def cause_line(err: BaseException) -> str:
    """The one line that says why a remote call failed: the last 'SomeError: message' line of its report."""
    cause = getattr(err, "cause", None)
    if isinstance(cause, BaseException) and str(cause).strip():
        return f"{type(cause).__name__}: {' '.join(str(cause).split())[:300]}"
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    named = [line for line in lines if re.match(r"^[\w.]*(Error|Exception)\b.*:", line)]
    return " ".join((named[-1] if named else lines[0] if lines else type(err).__name__).split())[:300]


class ReviewError(HeadCLIPError):
    """A review file that cannot be imported as it is; ``problems`` holds one line per fault found."""

    def __init__(self, message: str, problems: list[str] | None = None):
        super().__init__(message)
        self.problems = list(problems or [])
