"""Labelled anomaly-detection data sets, read through fsspec (local or s3://).

Four layouts load into one table with columns ``image_id``, ``image_uri``,
``mask_uri`` (null for normal images and for image-label-only data),
``label`` (0 normal, 1 anomalous), ``class_name`` and ``has_masks`` (the
class has pixel ground truth; classes without it are evaluated and trained at
image level only):

- MVTec AD: ``<class>/test/<defect>/*.png`` with masks in
  ``<class>/ground_truth/<defect>/*_mask.png``; ``good`` is normal.
- VisA: ``split_csv/1cls.csv`` (object, split, label, image, mask).
- AnomalyCLIP's ``meta.json`` ({"train"|"test": {class: [{img_path, mask_path, cls_name, anomaly}]}}).
- A manifest, CSV or Parquet: image_uri, mask_uri, label, class_name.
"""

from __future__ import annotations

import json
import posixpath
from typing import Optional, Sequence

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from ..errors import DatasetError
from .decode import IMAGE_EXTENSIONS
from ..storage.fs import as_uri, filesystem, open_file, resolve_relative

LAYOUTS = ("auto", "mvtec", "visa", "meta", "manifest")


def detect_layout(root: str, storage_options: Optional[dict] = None) -> str:
    fs, path = filesystem(root, storage_options)
    if path.lower().endswith((".csv", ".parquet", ".pq")):
        return "manifest"
    if fs.exists(posixpath.join(path, "meta.json")):
        return "meta"
    if fs.exists(posixpath.join(path, "split_csv", "1cls.csv")):
        return "visa"
    return "mvtec"


def load_dataset(root: str, layout: str = "auto", split: str = "test", classes: Optional[Sequence[str]] = None,
                 storage_options: Optional[dict] = None) -> pa.Table:
    """Load a labelled data set into a table sorted by image_uri (see module doc)."""
    if layout not in LAYOUTS:
        raise DatasetError(f"unknown layout {layout!r}; choose from {', '.join(LAYOUTS)}")
    if layout == "auto":
        layout = detect_layout(root, storage_options)
    fs, path = filesystem(root, storage_options)
    if not fs.exists(path):
        raise DatasetError(f"data set not found: {root}")
    reader = {"mvtec": _mvtec, "visa": _visa, "meta": _meta, "manifest": _manifest}[layout]
    rows = reader(root, fs, path, split, storage_options)
    available = sorted({r["class_name"] for r in rows})
    if classes:
        unknown = [c for c in classes if c not in available]
        if unknown:
            raise DatasetError(f"unknown class {unknown[0]!r} in {root} (available: {', '.join(available)})")
        rows = [r for r in rows if r["class_name"] in set(classes)]
    if not rows:
        raise DatasetError(f"no images found in {root} ({layout} layout, split {split!r})")
    _check_masks(rows, root)
    masked_classes = {r["class_name"] for r in rows if r["mask_uri"]}
    for row in rows:
        row["has_masks"] = row["class_name"] in masked_classes
    table = pa.Table.from_pylist(rows, schema=pa.schema([
        ("image_id", pa.string()), ("image_uri", pa.string()), ("mask_uri", pa.string()),
        ("label", pa.int32()), ("class_name", pa.string()), ("has_masks", pa.bool_())]))
    return table.sort_by([("image_uri", "ascending")])


def _check_masks(rows: list[dict], root: str) -> None:
    """Anomalous images need masks, unless the data set has image labels only."""
    anomalous = [r for r in rows if r["label"] == 1]
    with_mask = [r for r in anomalous if r["mask_uri"]]
    if with_mask and len(with_mask) < len(anomalous):
        missing = next(r for r in anomalous if not r["mask_uri"])
        raise DatasetError(f"missing mask for anomalous image {missing['image_uri']} in {root}")


def _row(image_id, image_uri, mask_uri, label, class_name) -> dict:
    return {"image_id": image_id, "image_uri": image_uri, "mask_uri": mask_uri or None, "label": int(label),
            "class_name": class_name}


