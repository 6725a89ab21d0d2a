"""One review per exported image: what the readers of review files produce, and the faults they find."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np


@dataclass
class Review:
    """A reviewer's verdict on one exported image.

    record: the export's row for the image; label: 1 defect, 0 normal; mask:
    (height, width) bool region of the defect, None when none was painted;
    reviewer / reviewed_at: as the tool records them (None if unknown).
    """

    record: dict
    label: int
    mask: Optional[np.ndarray]
    reviewer: Optional[str]
    reviewed_at: Optional[str]
    source: str


class ReviewIndex:
    """The exported records, looked up by any of their keys, and the reviews and faults found so far.

    Keys: the exported file name, the image URI and the image id; a review that
    names an image already reviewed is a duplicate (a fault, never a silent
    overwrite).
    """

    def __init__(self, records: list[dict]):
        self.records = records
        self.keys: dict[str, int] = {}
        for i, record in enumerate(records):
            for key in (record["file_name"], record["image_uri"], record["image_id"]):
                self.keys.setdefault(str(key), i)
        self.reviews: dict[int, Review] = {}
        self.problems: list[str] = []
        self.faulted: set[int] = set()  # images whose review has a fault (reported once, not as missing too)

    def find(self, *keys) -> Optional[dict]:
        """The record that the first known key names, or None."""
        for key in keys:
            if key is not None and str(key) in self.keys:
                return self.records[self.keys[str(key)]]
        return None

    def problem(self, line: str, record: Optional[dict] = None) -> None:
        self.problems.append(" ".join(line.split()))
        if record is not None:
            self.faulted.add(self.keys[str(record["image_id"])])

    def add(self, review: Review) -> None:
        i = self.keys[str(review.record["image_id"])]
        if i in self.reviews:
            self.problem(f"{review.source}: image {review.record['image_id']} is reviewed more than once")
            return
        self.reviews[i] = review

    def missing(self) -> list[dict]:
        """The exported records that no review names (faulty reviews aside)."""
        return [r for i, r in enumerate(self.records) if i not in self.reviews and i not in self.faulted]
