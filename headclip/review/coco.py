"""COCO instance annotations: the predicted masks out, reviewed masks back in.

Written: one image per exported row (``file_name`` as exported, ``coco_url`` the
image's URI) and one ``defect`` annotation per flagged image with a non-empty
mask: compressed RLE (``{"size": [h, w], "counts": str}``) at the image's size,
``bbox`` ``[x, y, w, h]``, ``area``, ``score``, and ``attributes`` (score, run
id, image id) as CVAT keeps them. ``pycocotools.coco.COCO`` reads the file;
FiftyOne's ``COCODetectionDataset`` reads it with the images under ``data/``.

Read back (COCO as CVAT or FiftyOne export it): an image with at least one
annotation of non-empty region is a defect (label 1) whose mask is the union of
its regions (RLE, uncompressed RLE, polygons, or a bare box as its rectangle);
an image without one is normal.
"""

from __future__ import annotations

import posixpath
from typing import Optional

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

from ..scoring.masks import decode_rle, encode_rle
from .reviews import Review, ReviewIndex

CATEGORY = {"id": 1, "name": "defect", "supercategory": "anomaly"}


def image_mask(rle: Optional[dict], width: int, height: int) -> Optional[np.ndarray]:
    """A stored mask as (height, width) bool: decoded, and scaled (nearest) if stored smaller; None if absent."""
    if rle is None:
        return None
    mask = decode_rle({"size": list(rle["size"]), "counts": rle["counts"]})
    if mask.shape != (height, width):
        mask = np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).resize((width, height), Image.NEAREST)) > 127
    return mask


def coco_document(records: list[dict], run_note: str = "") -> dict:
    """The COCO dict of exported ``records`` (see :func:`headclip.review.export.export_records`)."""
    images, annotations = [], []
    for record in records:
        images.append({"id": record["coco_id"], "file_name": record["file_name"], "width": record["width"],
                       "height": record["height"], "coco_url": record["image_uri"],
                       "headclip": {"image_id": record["image_id"], "run_id": record["run_id"],
                                    "score": record["score"], "is_anomalous": record["is_anomalous"],
                                    "group": record["group"], "reasons": record["reasons"]}})
        if not record["is_anomalous"]:
            continue
        mask = image_mask(record["mask_rle"], record["width"], record["height"])
        if mask is None or not mask.any():
            continue
        rle = encode_rle(mask)
        x, y, w, h = (float(v) for v in mask_utils.toBbox({**rle, "counts": rle["counts"].encode()}))
        annotations.append({"id": len(annotations) + 1, "image_id": record["coco_id"], "category_id": CATEGORY["id"],
                            "segmentation": rle, "area": int(mask.sum()), "bbox": [x, y, w, h], "iscrowd": 0,
                            "score": record["score"],
                            "attributes": {"score": record["score"], "run_id": record["run_id"],
                                           "image_id": record["image_id"], "occluded": False}})
    return {"info": {"description": f"HeadCLIP predictions for review{run_note}", "version": "1.0"},
            "licenses": [], "categories": [CATEGORY], "images": images, "annotations": annotations}


def _region(ann: dict, height: int, width: int) -> np.ndarray:
    """One annotation's region as (height, width) bool."""
    seg = ann.get("segmentation")
    if isinstance(seg, dict) and "counts" in seg:
        if isinstance(seg["counts"], list):
            seg = mask_utils.frPyObjects(seg, int(seg["size"][0]), int(seg["size"][1]))
        return decode_rle(seg)
    if isinstance(seg, list) and any(len(p) >= 6 for p in seg):
        polygons = [p for p in seg if len(p) >= 6]
        return mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects(polygons, height, width))).astype(bool)
    box = ann.get("bbox") or [0, 0, 0, 0]
    region = np.zeros((height, width), bool)
    x0, y0 = max(0, int(np.floor(box[0]))), max(0, int(np.floor(box[1])))
    region[y0:int(np.ceil(box[1] + box[3])), x0:int(np.ceil(box[0] + box[2]))] = True
    return region


def read_coco(doc: dict, index: ReviewIndex, source: str, reviewer: Optional[str]) -> None:
    """Add the reviews of a COCO document to ``index``; every fault becomes one of its problems."""
    if not isinstance(doc, dict) or not isinstance(doc.get("images"), list):
        index.problem(f"{source}: not COCO JSON (no 'images' list)")
        return
    regions: dict = {}
    for ann in doc.get("annotations") or []:
        regions.setdefault(ann.get("image_id"), []).append(ann)
    known_ids = {image.get("id") for image in doc["images"]}
    for image_key in sorted(set(regions) - known_ids, key=str):
        index.problem(f"{source}: annotation {regions[image_key][0].get('id')} names unknown image id {image_key}")
    for image in doc["images"]:
        name = str(image.get("file_name", ""))
        record = index.find(name, posixpath.basename(name), image.get("coco_url"),
                            (image.get("headclip") or {}).get("image_id"))
        if record is None:
            index.problem(f"{source}: image {name!r} (id {image.get('id')}) is not in the export")
            continue
        height, width = record["height"], record["width"]
        if (image.get("width"), image.get("height")) not in ((width, height), (None, None)):
            index.problem(f"{source}: image {record['image_id']} is {image.get('width')}x{image.get('height')} in "
                          f"the review, {width}x{height} in the export", record)
            continue
        mask = np.zeros((height, width), bool)
        names = set()
        bad = False
        for ann in regions.get(image.get("id"), []):
            size = (ann.get("segmentation") or {}).get("size") if isinstance(ann.get("segmentation"), dict) else None
            if size is not None and [int(v) for v in size] != [height, width]:
                index.problem(f"{source}: mask of {record['image_id']} (annotation {ann.get('id')}) is "
                              f"{size[1]}x{size[0]}, the image is {width}x{height}", record)
                bad = True
                continue
            mask |= _region(ann, height, width)
            who = (ann.get("attributes") or {}).get("reviewer")
            if who:
                names.add(str(who))
        if bad:
            continue
        index.add(Review(record=record, label=int(mask.any()), mask=mask if mask.any() else None,
                         reviewer=", ".join(sorted(names)) or reviewer, reviewed_at=None, source=source))
