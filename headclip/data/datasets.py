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

Image ids keep the file's extension (``bottle/test/good/002.png``), so two
files that differ only in it are two images; ids must be unique. Every record
is checked as it is read: a missing field, a label that is not 0/1 (or, for
VisA, normal/anomaly), a split that is not a list of records is one
DatasetError naming the file and the record.
"""

from __future__ import annotations

import json
import posixpath
from typing import Any, Optional, Sequence

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from ..errors import DatasetError
from .decode import IMAGE_EXTENSIONS
from ..storage.fs import as_uri, filesystem, open_file, resolve_relative

LAYOUTS = ("auto", "mvtec", "visa", "meta", "manifest")
VISA_LABELS = {"normal": 0, "0": 0, "good": 0, "anomaly": 1, "abnormal": 1, "1": 1}


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
    _check_ids(rows, root)
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


def _check_ids(rows: list[dict], root: str) -> None:
    seen: dict[str, str] = {}
    for row in rows:
        first = seen.setdefault(row["image_id"], row["image_uri"])
        if first != row["image_uri"]:
            raise DatasetError(f"{root}: image id {row['image_id']!r} names two images ({first} and "
                               f"{row['image_uri']}); ids must be unique")


def _field(record: Any, name: str, where: str, required: bool = True) -> Any:
    """``record[name]`` of a data-set record; DatasetError if the record is no mapping or lacks a required one."""
    if not isinstance(record, dict):
        raise DatasetError(f"{where}: a record is {type(record).__name__}, not an object")
    value = record.get(name)
    if required and (value is None or (isinstance(value, str) and not value.strip())):
        raise DatasetError(f"{where}: a record has no {name!r} ({_shown(record)})")
    return value


def _label(value: Any, where: str, record: Any) -> int:
    """A 0/1 label (ints, bools, their strings, floats 0.0/1.0); DatasetError otherwise."""
    if isinstance(value, str):
        value = value.strip()
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = None
    if number not in (0.0, 1.0):
        raise DatasetError(f"{where}: label must be 0 or 1, got {value!r} ({_shown(record)})")
    return int(number)


def _shown(record: Any) -> str:
    text = " ".join(str(record).split())
    return text if len(text) <= 120 else text[:117] + "..."


def _check_masks(rows: list[dict], root: str) -> None:
    """Anomalous images need masks, unless the data set has image labels only."""
    anomalous = [r for r in rows if r["label"] == 1]
    with_mask = [r for r in anomalous if r["mask_uri"]]
    if with_mask and len(with_mask) < len(anomalous):
        missing = next(r for r in anomalous if not r["mask_uri"])
        raise DatasetError(f"missing mask for anomalous image {missing['image_uri']} in {root}")


def _row(image_id, image_uri, mask_uri, label, class_name) -> dict:
    return {"image_id": str(image_id), "image_uri": image_uri, "mask_uri": mask_uri or None, "label": int(label),
            "class_name": str(class_name)}


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
                name = posixpath.basename(image)
                stem = posixpath.splitext(name)[0]
                mask = None
                if defect != "good":
                    mask = posixpath.join(base, class_name, "ground_truth", defect, f"{stem}_mask.png")
                    if not fs.exists(mask):
                        raise DatasetError(f"missing mask for {as_uri(fs, image, root)} "
                                           f"(expected {as_uri(fs, mask, root)})")
                    mask = as_uri(fs, mask, root)
                rows.append(_row(f"{class_name}/{split}/{defect}/{name}", as_uri(fs, image, root), mask,
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
    csv = as_uri(fs, posixpath.join(base, "split_csv", "1cls.csv"), root)
    table = _read_table(csv, storage_options)
    missing = [c for c in ("object", "split", "label", "image") if c not in table.column_names]
    if missing:
        raise DatasetError(f"{csv} lacks column {missing[0]!r} (columns: {', '.join(table.column_names)})")
    rows = []
    for record in table.to_pylist():
        if record.get("split") != split:
            continue
        text = str(record.get("label")).strip().lower()
        if text not in VISA_LABELS:
            raise DatasetError(f"{csv}: label must be normal or anomaly, got {record.get('label')!r} "
                               f"({_shown(record)})")
        label = VISA_LABELS[text]
        image = resolve_relative(fs, root, base, _field(record, "image", csv))
        mask = resolve_relative(fs, root, base, record.get("mask")) if label else None
        if label and mask is None:
            raise DatasetError(f"missing mask for anomalous image {image} in {root}")
        name = _field(record, "object", csv)
        rows.append(_row(f"{name}/{posixpath.basename(image)}", image, mask, label, name))
    return rows


def _meta(root, fs, path, split, storage_options) -> list[dict]:
    base = path.rstrip("/")
    where = as_uri(fs, posixpath.join(base, "meta.json"), root)
    with open_file(where, "r", storage_options) as handle:
        try:
            meta = json.load(handle)
        except (ValueError, RecursionError) as err:
            raise DatasetError(f"cannot read {where}: {'nested too deeply' if isinstance(err, RecursionError) else err}") \
                from None
    if not isinstance(meta, dict):
        raise DatasetError(f"{where} is not a JSON object of splits")
    if split not in meta:
        raise DatasetError(f"{where} has no {split!r} split (has: {', '.join(map(str, meta))})")
    if not isinstance(meta[split], dict):
        raise DatasetError(f"{where}: split {split!r} must map class names to lists of records, got "
                           f"{type(meta[split]).__name__}")
    rows = []
    for class_name, records in sorted(meta[split].items()):
        if not isinstance(records, list):
            raise DatasetError(f"{where}: class {class_name!r} of split {split!r} must be a list of records, got "
                               f"{type(records).__name__}")
        for record in records:
            path = _field(record, "img_path", where)
            label = _label(record.get("anomaly", 0), where, record)
            image = resolve_relative(fs, root, base, path)
            mask = resolve_relative(fs, root, base, record.get("mask_path")) if label else None
            rows.append(_row(path, image, mask, label, record.get("cls_name") or class_name))
    return rows


def _manifest(root, fs, path, split, storage_options) -> list[dict]:
    table = _read_table(root, storage_options)
    missing = [c for c in ("image_uri", "label", "class_name") if c not in table.column_names]
    if missing:
        raise DatasetError(f"manifest {root} lacks column {missing[0]!r}")
    base = posixpath.dirname(path)
    rows = []
    for record in table.to_pylist():
        image = resolve_relative(fs, root, base, _field(record, "image_uri", f"manifest {root}"))
        mask = resolve_relative(fs, root, base, record.get("mask_uri"))
        image_id = str(record.get("image_id") or record["image_uri"])
        label = _label(record.get("label"), f"manifest {root}", record)
        rows.append(_row(image_id, image, mask, label, _field(record, "class_name", f"manifest {root}")))
    return rows