def _mvtec(root, fs, path, split, storage_options) -> list[dict]:
    rows = []
    base = path.rstrip("/")
    for class_dir in sorted(fs.ls(base, detail=False)):
        class_name = posixpath.basename(class_dir.rstrip("/"))
        split_dir = posixpath.join(base, class_name, split)
        if not fs.isdir(split_dir):
            continue
        for defect_dir in sorted(fs.ls(split_dir, detail=False)):
            defect = posixpath.basename(defect_dir.rstrip("/"))
            if not fs.isdir(defect_dir):
                continue
            for image in sorted(fs.ls(defect_dir, detail=False)):
                if not image.lower().endswith(IMAGE_EXTENSIONS):
                    continue
                stem = posixpath.splitext(posixpath.basename(image))[0]
                mask = None
                if defect != "good":
                    mask = posixpath.join(base, class_name, "ground_truth", defect, f"{stem}_mask.png")
                    if not fs.exists(mask):
                        raise DatasetError(f"missing mask for {as_uri(fs, image, root)} "
                                           f"(expected {as_uri(fs, mask, root)})")
                    mask = as_uri(fs, mask, root)
                rows.append(_row(f"{class_name}/{split}/{defect}/{stem}", as_uri(fs, image, root), mask,
                                 defect != "good", class_name))
    if not rows:
        raise DatasetError(f"no MVTec-style <class>/{split}/<defect>/ images in {root}")
    return rows


def _read_table(uri: str, storage_options) -> pa.Table:
    with open_file(uri, "rb", storage_options) as handle:
        try:
            if uri.lower().endswith(".csv"):
                return pacsv.read_csv(handle, convert_options=pacsv.ConvertOptions(strings_can_be_null=True))
            return pq.read_table(handle)
        except (pa.ArrowInvalid, OSError) as err:
            raise DatasetError(f"cannot read {uri}: {str(err).splitlines()[0]}") from None


def _visa(root, fs, path, split, storage_options) -> list[dict]:
    base = path.rstrip("/")
    table = _read_table(as_uri(fs, posixpath.join(base, "split_csv", "1cls.csv"), root), storage_options).to_pylist()
    rows = []
    for record in table:
        if record.get("split") != split:
            continue
        label = 1 if str(record.get("label")).strip().lower() in ("anomaly", "1", "abnormal") else 0
        image = resolve_relative(fs, root, base, record["image"])
        mask = resolve_relative(fs, root, base, record.get("mask")) if label else None
        if label and mask is None:
            raise DatasetError(f"missing mask for anomalous image {image} in {root}")
        stem = posixpath.splitext(posixpath.basename(image))[0]
        rows.append(_row(f"{record['object']}/{stem}", image, mask, label, record["object"]))
    return rows


def _meta(root, fs, path, split, storage_options) -> list[dict]:
    base = path.rstrip("/")
    with open_file(as_uri(fs, posixpath.join(base, "meta.json"), root), "r", storage_options) as handle:
        try:
            meta = json.load(handle)
        except ValueError as err:
            raise DatasetError(f"cannot read meta.json in {root}: {err}") from None
    if split not in meta:
        raise DatasetError(f"meta.json in {root} has no {split!r} split (has: {', '.join(meta)})")
    rows = []
    for class_name, records in sorted(meta[split].items()):
        for record in records:
            label = int(record.get("anomaly", 0))
            image = resolve_relative(fs, root, base, record["img_path"])
            mask = resolve_relative(fs, root, base, record.get("mask_path")) if label else None
            rows.append(_row(record["img_path"], image, mask, label, record.get("cls_name", class_name)))
    return rows


def _manifest(root, fs, path, split, storage_options) -> list[dict]:
    table = _read_table(root, storage_options)
    missing = [c for c in ("image_uri", "label", "class_name") if c not in table.column_names]
    if missing:
        raise DatasetError(f"manifest {root} lacks column {missing[0]!r}")
    base = posixpath.dirname(path)
    rows = []
    for record in table.to_pylist():
        image = resolve_relative(fs, root, base, record["image_uri"])
        mask = resolve_relative(fs, root, base, record.get("mask_uri"))
        image_id = str(record.get("image_id") or record["image_uri"])
        rows.append(_row(image_id, image, mask, int(record["label"]), str(record["class_name"])))
    return rows
