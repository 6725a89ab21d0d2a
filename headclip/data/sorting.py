"""Sorting a stream of tables larger than memory, by one string column.

:func:`sort_tables` reads the stream once, sorts it in runs of ``run_rows``
rows, spills each run to an Arrow IPC file in a local folder, then merges the
runs chunk by chunk. Memory holds one run while reading and one chunk per run
while merging, whatever the length of the stream. A stream that fits in one
run is sorted in memory and never touches the folder.

Each merge step emits every buffered row whose key is at most the smallest
"last key" among the runs' buffers: no row still unread can sort before it,
so the output is sorted, and the run that set that bound is always emptied,
so every step makes progress.
"""

from __future__ import annotations

import itertools
import logging
import os
from typing import Iterable, Iterator, Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ..errors import InputError

log = logging.getLogger(__name__)

RUN_ROWS = 250_000  # rows sorted in memory at a time
MERGE_ROWS = 16_384  # rows read from each spilled run at a time


def sort_tables(tables: Iterable[pa.Table], key: str, workdir: str, unique: Optional[str] = None,
                source: str = "input", empty: Optional[Exception] = None, run_rows: int = RUN_ROWS,
                merge_rows: int = MERGE_ROWS) -> Iterator[pa.Table]:
    """Tables of ``tables`` sorted by ``key`` (ascending, stable), in chunks of at most ``merge_rows`` rows.

    ``unique`` names a column that must not repeat across the whole stream
    (InputError otherwise); ``empty`` is raised for a stream without rows.
    Both are raised before the first chunk is yielded. ``workdir`` must exist.
    """
    runs: list[str] = []
    pending: list[pa.Table] = []
    pending_rows = 0
    ids = _UniqueCheck(unique) if unique else None
    for table in tables:
        if table.num_rows == 0:
            continue
        if ids is not None:
            ids.add(table)
        pending.append(table)
        pending_rows += table.num_rows
        if pending_rows >= run_rows:
            runs.append(_spill(_sort(pending, key), workdir, len(runs), merge_rows))
            pending, pending_rows = [], 0
    tail = _sort(pending, key) if pending else None
    if not runs and tail is None:
        if empty is not None:
            raise empty
        return
    if ids is not None:
        ids.check(source, runs, tail)
    if not runs:
        for start in range(0, tail.num_rows, merge_rows):
            yield tail.slice(start, merge_rows)
        return
    if tail is not None:
        runs.append(_spill(tail, workdir, len(runs), merge_rows))
        del tail
    log.info("merging %d sorted runs of %s", len(runs), source)
    try:
        yield from _merge(runs, key, merge_rows)
    finally:
        for path in runs:
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass


def _sort(tables: list[pa.Table], key: str) -> pa.Table:
    return pa.concat_tables(tables).sort_by([(key, "ascending")]).combine_chunks()


def _spill(table: pa.Table, workdir: str, index: int, chunk_rows: int) -> str:
    path = os.path.join(workdir, f"run-{index:05d}.arrow")
    with pa.OSFile(path, "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table, max_chunksize=chunk_rows)
    return path


class _Run:
    """A spilled run read one record batch at a time."""

    def __init__(self, path: str):
        self.file = pa.OSFile(path, "rb")
        self.reader = pa.ipc.open_file(self.file)
        self.next_batch = 0
        self.buffer: Optional[pa.Table] = None
        self.refill()

    def refill(self) -> None:
        self.buffer = None
        while self.buffer is None and self.next_batch < self.reader.num_record_batches:
            batch = self.reader.get_batch(self.next_batch)
            self.next_batch += 1
            if batch.num_rows:
                self.buffer = pa.Table.from_batches([batch])
        if self.buffer is None:
            self.file.close()


def _merge(paths: list[str], key: str, chunk_rows: int) -> Iterator[pa.Table]:
    runs = [_Run(path) for path in paths]
    while True:
        active = [run for run in runs if run.buffer is not None]
        if not active:
            return
        bound = min(run.buffer[key][-1].as_py() for run in active)
        taken = []
        for run in active:
            count = pc.sum(pc.less_equal(run.buffer[key], bound)).as_py() or 0
            if count:
                taken.append(run.buffer.slice(0, count))
            if count == run.buffer.num_rows:
                run.refill()
            else:
                run.buffer = run.buffer.slice(count)
        merged = pa.concat_tables(taken).sort_by([(key, "ascending")])
        for start in range(0, merged.num_rows, chunk_rows):
            yield merged.slice(start, chunk_rows)


class _UniqueCheck:
    """Whether a column repeats across a stream, in 8 bytes per row.

    Values are hashed as they pass; rows whose hashes repeat (real repeats or,
    rarely, a hash collision) are then compared exactly on a second read of the
    spilled runs, so a collision never refuses a valid input.
    """

    def __init__(self, column: str):
        self.column = column
        self.hashes: list[np.ndarray] = []

    def add(self, table: pa.Table) -> None:
        values = table[self.column].to_pylist()
        self.hashes.append(np.fromiter((hash(v) for v in values), np.int64, len(values)))

    def check(self, source: str, runs: list[str], tail: Optional[pa.Table]) -> None:
        hashes = np.concatenate(self.hashes) if self.hashes else np.zeros(0, np.int64)
        self.hashes = []
        hashes.sort()  # in place: 8 bytes per row at most twice
        repeated = set(hashes[1:][hashes[1:] == hashes[:-1]].tolist())
        if not repeated:
            return
        counts: dict = {}
        for table in itertools.chain(_spilled(runs), [tail] if tail is not None else []):
            for value in table[self.column].to_pylist():
                if hash(value) in repeated:
                    counts[value] = counts.get(value, 0) + 1
        duplicates = sum(n - 1 for n in counts.values() if n > 1)
        if duplicates:
            raise InputError(f"{source}: {duplicates} duplicate {self.column} values")


def _spilled(paths: list[str]) -> Iterator[pa.Table]:
    for path in paths:
        with pa.OSFile(path, "rb") as handle:
            reader = pa.ipc.open_file(handle)
            for i in range(reader.num_record_batches):
                yield pa.Table.from_batches([reader.get_batch(i)])
