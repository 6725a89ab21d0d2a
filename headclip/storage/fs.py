"""Storage through fsspec: local paths, ``file://`` and ``s3://`` alike.

Every function takes ``storage_options``, the keyword arguments of the
filesystem (for S3, e.g. ``{"client_kwargs": {"endpoint_url": ...}}``).

URIs are taken literally: ``::`` is part of a name (``evil::x.png`` is that
file), never fsspec's URL chaining. Reads of local files refuse anything but
regular files (a FIFO would block forever).
"""

from __future__ import annotations

import errno
import os
import posixpath
import stat
import uuid
from typing import Optional

import fsspec
from fsspec.core import split_protocol


def filesystem(uri: str, storage_options: Optional[dict] = None):
    """(filesystem, path without protocol) for ``uri``, taken literally (no URL chaining)."""
    protocol, _ = split_protocol(uri)
    cls = fsspec.get_filesystem_class(protocol or "file")
    options = {**cls._get_kwargs_from_urls(uri), **(storage_options or {})}
    return cls(**options), cls._strip_protocol(uri)


def is_local(fs) -> bool:
    protocols = fs.protocol if isinstance(fs.protocol, (tuple, list)) else (fs.protocol,)
    return "file" in protocols or "local" in protocols


def _require_regular_file(path: str) -> None:
    """Refuse a local path that is not a regular file (FIFOs, devices, sockets) before opening it."""
    mode = os.stat(path).st_mode  # FileNotFoundError for a missing path or a broken link
    if stat.S_ISDIR(mode):
        raise IsADirectoryError(errno.EISDIR, "is a directory", path)
    if not stat.S_ISREG(mode):
        raise OSError(errno.EINVAL, "not a regular file", path)


def open_file(uri: str, mode: str = "rb", storage_options: Optional[dict] = None):
    """Open ``uri`` for reading or writing; a context manager (local reads: regular files only)."""
    fs, path = filesystem(uri, storage_options)
    if is_local(fs) and "r" in mode:
        _require_regular_file(path)
    return fs.open(path, mode)


def read_bytes(uri: str, storage_options: Optional[dict] = None) -> bytes:
    fs, path = filesystem(uri, storage_options)
    if is_local(fs):
        _require_regular_file(path)
    return fs.cat_file(path)


def file_version(info: dict) -> Optional[str]:
    """What identifies a file's content in a listing entry: its ETag, else size and mtime; None if unknown."""
    etag = info.get("ETag") or info.get("etag")
    if etag:
        return f"etag:{str(etag).strip(chr(34))}"
    size = info.get("size")
    mtime = info.get("mtime", info.get("LastModified", info.get("last_modified")))
    if size is None and mtime is None:
        return None
    if hasattr(mtime, "isoformat"):
        mtime = mtime.isoformat()
    return f"size:{size};mtime:{mtime}"


def write_bytes_atomic(uri: str, data: bytes, storage_options: Optional[dict] = None) -> None:
    """Write ``data`` so that readers see either nothing or the whole file.

    Object stores publish an object in one PUT, so a plain write is atomic
    there; on a local filesystem the bytes go to a temporary sibling that is
    then renamed over the target.
    """
    fs, path = filesystem(uri, storage_options)
    if is_local(fs):
        parent = posixpath.dirname(path)
        if parent:
            fs.makedirs(parent, exist_ok=True)
        tmp = posixpath.join(parent, f".{posixpath.basename(path)}.{uuid.uuid4().hex}.tmp")
        try:
            with open(tmp, "wb") as handle:
                handle.write(data)
            os.replace(tmp, path)
        except BaseException:
            # a full disk or an interruption leaves no temporary file behind
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise
    else:
        fs.pipe_file(path, data)


def create_exclusive(uri: str, data: bytes, storage_options: Optional[dict] = None) -> bool:
    """Create ``uri`` holding ``data`` only if it does not exist; False if it does.

    Atomic on local filesystems (O_EXCL) and on S3 (a conditional PUT,
    ``If-None-Match: *``). Other stores get check-then-write, which two
    writers racing within a request's time can both pass.
    """
    fs, path = filesystem(uri, storage_options)
    if is_local(fs):
        parent = posixpath.dirname(path)
        if parent:
            os.makedirs(parent, exist_ok=True)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        return True
    protocols = fs.protocol if isinstance(fs.protocol, (tuple, list)) else (fs.protocol,)
    if "s3" in protocols:
        try:
            fs.pipe_file(path, data, mode="create")
        except FileExistsError:
            return False
        except OSError as err:  # s3fs may report a failed precondition (412) as a plain OSError
            if any(sign in str(err) for sign in ("PreconditionFailed", "412", "pre-conditions")):
                return False
            raise
        return True
    if fs.exists(path):
        return False
    fs.pipe_file(path, data)
    return True


def delete(uri: str, storage_options: Optional[dict] = None) -> None:
    """Remove ``uri``; nothing if it does not exist."""
    fs, path = filesystem(uri, storage_options)
    try:
        fs.rm_file(path)
    except FileNotFoundError:
        pass


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


def canonical_uri(uri: str, storage_options: Optional[dict] = None) -> str:
    """One spelling of ``uri``: the protocol kept, no trailing '/', local paths absolute (``dir`` = ``dir/``)."""
    fs, path = filesystem(uri, storage_options)
    return as_uri(fs, path, uri)


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


_CONNECTION_ERRORS = {"ConnectionError", "ClientConnectionError", "EndpointConnectionError", "ConnectTimeoutError",
                      "ReadTimeoutError", "ServerTimeoutError", "TimeoutError", "gaierror"}
_CREDENTIAL_ERRORS = {"NoCredentialsError", "PartialCredentialsError", "CredentialRetrievalError"}


def _chain(err: BaseException) -> list[BaseException]:
    found: list[BaseException] = []
    while err is not None and not any(err is e for e in found):
        found.append(err)
        err = err.__cause__ or err.__context__
    return found


def _line(err: BaseException) -> str:
    return " ".join((str(err).strip() or type(err).__name__).split())[:300]


def is_connection_error(err: BaseException) -> bool:
    """Whether ``err`` (or what caused it) is a failure to reach the store, not a missing object."""
    return any(_CONNECTION_ERRORS & {c.__name__ for c in type(e).__mro__} for e in _chain(err))


def describe_error(err: BaseException) -> str:
    """One line for a storage failure, naming its kind: a connection error is never "not found"."""
    for e in _chain(err):
        names = {c.__name__ for c in type(e).__mro__}
        if names & _CONNECTION_ERRORS:
            return f"connection error: {_line(e)}"
        if names & _CREDENTIAL_ERRORS:
            return f"no credentials: {_line(e)}"
    if isinstance(err, FileNotFoundError):
        return f"not found: {_line(err)}"
    if isinstance(err, PermissionError):
        return f"permission denied: {_line(err)}"
    if isinstance(err, ImportError):  # e.g. gs:// without gcsfs installed
        return f"unsupported storage: {_line(err)}"
    return f"{type(err).__name__}: {_line(err)}"
