"""Listing an input into a sorted image table, and cutting it into shards.

An input is a prefix (folder), a glob, a single image, or a manifest file
(CSV or Parquet with an ``image_uri`` column, optional ``image_id`` and any
extra columns, which travel with each image into the output).

Paths are literal first: an existing file or folder is listed as itself even
when its name holds ``*``, ``?`` or ``[``, and only a path that does not exist
is taken as a glob; a URL with a query (a presigned ``https://...?X-Amz-...``)
is never a glob. Regular files are listed, and symbolic links to them; FIFOs,
devices and broken links are skipped with a warning. Hidden entries are
skipped too, with a log line: files and folders whose names start with ``.``,
and folders whose names start with ``_`` (where the jobs write their own
files: ``_plan``, ``_overlays``, ``_eval``), below the listed root. A listed
file's ``source_version`` (ETag, or size and modification time) is kept in
the run's plan, not in the output, so a replaced file is noticed. Manifest
columns named like output columns are refused, never overwritten.
"""

from __future__ import annotations

import hashlib
import logging
import os
import posixpath
import stat
from typing import Iterator, Optional, Sequence

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from ..errors import EmptyInputError, InputError, InputNotFoundError
from .decode import IMAGE_EXTENSIONS
from .sorting import sort_tables
from ..storage.fs import (as_uri, describe_error, file_version, filesystem, is_connection_error, is_local,
                          open_file)
from ..storage.layout import VERSION_COLUMN
from ..storage.schema import RESULT_COLUMNS

MANIFEST_SUFFIXES = (".csv", ".parquet", ".pq")
GLOB_CHARS = "*?["
# columns a manifest cannot bring: the job computes them
RESERVED_COLUMNS = tuple(c for c in RESULT_COLUMNS if c not in ("image_id", "image_uri")) + (VERSION_COLUMN,)
# columns with a meaning for labelled inputs, and the types they need
LABEL_VALUES = (0, 1)
CHUNK_ROWS = 65536  # rows per listed chunk
S3_PAGE_KEYS = 1000  # keys per list_objects_v2 request (S3's maximum)
CSV_BLOCK_BYTES = 8 << 20  # a manifest is read this many bytes at a time

log = logging.getLogger(__name__)


def list_images(uri: str, extensions: Sequence[str] = IMAGE_EXTENSIONS, storage_options: Optional[dict] = None,
                limit: Optional[int] = None) -> pa.Table:
    """List ``uri`` into one in-memory table sorted by ``image_uri`` (for inputs that fit in memory).

    Columns: ``image_id`` (path relative to the input root, or the manifest's),
    ``image_uri`` (absolute; with the input's protocol), then manifest extras.
    A scoring run's plan streams the listing instead (:func:`sorted_listing`).
    """
    chunks = list(iter_listing(uri, extensions, storage_options))
    table = pa.concat_tables(chunks) if chunks else None
    if table is None or table.num_rows == 0:
        raise EmptyInputError(f"no images found at {uri} (extensions {', '.join(extensions)})")
    table = table.sort_by([("image_uri", "ascending")])
    duplicates = table.num_rows - len(pc.unique(table["image_id"]))
    if duplicates:
        raise InputError(f"{uri}: {duplicates} duplicate image_id values")
    if limit is not None:
        table = table.slice(0, limit)
    return table


def sorted_listing(uri: str, workdir: str, extensions: Sequence[str] = IMAGE_EXTENSIONS,
                   storage_options: Optional[dict] = None) -> Iterator[pa.Table]:
    """The listing of ``uri`` as tables sorted by ``image_uri`` across the whole stream.

    Memory stays bounded for any size of listing: chunks are sorted and spilled
    to ``workdir`` (a local folder), then merged (:func:`~headclip.data.sorting.sort_tables`).
    Raises EmptyInputError for no images and InputError for duplicate image ids,
    both before the first table is yielded.
    """
    empty = EmptyInputError(f"no images found at {uri} (extensions {', '.join(extensions)})")
    return sort_tables(iter_listing(uri, extensions, storage_options), "image_uri", workdir, unique="image_id",
                       source=uri, empty=empty)


