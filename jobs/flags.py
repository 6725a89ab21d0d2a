"""The types of the jobs' flags: numbers within their ranges, and JSON options.

Every numeric flag of every job takes a :class:`Number`, so each is range-checked
when the flags are parsed: one line and exit 2, before any work or Ray.
"""

from __future__ import annotations

import argparse
import json


def storage_options_arg(text: str) -> dict:
    """Parse ``--storage-options`` JSON into a dict."""
    try:
        value = json.loads(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"not valid JSON: {err}") from None
    except RecursionError:
        raise argparse.ArgumentTypeError("JSON nested too deeply") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("must be a JSON object")
    return value


def _parse(text: str, cast, what: str):
    try:
        return cast(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not {what}: {text!r}") from None


class Number:
    """An argparse type: a finite number of ``kind`` (int or float) within [low, high].

    Every numeric flag of every job is one of these, so each is range-checked at
    parse time (one line, exit 2, before Ray starts): values past what the job
    can use (a timeout that overflows a clock, days before year 1, a histogram
    that cannot be allocated) are refused like negative ones. ``low_open``:
    ``low`` itself is excluded; ``unit`` names what the value counts.
    """

    def __init__(self, kind, low, high, low_open: bool = False, high_open: bool = False, unit: str = ""):
        self.kind, self.low, self.high, self.low_open, self.high_open, self.unit = (
            kind, low, high, low_open, high_open, unit)
        self.__name__ = kind.__name__  # argparse names the type in some messages

    def range_text(self) -> str:
        left, right = "(" if self.low_open else "[", ")" if self.high_open else "]"
        unit = f" {self.unit}" if self.unit else ""
        return f"in {left}{self.low:g}, {self.high:g}{right}{unit}"

    def __call__(self, text: str):
        value = _parse(text, self.kind, "an integer" if self.kind is int else "a number")
        below = value <= self.low if self.low_open else value < self.low
        above = value >= self.high if self.high_open else value > self.high
        if value != value or below or above:  # NaN fails every comparison
            raise argparse.ArgumentTypeError(f"must be {'an integer' if self.kind is int else 'a number'} "
                                             f"{self.range_text()}, got {text}")
        return value

    def __repr__(self) -> str:
        return f"Number({self.kind.__name__}, {self.range_text()})"


MAX_COUNT = 2**31 - 1  # images, pixels, actors: what an int32 column or a Ray resource can hold
MAX_SECONDS = 1e7  # about 115 days: well inside every clock and timeout the jobs hand seconds to
MAX_DAYS = 3660  # ten years of daily audits
MAX_BINS = 1_000_000  # histogram bins (each class keeps a few arrays of this many float64s)

positive_int = Number(int, 1, MAX_COUNT)
top_int = Number(int, 1, 10_000, unit="images")  # images rendered in a gallery
side_int = Number(int, 1, 16_384, unit="pixels")  # a side of an image, model input or picture
batch_int = Number(int, 1, 65_536, unit="images")  # images in one forward call
layer_int = Number(int, 0, 1_000)  # a transformer layer index
non_negative_int = Number(int, 0, MAX_COUNT)
seed_int = Number(int, 0, 2**32 - 1)
days_int = Number(int, 1, MAX_DAYS, unit="days")
bins_int = Number(int, 1, MAX_BINS, unit="bins")
positive_float = Number(float, 0.0, 1e9, low_open=True)
non_negative_float = Number(float, 0.0, 1e9)
seconds_float = Number(float, 0.001, MAX_SECONDS, unit="seconds")
cpus_float = Number(float, 0.0001, 1e6, unit="CPUs")  # Ray counts resources in steps of 0.0001
unit_float = Number(float, 0.0, 1.0)
open_unit_float = Number(float, 0.0, 1.0, low_open=True, high_open=True)
rate_float = Number(float, 1e-9, 1.0, high_open=True)  # a target rate that rank arithmetic can reach


def resources_arg(text: str) -> dict:
    try:
        value = json.loads(text)
    except (ValueError, RecursionError):
        raise argparse.ArgumentTypeError("not valid JSON") from None
    if not isinstance(value, dict) or not all(isinstance(k, str) and isinstance(v, (int, float))
                                              and not isinstance(v, bool) and 0 < v <= 1e9
                                              for k, v in value.items()):
        raise argparse.ArgumentTypeError("must be a JSON object of resource names to positive amounts")
    return {k: float(v) for k, v in value.items()}
