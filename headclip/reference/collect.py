"""Known-good images through a loaded scorer's model, their patch features into a BankBuilder."""

from __future__ import annotations

import logging
from typing import Optional

from .build import BankBuilder

log = logging.getLogger(__name__)


def collect_features(scorer, records: list[dict], builder: BankBuilder, group_column: Optional[str] = None
                     ) -> tuple[int, list[tuple[str, str]]]:
    """Read, decode and run ``records`` (image_uri, image_id, extras) through ``scorer``'s model
    (an :class:`~headclip.scoring.scorer.ImageScorer`), adding each image's patch features to
    ``builder`` under its ``group_column`` value. Returns (images added, [(image_id, error)])."""
    errors: list[tuple[str, str]] = []
    batch: list[tuple[dict, object]] = []
    added = 0

    def flush() -> int:
        pixels, failed = scorer.feeder.batch([image for _, image in batch])
        good = []
        for (record, _), error in zip(batch, failed):
            if error is None:
                good.append(record)
            else:
                errors.append((str(record.get("image_id")), error))
        batch.clear()
        if good:
            out = scorer.model.score(pixels, patch_features=True)
            builder.add(out.patch_features, [r.get(group_column) if group_column else None for r in good])
        return len(good)

    for record, image in zip(records, scorer.loader.iterate(records)):
        if image.error is not None:
            errors.append((str(record.get("image_id")), image.error))
            continue
        batch.append((record, image))
        if len(batch) == scorer.options.batch_size:
            added += flush()
    if batch:
        added += flush()
    for image_id, error in errors[:5]:
        log.warning("known-good image %s left out: %s", image_id, error)
    return added, errors
