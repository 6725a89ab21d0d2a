"""A scoring run's plan: its id, its sorted image list in pieces, and its shards.

The plan is written next to the output before any work starts::

    OUTPUT/run_id=<id>/_plan/images-00000.arrow ...   the sorted image list, in pieces
    OUTPUT/run_id=<id>/_plan/plan.json                config, checkpoint id, listing hash, counts

Each piece is an Arrow IPC file holding ``shards_per_piece`` consecutive
shards, one record batch per shard, so a worker reads only its own shard's
rows and the driver never holds the whole list. ``plan.json`` is written last:
a plan without it is incomplete and is planned again. A rerun of the same run
reads the stored plan instead of listing again, so shard boundaries never move
and no row is ever written twice. Plans written before pieces existed (one
``_plan/images.arrow``) are read as one piece.

The plan verifies itself: ``plan.json`` records each piece's rows, bytes and
sha256 and a checksum of its own content, and :func:`read_plan` checks them
all (and that the counts agree) before a run resumes. A damaged plan (edited
or truncated ``plan.json``, a piece deleted, truncated or replaced) is a
:class:`~headclip.errors.PlanError` naming the file and how to recover.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from typing import Any, Iterable, Iterator, Optional

import pyarrow as pa

from ..data.listing import ListingHash
from ..errors import PlanError
from ..storage.fs import filesystem, open_file, read_bytes, write_bytes_atomic
from ..storage.layout import VERSION_COLUMN, plan_file_uri, plan_images_uri, plan_piece_uri, shard_uri

log = logging.getLogger(__name__)

PLAN_FORMAT = 2  # pieces with one record batch per shard
PIECE_ROWS = 131_072  # about this many images per piece (whole shards)
PIECE_OPTIONS = pa.ipc.IpcWriteOptions(compression="zstd")


def derive_run_id(input_uri: str, checkpoint_id: str, settings: dict[str, Any]) -> str:
    """A short stable id from the input, the checkpoint and the settings that shape rows."""
    payload = json.dumps({"input": input_uri, "checkpoint": checkpoint_id, "settings": settings}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def shards_per_piece(shard_size: int) -> int:
    return max(1, PIECE_ROWS // max(1, shard_size))


@dataclass(frozen=True)
class ShardSource:
    """Where a shard's images are in the plan: a piece file and the shard's place in it."""

    piece_uri: str
    batch: Optional[int]  # the record batch of the shard; None: rows [start, stop) of a one-piece legacy plan
    start: int
    stop: int

    @property
    def rows(self) -> int:
        return self.stop - self.start


def recovery(run: str) -> str:
    """How to get past a damaged plan of the run folder ``run``."""
    return (f"give a new --run-id to plan the input again, or delete {run} to start the run over "
            f"(its scored shards are lost with it)")


def _damaged(what: str, uri: str, problem: str) -> PlanError:
    run = uri.rsplit("/", 2)[0] if uri.count("/") >= 2 else uri
    return PlanError(f"the run's plan is damaged: {what} {uri} {problem}; {recovery(run)}")


def read_shard_images(source: ShardSource, storage_options: Optional[dict] = None) -> pa.Table:
    """A shard's image table (image_id, image_uri, extras), read from its plan piece.

    A piece that is gone, unreadable or short of the shard is a PlanError.
    """
    try:
        with open_file(source.piece_uri, "rb", storage_options) as handle:
            reader = pa.ipc.open_file(handle)
            if source.batch is not None:
                if source.batch >= reader.num_record_batches:
                    raise _damaged("plan piece", source.piece_uri,
                                   f"holds {reader.num_record_batches} shards, not shard {source.batch + 1}")
                table = pa.Table.from_batches([reader.get_batch(source.batch)])
            else:
                table = reader.read_all().slice(source.start, source.rows)
    except FileNotFoundError:
        raise _damaged("plan piece", source.piece_uri, "is missing") from None
    except (pa.ArrowInvalid, OSError) as err:
        raise _damaged("plan piece", source.piece_uri, f"cannot be read ({' '.join(str(err).split())[:200]})") \
            from None
    if table.num_rows != source.rows:
        raise _damaged("plan piece", source.piece_uri, f"holds {table.num_rows} rows for a shard of {source.rows}")
    return table


@dataclass
class RunPlan:
    """A run's plan without its image list, which stays in the piece files."""

    run_id: str
    output: str
    num_images: int
    shard_size: int
    listing_hash: str
    config: dict[str, Any]
    checkpoint_id: str
    schema: pa.Schema  # of the image list
    shards_per_piece: int
    resumed: bool = False
    legacy: bool = False  # one images.arrow of any batching (plans written before pieces)

    @property
    def num_shards(self) -> int:
        return -(-self.num_images // self.shard_size)

    @property
    def num_pieces(self) -> int:
        return -(-self.num_shards // self.shards_per_piece)

    def shard_uri(self, index: int) -> str:
        return shard_uri(self.output, self.run_id, index)

    def piece_uri(self, piece: int) -> str:
        if self.legacy:
            return plan_images_uri(self.output, self.run_id)
        return plan_piece_uri(self.output, self.run_id, piece)

    def shard_rows(self, index: int) -> int:
        return min(self.shard_size, self.num_images - index * self.shard_size)

    def shard_source(self, index: int) -> ShardSource:
        if not 0 <= index < self.num_shards:
            raise IndexError(f"shard {index} of a plan with {self.num_shards} shards")
        start = index * self.shard_size
        if self.legacy:
            return ShardSource(self.piece_uri(0), None, start, start + self.shard_rows(index))
        piece, batch = divmod(index, self.shards_per_piece)
        return ShardSource(self.piece_uri(piece), batch, 0, self.shard_rows(index))

    def shard_images(self, index: int, storage_options: Optional[dict] = None) -> pa.Table:
        return read_shard_images(self.shard_source(index), storage_options)

    def iter_images(self, storage_options: Optional[dict] = None,
                    columns: Optional[list[str]] = None) -> Iterator[pa.Table]:
        """The image list piece by piece (bounded memory), optionally only ``columns``."""
        for piece in range(1 if self.legacy else self.num_pieces):
            with open_file(self.piece_uri(piece), "rb", storage_options) as handle:
                table = pa.ipc.open_file(handle).read_all()
            yield table.select(columns) if columns else table

    @property
    def extra_fields(self) -> list[pa.Field]:
        return [f for f in self.schema if f.name not in ("image_id", "image_uri", VERSION_COLUMN)]


class StagedPlan:
    """A sorted image list cut into plan pieces in a local folder, before the run has its id.

    The listing hash (and so the run id) is known only once every image has been
    seen; :meth:`publish` then copies the pieces under the run and writes
    ``plan.json`` last.
    """

    def __init__(self, workdir: str, shard_size: int, schema: Optional[pa.Schema] = None):
        self.workdir, self.shard_size = workdir, shard_size
        self.per_piece = shards_per_piece(shard_size)
        self.hash = ListingHash()
        self.num_images = 0
        self.schema: Optional[pa.Schema] = schema
        self.pieces: list[str] = []
        self._buffer: list[pa.Table] = []
        self._buffered = 0

    def add_all(self, tables: Iterable[pa.Table], limit: Optional[int] = None) -> "StagedPlan":
        """Add the sorted ``tables`` (at most ``limit`` rows of them) and finish the last piece."""
        for table in tables:
            if limit is not None and self.num_images + table.num_rows > limit:
                table = table.slice(0, limit - self.num_images)
            self.add(table)
            if limit is not None and self.num_images >= limit:
                break
        close = getattr(tables, "close", None)
        if close is not None:
            close()  # a listing stopped at the limit removes its spilled runs now
        self.finish()
        return self

    def add(self, table: pa.Table) -> None:
        if self.schema is None:
            self.schema = table.schema
        elif table.schema != self.schema:
            table = table.cast(self.schema)
        self.hash.update(table)
        self.num_images += table.num_rows
        self._buffer.append(table)
        self._buffered += table.num_rows
        piece_rows = self.per_piece * self.shard_size
        while self._buffered >= piece_rows:
            whole = pa.concat_tables(self._buffer)
            self._write_piece(whole.slice(0, piece_rows))
            rest = whole.slice(piece_rows)
            self._buffer, self._buffered = ([rest] if rest.num_rows else []), rest.num_rows

    def finish(self) -> None:
        if self._buffered:
            self._write_piece(pa.concat_tables(self._buffer))
        self._buffer, self._buffered = [], 0
        if self.schema is None:
            self.schema = pa.schema([("image_id", pa.string()), ("image_uri", pa.string())])

    def _write_piece(self, table: pa.Table) -> None:
        path = os.path.join(self.workdir, f"piece-{len(self.pieces):05d}.arrow")
        table = table.combine_chunks()
        with pa.OSFile(path, "wb") as sink, pa.ipc.new_file(sink, table.schema, options=PIECE_OPTIONS) as writer:
            for start in range(0, table.num_rows, self.shard_size):  # one record batch per shard
                writer.write_table(table.slice(start, self.shard_size), max_chunksize=self.shard_size)
        self.pieces.append(path)

    @property
    def listing_hash(self) -> str:
        return self.hash.hexdigest()

    def publish(self, run_id: str, output: str, config: dict[str, Any], checkpoint_id: str,
                storage_options: Optional[dict] = None) -> RunPlan:
        """Copy the pieces under the run, then write plan.json; the published plan."""
        plan = RunPlan(run_id, output, self.num_images, self.shard_size, self.listing_hash, config, checkpoint_id,
                       self.schema, self.per_piece)
        pieces = []
        for index, path in enumerate(self.pieces):
            with open(path, "rb") as handle:
                data = handle.read()
            write_bytes_atomic(plan.piece_uri(index), data, storage_options)
            rows = min(self.num_images - index * self.per_piece * self.shard_size, self.per_piece * self.shard_size)
            pieces.append({"file": plan.piece_uri(index).rsplit("/", 1)[-1], "rows": rows, "bytes": len(data),
                           "sha256": hashlib.sha256(data).hexdigest()})
        document = _document(plan)
        document["pieces"] = pieces
        document["checksum"] = _checksum(document)
        write_bytes_atomic(plan_file_uri(output, run_id), json.dumps(document, indent=2, sort_keys=True).encode(),
                           storage_options)
        return plan


def _document(plan: RunPlan) -> dict[str, Any]:
    return {
        "format": PLAN_FORMAT,
        "run_id": plan.run_id,
        "checkpoint_id": plan.checkpoint_id,
        "listing_hash": plan.listing_hash,
        "num_images": plan.num_images,
        "shard_size": plan.shard_size,
        "num_shards": plan.num_shards,
        "shards_per_piece": plan.shards_per_piece,
        "num_pieces": plan.num_pieces,
        "schema": plan.schema.serialize().to_pybytes().hex(),
        "config": plan.config,
    }


def _checksum(document: dict[str, Any]) -> str:
    """sha256 of a plan document's content, less its own ``checksum`` entry."""
    content = {k: v for k, v in document.items() if k != "checksum"}
    return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()


def read_plan(output: str, run_id: str, storage_options: Optional[dict] = None) -> Optional[RunPlan]:
    """The stored plan of ``run_id``, or None if the run has not been planned (or its plan is incomplete).

    A plan that fails its own checks (see the module doc) is a PlanError.
    """
    uri = plan_file_uri(output, run_id)
    fs, path = filesystem(uri, storage_options)
    if not fs.exists(path):
        return None
    try:
        document = json.loads(read_bytes(uri, storage_options))
    except (ValueError, UnicodeDecodeError, RecursionError) as err:
        raise _damaged("plan file", uri, f"is not valid JSON ({type(err).__name__}: {err})") from None
    if not isinstance(document, dict) or not isinstance(document.get("format", 1), int):
        raise _damaged("plan file", uri, "is not a JSON object with a format number")
    if document.get("format", 1) >= PLAN_FORMAT:
        try:
            plan = RunPlan(run_id, output, document["num_images"], document["shard_size"], document["listing_hash"],
                           document["config"], document["checkpoint_id"],
                           pa.ipc.read_schema(pa.py_buffer(bytes.fromhex(document["schema"]))),
                           document["shards_per_piece"], resumed=True)
        except (KeyError, TypeError, ValueError, pa.ArrowInvalid) as err:
            raise _damaged("plan file", uri, f"lacks or garbles an entry ({type(err).__name__}: {err})") from None
        verify_plan(plan, document, storage_options)
        return plan
    with open_file(plan_images_uri(output, run_id), "rb", storage_options) as handle:
        reader = pa.ipc.open_file(handle)
        schema, rows = reader.schema, sum(reader.get_batch(i).num_rows for i in range(reader.num_record_batches))
    shards = -(-rows // document["shard_size"])
    return RunPlan(run_id, output, rows, document["shard_size"], document["listing_hash"], document["config"],
                   document["checkpoint_id"], schema, max(1, shards), resumed=True, legacy=True)


def verify_plan(plan: RunPlan, document: dict[str, Any], storage_options: Optional[dict] = None) -> None:
    """Check a stored plan against what ``plan.json`` records of itself and its pieces; PlanError if damaged.

    Plans written before pieces were recorded carry no checksums: only their counts are checked.
    """
    uri = plan_file_uri(plan.output, plan.run_id)
    counts_ok = (all(isinstance(v, int) and not isinstance(v, bool) and v > 0
                     for v in (plan.shard_size, plan.shards_per_piece))
                 and isinstance(plan.num_images, int) and plan.num_images >= 0
                 and document.get("num_shards", plan.num_shards) == plan.num_shards
                 and document.get("num_pieces", plan.num_pieces) == plan.num_pieces)
    if not counts_ok:
        raise _damaged("plan file", uri, f"has counts that disagree ({plan.num_images} images, shard size "
                                         f"{plan.shard_size}, {document.get('num_shards')} shards)")
    if "checksum" not in document:
        return
    if document["checksum"] != _checksum(document):
        raise _damaged("plan file", uri, "was changed after it was written (its checksum does not match)")
    pieces = document.get("pieces")
    if not isinstance(pieces, list) or len(pieces) != plan.num_pieces or \
            sum(p.get("rows", 0) for p in pieces) != plan.num_images:
        raise _damaged("plan file", uri, "does not list its pieces")
    for index, piece in enumerate(pieces):
        piece_uri = plan.piece_uri(index)
        try:
            data = read_bytes(piece_uri, storage_options)
        except FileNotFoundError:
            raise _damaged("plan piece", piece_uri, "is missing") from None
        if len(data) != piece.get("bytes"):
            raise _damaged("plan piece", piece_uri, f"has {len(data)} bytes, not the {piece.get('bytes')} written "
                                                    f"(truncated or replaced)")
        if hashlib.sha256(data).hexdigest() != piece.get("sha256"):
            raise _damaged("plan piece", piece_uri, "was changed after it was written (its sha256 does not match)")
