"""Storage through fsspec: local paths, ``file://`` and ``s3://`` alike.

Every function takes ``storage_options``, the keyword arguments of the
filesystem (for S3, e.g. ``{"client_kwargs": {"endpoint_url": ...}}``).
"""

from __future__ import annotations

import posixpath
import uuid
from typing import Optional

import fsspec
from fsspec.core import url_to_fs


def filesystem(uri: str, storage_options: Optional[dict] = None):
    """(filesystem, path without protocol) for ``uri``."""
    return url_to_fs(uri, **(storage_options or {}))


def open_file(uri: str, mode: str = "rb", storage_options: Optional[dict] = None):
    """Open ``uri`` for reading or writing; a context manager."""
    return fsspec.open(uri, mode, **(storage_options or {}))


def read_bytes(uri: str, storage_options: Optional[dict] = None) -> bytes:
    with open_file(uri, "rb", storage_options) as handle:
        return handle.read()


def write_bytes_atomic(uri: str, data: bytes, storage_options: Optional[dict] = None) -> None:
    """Write ``data`` so that readers see either nothing or the whole file.

    Object stores publish an object in one PUT, so a plain write is atomic
    there; on a local filesystem the bytes go to a temporary sibling that is
    then renamed over the target.
    """
    fs, path = filesystem(uri, storage_options)
    protocols = fs.protocol if isinstance(fs.protocol, (tuple, list)) else (fs.protocol,)
    if "file" in protocols or "local" in protocols:
        parent = posixpath.dirname(path)
        if parent:
            fs.makedirs(parent, exist_ok=True)
        tmp = posixpath.join(parent, f".{posixpath.basename(path)}.{uuid.uuid4().hex}.tmp")
        with fs.open(tmp, "wb") as handle:
            handle.write(data)
        fs.mv(tmp, path)
    else:
        with fs.open(path, "wb") as handle:
            handle.write(data)


def join(base: str, *parts: str) -> str:
    """Join URI parts with '/', keeping the protocol of ``base``."""
    out = base.rstrip("/")
    for part in parts:
        out = f"{out}/{part.strip('/')}"
    return out


def has_protocol(uri: str) -> bool:
    return "://" in uri


def as_uri(fs, path: str, like: str) -> str:
    """``path`` as fsspec returns it, with the protocol restored when ``like`` (the user's URI) has one."""
    return fs.unstrip_protocol(path) if has_protocol(like) else path


def resolve_relative(fs, like: str, base: str, value) -> Optional[str]:
    """A path read from a manifest as a URI: absolute ones as they are, relative ones under ``base``.

    ``base`` is a path on ``fs`` (no protocol); ``like`` is the URI the
    manifest was named by. Empty values give None.
    """
    if value is None or str(value).strip() == "":
        return None
    value = str(value)
    if has_protocol(value) or value.startswith("/"):
        return value
    return as_uri(fs, posixpath.join(base, value), like)