def iter_listing(uri: str, extensions: Sequence[str] = IMAGE_EXTENSIONS,
                 storage_options: Optional[dict] = None) -> Iterator[pa.Table]:
    """The listing of ``uri`` in unsorted chunks of at most :data:`CHUNK_ROWS` rows, each checked.

    A manifest is read as a stream (CSV blocks, Parquet row groups); a prefix
    or glob is listed by the store (paginated on S3) and then cut into chunks.
    Any storage failure is one InputError naming its kind.
    """
    try:
        fs, path = filesystem(uri, storage_options)
        if url_path(uri, path).lower().endswith(MANIFEST_SUFFIXES):
            chunks = _read_manifest(uri, fs, path, storage_options)
        else:
            chunks = _list_files(uri, fs, path, extensions)
        for chunk in chunks:
            yield chunk
    except InputError:
        raise
    except Exception as err:  # noqa: BLE001 - any storage failure is one line naming its kind
        raise InputError(f"cannot list input {uri}: {describe_error(err)}") from None


def _missing(uri, fs, path, what: str) -> InputError:
    """The error for a path that does not exist, unless the store could not be reached at all."""
    try:
        fs.info(path)
    except FileNotFoundError as err:
        if is_connection_error(err):
            return InputError(f"cannot reach {uri}: {describe_error(err)}")
    except Exception as err:  # noqa: BLE001 - a store that cannot be asked is not "not found"
        return InputError(f"cannot reach {uri}: {describe_error(err)}")
    return InputNotFoundError(f"{what} not found: {uri}")


def url_path(uri: str, path: str) -> str:
    """``path`` without the query of an http(s) URL (``?X-Amz-Signature=...`` is not part of the name)."""
    if uri.lower().startswith(("http://", "https://")):
        return path.split("?", 1)[0].split("#", 1)[0]
    return path


def is_glob(uri: str, fs, path: str) -> bool:
    """Whether ``path`` is listed as a glob: it has glob characters, is no URL with a query, and does not exist."""
    if not any(ch in path for ch in GLOB_CHARS):
        return False
    if uri.lower().startswith(("http://", "https://")) and "?" in path:
        return False
    return not fs.exists(path)


def is_hidden(relative: str) -> bool:
    """Whether a path below the listed root is hidden: a part starting with ".", or a folder starting with "_"."""
    parts = relative.split("/")
    return any(part.startswith(".") for part in parts) or any(part.startswith("_") for part in parts[:-1])


def _followed(fs, path: str, info: dict) -> dict:
    """``info`` of a local symbolic link as its target's (a regular file is then listed); others unchanged."""
    if not info.get("islink") or not is_local(fs):
        return info
    try:
        target = os.stat(path)
    except OSError:  # a broken link
        return {**info, "type": "other"}
    kind = "file" if stat.S_ISREG(target.st_mode) else "other"
    return {**info, "type": kind, "size": target.st_size, "mtime": target.st_mtime}


def _list_files(uri, fs, path, extensions) -> Iterator[pa.Table]:
    """The image files of a prefix, glob or single file, in chunks of at most CHUNK_ROWS, as listed."""
    suffixes = tuple(e.lower() if e.startswith(".") else "." + e.lower() for e in extensions)
    if is_glob(uri, fs, path):
        root = path[: min(path.index(ch) for ch in GLOB_CHARS if ch in path)].rsplit("/", 1)[0]
        found = iter(fs.glob(path, detail=True).items())
    elif fs.isdir(path):
        root = path.rstrip("/")
        found = walk_files(fs, root)
    elif fs.exists(path):
        root = posixpath.dirname(path)
        found = iter([(path, fs.info(path))])
    else:
        raise _missing(uri, fs, path, "input")
    ids, uris, versions = [], [], []
    others, first_other, hidden, first_hidden = 0, None, 0, None
    for p, info in found:
        if not url_path(uri, p).lower().endswith(suffixes):
            continue
        relative = posixpath.relpath(p, root) if root else p
        if is_hidden(relative):
            hidden += 1
            first_hidden = first_hidden or p
            continue
        info = _followed(fs, p, info)
        if info.get("type") != "file":
            others += 1
            first_other = first_other or p
            continue
        ids.append(relative)
        uris.append(as_uri(fs, p, uri))
        versions.append(file_version(info))
        if len(ids) == CHUNK_ROWS:
            yield _listed(ids, uris, versions)
            ids, uris, versions = [], [], []
    if ids:
        yield _listed(ids, uris, versions)
    if others:
        log.warning("%s: skipped %d entries that are not regular files (first: %s)", uri, others, first_other)
    if hidden:
        log.info("%s: skipped %d hidden files (a name starting with '.', or in a folder starting with '.' or '_'; "
                 "first: %s)", uri, hidden, first_hidden)


