"""Listing an input into a sorted image table, and cutting it into shards.

An input is a prefix (folder), a glob, a single image, or a manifest file
(CSV or Parquet with an ``image_uri`` column, optional ``image_id`` and any
extra columns, which travel with each image into the output).
"""

from __future__ import annotations

import hashlib
import posixpath
from typing import Optional, Sequence

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from ..errors import InputError
from .decode import IMAGE_EXTENSIONS
from ..storage.fs import as_uri, filesystem, open_file, resolve_relative

MANIFEST_SUFFIXES = (".csv", ".parquet", ".pq")
GLOB_CHARS = "*?["


def list_images(uri: str, extensions: Sequence[str] = IMAGE_EXTENSIONS, storage_options: Optional[dict] = None,
                limit: Optional[int] = None) -> pa.Table:
    """List ``uri`` into a table sorted by ``image_uri``.

    Columns: ``image_id`` (path relative to the input root, or the manifest's),
    ``image_uri`` (absolute; with the input's protocol), then manifest extras.
    """
    fs, path = filesystem(uri, storage_options)
    if path.lower().endswith(MANIFEST_SUFFIXES):
        table = _read_manifest(uri, fs, path, storage_options)
    else:
        table = _list_files(uri, fs, path, extensions)
    if table.num_rows == 0:
        raise InputError(f"no images found at {uri} (extensions {', '.join(extensions)})")
    table = table.sort_by([("image_uri", "ascending")])
    duplicates = table.num_rows - len(pc.unique(table["image_id"]))
    if duplicates:
        raise InputError(f"{uri}: {duplicates} duplicate image_id values")
    if limit is not None:
        table = table.slice(0, limit)
    return table


def _list_files(uri, fs, path, extensions) -> pa.Table:
    suffixes = tuple(e.lower() if e.startswith(".") else "." + e.lower() for e in extensions)
    if any(ch in path for ch in GLOB_CHARS):
        root = path[: min(path.index(ch) for ch in GLOB_CHARS if ch in path)].rsplit("/", 1)[0]
        found = [p for p in fs.glob(path) if not fs.isdir(p)]
    elif fs.isdir(path):
        root = path.rstrip("/")
        found = fs.find(path)
    elif fs.exists(path):
        root = posixpath.dirname(path)
        found = [path]
    else:
        raise InputError(f"input not found: {uri}")
    files = sorted(p for p in found if p.lower().endswith(suffixes) and not posixpath.basename(p).startswith("."))
    ids = [posixpath.relpath(p, root) if root else p for p in files]
    uris = [as_uri(fs, p, uri) for p in files]
    return pa.table({"image_id": pa.array(ids, pa.string()), "image_uri": pa.array(uris, pa.string())})


def _read_manifest(uri, fs, path, storage_options) -> pa.Table:
    if not fs.exists(path):
        raise InputError(f"manifest not found: {uri}")
    with open_file(uri, "rb", storage_options) as handle:
        try:
            table = pacsv.read_csv(handle) if path.lower().endswith(".csv") else pq.read_table(handle)
        except (pa.ArrowInvalid, OSError) as err:
            raise InputError(f"cannot read manifest {uri}: {str(err).splitlines()[0]}") from None
    if "image_uri" not in table.column_names:
        raise InputError(f"manifest {uri} has no image_uri column (columns: {', '.join(table.column_names)})")
    base = posixpath.dirname(path)
    uris = []
    for value in table["image_uri"].to_pylist():
        resolved = resolve_relative(fs, uri, base, value)
        if resolved is None:
            raise InputError(f"manifest {uri} has an empty image_uri")
        uris.append(resolved)
    if "image_id" in table.column_names:
        ids = [str(v) for v in table["image_id"].to_pylist()]
    else:
        ids = uris
    extras = [name for name in table.column_names if name not in ("image_id", "image_uri")]
    columns = {"image_id": pa.array(ids, pa.string()), "image_uri": pa.array(uris, pa.string())}
    for name in extras:
        columns[name] = table[name]
    return pa.table(columns)


def listing_hash(table: pa.Table) -> str:
    """sha256 over the sorted image ids and URIs: what the run was planned over."""
    digest = hashlib.sha256()
    for image_id, image_uri in zip(table["image_id"].to_pylist(), table["image_uri"].to_pylist()):
        digest.update(image_id.encode())
        digest.update(b"\0")
        digest.update(image_uri.encode())
        digest.update(b"\n")
    return digest.hexdigest()


def shard_slices(num_images: int, shard_size: int) -> list[tuple[int, int]]:
    """(start, stop) of each shard over the sorted listing."""
    return [(start, min(start + shard_size, num_images)) for start in range(0, num_images, shard_size)]
