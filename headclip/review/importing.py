"""Reviewed labels in: review files -> a labelled manifest that evaluate, calibrate and train read.

Every fault in the review files (an image not in the export, a mask of another
size than its image, a second review of one image, a reviewed image whose file
is gone, an exported image left unreviewed) is collected as one line; any
fault stops the import before anything is written (:class:`ReviewError`).

Written to OUTPUT (local or s3://)::

    OUTPUT/manifest.csv        image_uri, image_id, label, class_name, mask_uri (relative), reviewer, ...
    OUTPUT/masks/<name>.png    each defect's reviewed mask, 0/255 at the image's size
    OUTPUT/disagreements.csv   images where the review and the model differ
"""

from __future__ import annotations

import io
import json
import logging
import posixpath
from typing import Optional, Sequence

import numpy as np
import pandas as pd
from PIL import Image

from ..errors import ReviewError
from ..redact import redact_text
from ..storage.fs import describe_error, filesystem, join, read_bytes, write_bytes_atomic
from .coco import read_coco
from .export import safe_name
from .labelstudio import read_label_studio
from .reviews import Review, ReviewIndex

log = logging.getLogger(__name__)

FORMATS = ("auto", "coco", "label-studio")
MANIFEST_FILE = "manifest.csv"
MASKS_DIR = "masks"
DISAGREEMENTS_FILE = "disagreements.csv"
MISSED, FALSE_ALARM = "missed defect", "false alarm"


def detect_format(doc) -> str:
    if isinstance(doc, dict) and "images" in doc:
        return "coco"
    if isinstance(doc, list):
        return "label-studio"
    return "unknown"


def read_reviews(sources: Sequence[str], records: list[dict], fmt: str = "auto", reviewer: Optional[str] = None,
                 allow_partial: bool = False, storage_options: Optional[dict] = None) -> list[Review]:
    """The reviews in ``sources`` (JSON files) of the exported ``records``, in export order.

    Raises ReviewError with every fault found, one line each.
    """
    index = ReviewIndex(records)
    for source in sources:
        try:
            doc = json.loads(read_bytes(source, storage_options))
        except ValueError as err:
            index.problem(f"{source}: not JSON ({err})")
            continue
        except Exception as err:  # noqa: BLE001 - storage failure of any kind
            index.problem(f"{source}: {describe_error(err)}")
            continue
        kind = detect_format(doc) if fmt == "auto" else fmt
        if kind == "coco":
            read_coco(doc, index, source, reviewer)
        elif kind == "label-studio":
            read_label_studio(doc, index, source, reviewer)
        else:
            index.problem(f"{source}: neither COCO JSON nor a Label Studio JSON export")
    missing = index.missing()
    if missing and not allow_partial:
        shown = ", ".join(r["image_id"] for r in missing[:5]) + (" ..." if len(missing) > 5 else "")
        index.problem(f"{len(missing)} exported images have no review ({shown}); review them, or import with "
                      "--allow-partial")
    reviews = [index.reviews[i] for i in sorted(index.reviews)]
    for review in reviews:
        if review.label == 1 and review.mask is None:
            index.problem(f"image {review.record['image_id']} is marked defect with no region painted; paint it")
    _check_images(reviews, index, storage_options)
    if index.problems:
        raise ReviewError(f"{len(index.problems)} problem{'s' if len(index.problems) > 1 else ''} in the review; "
                          "nothing imported", index.problems)
    return reviews


def _check_images(reviews: list[Review], index: ReviewIndex, storage_options: Optional[dict]) -> None:
    """A reviewed image must still exist where the manifest will point."""
    for review in reviews:
        uri = review.record["image_uri"]
        try:
            fs, path = filesystem(uri, storage_options)
            found = fs.isfile(path)
        except Exception as err:  # noqa: BLE001
            index.problem(f"image {review.record['image_id']}: {describe_error(err)}")
            continue
        if not found:
            index.problem(f"image {review.record['image_id']} is missing: {uri} does not exist")


def mask_name(review: Review) -> Optional[str]:
    """Where a review's mask goes, relative to the manifest; None without a mask."""
    if review.mask is None:
        return None
    record = review.record
    return f"{MASKS_DIR}/{record['coco_id']:05d}_{safe_name(posixpath.splitext(record['image_id'])[0])}.png"


def manifest_frame(reviews: list[Review]) -> pd.DataFrame:
    """The manifest rows (mask_uri relative to the manifest's folder)."""
    rows = []
    for review in reviews:
        record = review.record
        mask_uri = mask_name(review)
        rows.append({"image_uri": record["image_uri"], "image_id": record["image_id"], "label": review.label,
                     "class_name": record["class_name"], "mask_uri": mask_uri, "reviewer": review.reviewer,
                     "reviewed_at": review.reviewed_at, "review_source": redact_text(review.source),
                     "model_score": record["score"], "model_flagged": record["is_anomalous"],
                     "source_run_id": record["run_id"], "review_group": record["group"],
                     "review_reasons": record["reasons"], "in_sample": record["in_sample"]})
    return pd.DataFrame(rows)


def disagreements(frame: pd.DataFrame) -> pd.DataFrame:
    """Rows where the review differs from the model: ``missed defect`` or ``false alarm``."""
    differ = frame[frame["label"].astype(bool) != frame["model_flagged"].astype(bool)].copy()
    differ.insert(0, "disagreement", np.where(differ["label"] == 1, MISSED, FALSE_ALARM))
    return differ[["disagreement", "image_id", "image_uri", "model_score", "class_name", "reviewer"]]


def _png(mask: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(mask.astype(np.uint8) * 255).save(buffer, format="PNG")
    return buffer.getvalue()


def write_manifest(reviews: list[Review], output: str,
                   storage_options: Optional[dict] = None) -> tuple[str, pd.DataFrame, pd.DataFrame]:
    """Write masks, then disagreements, then the manifest (last); returns (manifest URI, manifest, disagreements)."""
    frame = manifest_frame(reviews)
    for review in reviews:
        if review.mask is not None:
            write_bytes_atomic(join(output, mask_name(review)), _png(review.mask), storage_options)
    differ = disagreements(frame)
    write_bytes_atomic(join(output, DISAGREEMENTS_FILE), differ.to_csv(index=False).encode(), storage_options)
    manifest_uri = join(output, MANIFEST_FILE)
    write_bytes_atomic(manifest_uri, frame.to_csv(index=False).encode(), storage_options)
    return manifest_uri, frame, differ
