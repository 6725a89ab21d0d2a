"""A run's plan at any size: the out-of-memory sort, plan pieces, --plan-only.

References: Python's ``sorted`` for the merge, the in-memory listing
(``list_images``) for the plan's shards.
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from headclip.data import sorting
from headclip.data.listing import list_images, listing_hash, sorted_listing
from headclip.errors import InputError
from headclip.scoring.plan import read_plan
from headclip.scoring.runner import prepare

from .scoring_helpers import job

REPO = Path(__file__).resolve().parents[1]


def _chunks(values: list[str], size: int):
    for start in range(0, len(values), size):
        part = values[start:start + size]
        yield pa.table({"key": pa.array(part, pa.string()), "row": pa.array(range(start, start + len(part)))})


def test_spilled_runs_merge_into_one_sorted_stream(tmp_path):
    """Catches: a merge step that emits a row before a smaller one still unread in another run, a lost or
    repeated row at a run boundary, ties reordered (the sort is stable: equal keys keep input order)."""
    rng = random.Random(3)
    values = [f"k{rng.randrange(400):04d}" for _ in range(3000)]  # many ties
    out = list(sorting.sort_tables(_chunks(values, 97), "key", str(tmp_path), run_rows=500, merge_rows=64))
    merged = pa.concat_tables(out)
    expected = sorted(range(len(values)), key=lambda i: values[i])  # Python's sort is stable
    assert merged["key"].to_pylist() == [values[i] for i in expected]
    assert sorted(merged["row"].to_pylist()) == list(range(len(values)))
    assert all(t.num_rows <= 64 for t in out)
    assert list(tmp_path.iterdir()) == []  # spilled runs are removed


def test_repeated_ids_are_found_across_runs_and_hash_collisions_are_not_repeats(tmp_path, monkeypatch):
    values = [f"id-{i:05d}" for i in range(2000)]
    # two repeats that land in different spilled runs
    repeated = values + [values[5], values[1500]]
    with pytest.raises(InputError, match="2 duplicate key values"):
        list(sorting.sort_tables(_chunks(repeated, 100), "key", str(tmp_path), unique="key", run_rows=300))
    # every value hashes alike: the exact second look must still accept unique values
    monkeypatch.setattr(sorting, "hash", lambda value: 7, raising=False)
    out = pa.concat_tables(sorting.sort_tables(_chunks(values, 100), "key", str(tmp_path), unique="key",
                                               run_rows=300))
    assert out.num_rows == 2000
    with pytest.raises(InputError, match="1 duplicate key values"):
        list(sorting.sort_tables(_chunks(values + [values[0]], 100), "key", str(tmp_path), unique="key",
                                 run_rows=300))


def _manifest(path, count: int, seed: int = 0):
    order = list(range(count))
    random.Random(seed).shuffle(order)
    pq.write_table(pa.table({"image_uri": [f"imgs/img-{i:05d}.png" for i in order],
                             "class_name": [f"c{i % 3}" for i in order]}), path, row_group_size=37)
    return path


def test_streamed_plan_shards_equal_the_in_memory_listing(tmp_path, tiny_checkpoint, monkeypatch):
    """The plan of a manifest sorted out of memory (tiny runs, tiny pieces) holds, shard by shard,
    the rows of the in-memory sorted listing. Catches: pieces cut off shard boundaries, a shard read
    from the wrong record batch or piece, rows lost at a piece boundary, a hash over another order."""
    monkeypatch.setattr(sorting, "RUN_ROWS", 50)
    monkeypatch.setattr("headclip.scoring.plan.PIECE_ROWS", 40)  # 5 shards of 8 per piece
    manifest = _manifest(tmp_path / "manifest.parquet", 333)
    reference = list_images(str(manifest))
    plan = prepare(job(str(manifest), str(tmp_path / "out"), tiny_checkpoint, shard_size=8))
    assert (plan.num_images, plan.num_shards, plan.shards_per_piece, plan.num_pieces) == (333, 42, 5, 9)
    assert plan.listing_hash == listing_hash(reference)
    for shard in range(plan.num_shards):
        assert plan.shard_images(shard).equals(reference.slice(shard * 8, 8)), shard
    pieces = sorted((tmp_path / "out" / f"run_id={plan.run_id}" / "_plan").glob("images-*.arrow"))
    assert len(pieces) == 9
    # a rerun reads the stored plan back, shards unchanged
    again = read_plan(str(tmp_path / "out"), plan.run_id)
    assert again.resumed and again.shard_images(41).equals(reference.slice(328, 5))


def test_a_limit_stops_the_sorted_listing(tmp_path, tiny_checkpoint):
    manifest = _manifest(tmp_path / "manifest.parquet", 50)
    plan = prepare(job(str(manifest), str(tmp_path / "out"), tiny_checkpoint, shard_size=4, limit=10))
    reference = list_images(str(manifest), limit=10)
    assert plan.num_images == 10
    assert pa.concat_tables(plan.iter_images()).equals(reference)


def test_plans_written_as_one_file_are_read_as_one_piece(tmp_path, tiny_checkpoint):
    """A plan from before pieces (one images.arrow, plan.json without a format) still resumes."""
    manifest = _manifest(tmp_path / "manifest.parquet", 20)
    plan = prepare(job(str(manifest), str(tmp_path / "out"), tiny_checkpoint, shard_size=6))
    plan_dir = tmp_path / "out" / f"run_id={plan.run_id}" / "_plan"
    table = pa.concat_tables(plan.iter_images())
    for piece in plan_dir.glob("images-*.arrow"):
        piece.unlink()
    with pa.OSFile(str(plan_dir / "images.arrow"), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table)  # one batch of 20 rows: shards are row ranges
    document = json.loads((plan_dir / "plan.json").read_text())
    old = {k: document[k] for k in ("run_id", "checkpoint_id", "listing_hash", "num_images", "shard_size",
                                     "num_shards", "config")}
    (plan_dir / "plan.json").write_text(json.dumps(old))
    legacy = prepare(job(str(manifest), str(tmp_path / "out"), tiny_checkpoint, shard_size=6))
    assert legacy.legacy and legacy.run_id == plan.run_id and legacy.num_shards == 4
    for shard in range(4):
        assert legacy.shard_images(shard).equals(table.slice(shard * 6, 6))


def test_plan_only_prints_the_run_and_starts_no_ray(tmp_path, tiny_checkpoint):
    manifest = _manifest(tmp_path / "manifest.parquet", 30)
    command = [sys.executable, "-m", "jobs.score", "--input", str(manifest), "--output", str(tmp_path / "out"),
               "--checkpoint", tiny_checkpoint, "--shard-size", "7", "--plan-only"]
    first = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert first.returncode == 0, first.stderr[-2000:]
    run_id = json.loads(next((tmp_path / "out").glob("run_id=*/_plan/plan.json")).read_text())["run_id"]
    assert f"run {run_id}: 30 images in 5 shards (1 plan pieces, written)" in first.stdout
    assert "Started a local Ray instance" not in first.stderr
    assert not list((tmp_path / "out").glob("run_id=*/shard-*.parquet"))
    second = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert f"run {run_id}: 30 images in 5 shards (1 plan pieces, read back)" in second.stdout


def test_an_s3_prefix_is_listed_a_page_at_a_time(s3_bucket, monkeypatch):
    """The listing of a prefix streams: its first chunk comes after S3's first page, not after the last,
    so the driver never holds every key. Catches a listing that collects the whole prefix (s3fs's
    find) before cutting it into chunks, and one that skips folder markers' siblings or lists
    another prefix that shares the name's start."""
    import fsspec

    from headclip.data import listing

    bucket, options = s3_bucket
    fs = fsspec.filesystem("s3", **options)
    fs.pipe({f"{bucket[5:]}/cam/img-{i:05d}.png": b"x" for i in range(150)})
    fs.pipe({f"{bucket[5:]}/cam/": b"", f"{bucket[5:]}/camera/other.png": b"x"})  # a folder marker, a sibling
    monkeypatch.setattr(listing, "S3_PAGE_KEYS", 100)  # two pages (the 1,010-key test uses S3's own 1,000)
    monkeypatch.setattr(listing, "CHUNK_ROWS", 40)
    fs, path = listing.filesystem(f"{bucket}/cam", options)
    pages = []
    call_s3 = fs.call_s3

    def counting(method, *args, **kwargs):
        pages.append(method)
        return call_s3(method, *args, **kwargs)

    monkeypatch.setattr(fs, "call_s3", counting)
    chunks = listing._list_files(f"{bucket}/cam", fs, path, (".png",))
    first = next(chunks)
    assert first.num_rows == 40 and pages == ["list_objects_v2"]
    rest = list(chunks)
    assert pages == ["list_objects_v2", "list_objects_v2"]
    ids = [i for chunk in [first, *rest] for i in chunk["image_id"].to_pylist()]
    assert sorted(ids) == [f"img-{i:05d}.png" for i in range(150)]


def test_sorted_listing_of_an_empty_folder_is_an_empty_input_error(tmp_path):
    from headclip.errors import EmptyInputError

    (tmp_path / "empty").mkdir()
    with pytest.raises(EmptyInputError):
        list(sorted_listing(str(tmp_path / "empty"), str(tmp_path)))


def test_an_s3_prefix_of_more_than_one_page_lists_every_key_in_order(s3_bucket):
    """S3 returns at most 1,000 keys a page: 1,010 keys need two pages. Catches a listing that stops
    after the first page, or one in the store's page order instead of sorted."""
    import fsspec

    bucket, options = s3_bucket
    fs = fsspec.filesystem("s3", **options)
    names = [f"day/cam-{i % 3}/img-{(i * 7919) % 1010:05d}.png" for i in range(1010)]
    fs.pipe({f"{bucket[5:]}/{name}": b"x" for name in names})
    table = list_images(f"{bucket}/day/", storage_options=options)
    assert table.num_rows == 1010
    assert table["image_uri"].to_pylist() == sorted(f"{bucket}/{name}" for name in names)
    assert table["image_id"].to_pylist() == [u[len(bucket) + len("/day/"):] for u in table["image_uri"].to_pylist()]