def _listed(ids: list, uris: list, versions: list) -> pa.Table:
    return pa.table({"image_id": pa.array(ids, pa.string()), "image_uri": pa.array(uris, pa.string()),
                     VERSION_COLUMN: pa.array(versions, pa.string())})


def walk_files(fs, root: str) -> Iterator[tuple[str, dict]]:
    """(path, info) of every entry under ``root``, as a stream: memory does not grow with the count.

    On S3, ``list_objects_v2`` pages of 1,000 keys are yielded as they arrive
    (keys ending in "/" are folder markers, not files); elsewhere the
    filesystem's walk, one directory at a time.
    """
    if _is_s3(fs):
        bucket, _, prefix = root.partition("/")
        request = {"Bucket": bucket, "Prefix": prefix + "/" if prefix else "", "MaxKeys": S3_PAGE_KEYS}
        while True:
            page = fs.call_s3("list_objects_v2", **request)
            for item in page.get("Contents", []):
                key = item["Key"]
                if not key.endswith("/"):
                    yield f"{bucket}/{key}", {**item, "name": f"{bucket}/{key}", "size": item.get("Size"),
                                              "type": "file"}
            token = page.get("NextContinuationToken")
            if not page.get("IsTruncated") or not token:
                return
            request["ContinuationToken"] = token
    for folder, _, files in fs.walk(root, detail=True):
        for name, info in files.items():
            yield info.get("name") or posixpath.join(folder, name), info


def _is_s3(fs) -> bool:
    protocols = fs.protocol if isinstance(fs.protocol, (tuple, list)) else (fs.protocol,)
    return "s3" in protocols and hasattr(fs, "call_s3")


def check_image_table(table: pa.Table, source: str, reserved: tuple[str, ...] = RESERVED_COLUMNS) -> None:
    """Refuse an image table whose columns would overwrite output columns or have unusable types.

    ``label`` must hold integers 0/1 without nulls; ``class_name`` and
    ``mask_uri`` strings; ``has_masks`` booleans (they drive metrics and masks).
    """
    clash = [name for name in table.column_names if name in reserved]
    if clash:
        raise InputError(f"{source}: column{'s' if len(clash) > 1 else ''} {', '.join(clash)} "
                         f"{'are' if len(clash) > 1 else 'is'} computed by the job; rename "
                         f"{'them' if len(clash) > 1 else 'it'} in the manifest")
    schema = table.schema
    if "label" in schema.names:
        column = table["label"]
        kind = schema.field("label").type
        if not (pa.types.is_integer(kind) or pa.types.is_boolean(kind)):
            raise InputError(f"{source}: label must be integers 0 or 1, got {kind} values")
        values = set(pc.unique(column.cast(pa.int64())).to_pylist())
        if values - set(LABEL_VALUES):
            shown = sorted(values - set(LABEL_VALUES), key=str)[:3]
            raise InputError(f"{source}: label must be 0 or 1 on every row, found {shown}")
    strings = (pa.types.is_string, pa.types.is_large_string, pa.types.is_null)
    for name, checks, what in (("class_name", strings, "strings"), ("mask_uri", strings, "strings"),
                               ("has_masks", (pa.types.is_boolean, pa.types.is_null), "booleans")):
        if name in schema.names and not any(check(schema.field(name).type) for check in checks):
            raise InputError(f"{source}: {name} must be {what}, got {schema.field(name).type} values")


def _read_manifest(uri, fs, path, storage_options) -> Iterator[pa.Table]:
    """A manifest's rows in chunks, with URIs resolved and ids filled in (vectorised)."""
    if not fs.exists(path):
        raise _missing(uri, fs, path, "manifest")
    base = posixpath.dirname(url_path(uri, path))
    prefix = as_uri(fs, base, uri).rstrip("/") + "/" if base else ""
    with open_file(uri, "rb", storage_options) as handle:
        try:
            if url_path(uri, path).lower().endswith(".csv"):
                text = {"image_uri": pa.string(), "image_id": pa.string()}
                reader = pacsv.open_csv(handle, read_options=pacsv.ReadOptions(block_size=CSV_BLOCK_BYTES),
                                        convert_options=pacsv.ConvertOptions(column_types=text))
            else:
                reader = pq.ParquetFile(handle).iter_batches(batch_size=CHUNK_ROWS)
            for batch in reader:
                yield _manifest_chunk(pa.Table.from_batches([batch]), uri, prefix)
        except (pa.ArrowInvalid, OSError) as err:
            raise InputError(f"cannot read manifest {uri}: {str(err).splitlines()[0]}") from None


def _manifest_chunk(table: pa.Table, uri: str, prefix: str) -> pa.Table:
    if "image_uri" not in table.column_names:
        raise InputError(f"manifest {uri} has no image_uri column (columns: {', '.join(table.column_names)})")
    check_image_table(table, f"manifest {uri}")
    values = table["image_uri"].cast(pa.string())
    blank = pc.fill_null(pc.equal(pc.utf8_trim_whitespace(values), ""), True)
    if pc.any(blank).as_py():
        raise InputError(f"manifest {uri} has an empty image_uri")
    absolute = pc.or_(pc.match_substring(values, "://"), pc.starts_with(values, "/"))
    uris = pc.if_else(absolute, values, pc.binary_join_element_wise(prefix, values, "")) if prefix else values
    if "image_id" in table.column_names:  # a missing (null or empty) id falls back to the URI
        ids = table["image_id"].cast(pa.string())
        missing = pc.fill_null(pc.equal(pc.utf8_trim_whitespace(ids), ""), True)
        ids = pc.if_else(missing, uris, ids)
    else:
        ids = uris
    extras = [name for name in table.column_names if name not in ("image_id", "image_uri")]
    columns = {"image_id": ids, "image_uri": uris}
    for name in extras:
        columns[name] = table[name]
    return pa.table(columns)


class ListingHash:
    """sha256 over the sorted image ids, URIs and (when listed) versions: what a run was planned over.

    Fed table by table in listing order, so a listing of any size is hashed in one pass.
    """

    def __init__(self):
        self._digest = hashlib.sha256()

    def update(self, table: pa.Table) -> None:
        digest = self._digest
        versions = table[VERSION_COLUMN].to_pylist() if VERSION_COLUMN in table.column_names else None
        for i, (image_id, image_uri) in enumerate(zip(table["image_id"].to_pylist(), table["image_uri"].to_pylist())):
            digest.update(image_id.encode())
            digest.update(b"\0")
            digest.update(image_uri.encode())
            if versions is not None and versions[i] is not None:
                digest.update(b"\0")
                digest.update(versions[i].encode())
            digest.update(b"\n")

    def hexdigest(self) -> str:
        return self._digest.hexdigest()


def listing_hash(table: pa.Table) -> str:
    """The :class:`ListingHash` of one table."""
    hasher = ListingHash()
    hasher.update(table)
    return hasher.hexdigest()


def shard_slices(num_images: int, shard_size: int) -> list[tuple[int, int]]:
    """(start, stop) of each shard over the sorted listing."""
    return [(start, min(start + shard_size, num_images)) for start in range(0, num_images, shard_size)]
