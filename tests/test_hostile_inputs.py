"""Hostile input to the scoring job: clashing or malformed manifests, odd names and files, bad flags.

Input never overwrites what the job computes, listed paths are literal,
unusable rows are error rows, printed errors hold no secret, and every
refusal is one line before any work.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from headclip import results
from headclip.data.listing import list_images
from headclip.errors import InputError
from headclip.scoring.runner import prepare
from headclip.scoring.scorer import ScoringOptions, ImageScorer
from headclip.storage.layout import run_uri

from .scoring_helpers import job, run_job, write_images

REPO = Path(__file__).resolve().parents[1]
SECRETS = ("AKIAHOSTILE0001", "s3cr3t-Hostile-Value", "tok-Hostile-9")


def _cli(module: str, *args, timeout: float = 180):
    return subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout)


# -- 1. credentials in printed errors (the rest: test_hostile_secrets.py) ---------------------------


def test_printed_errors_hold_no_credentials(tmp_path):
    result = _cli("jobs.score", "--input", f"https://user:{SECRETS[1]}@127.0.0.1:9/images/",
                  "--output", str(tmp_path / "o"))
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert SECRETS[1] not in result.stderr and "***@127.0.0.1" in result.stderr


# -- 2. manifest columns named like output columns ----------------------------------------------


def test_manifest_columns_that_clash_with_output_are_refused(tiny_checkpoint, tmp_path):
    from jobs import score as score_job
    from jobs.cli import UsageError

    paths = write_images(tmp_path / "images", 2)
    manifest = tmp_path / "m.csv"
    manifest.write_text("image_uri,score,status,is_anomalous,station\n"
                        f"images/{paths[0].name},0.999,ok,true,A\nimages/{paths[1].name},0.1,ok,false,B\n")
    with pytest.raises(UsageError) as caught:
        score_job.main(["--input", str(manifest), "--output", str(tmp_path / "out"), "--checkpoint", tiny_checkpoint])
    assert "score, status, is_anomalous" in str(caught.value) and "computed by the job" in str(caught.value)
    assert not (tmp_path / "out").exists()
    # a table handed to the planner directly (evaluate, audit) is checked the same way
    table = pa.table({"image_id": ["a"], "image_uri": [str(paths[0])], "error": ["manifest's own"]})
    with pytest.raises(InputError, match="error is computed by the job"):
        prepare(job(str(tmp_path / "images"), str(tmp_path / "out2"), tiny_checkpoint), table)


# -- 3. '::' in names ----------------------------------------------------------------------------


def test_double_colon_names_are_literal_local(ray_cluster, tiny_checkpoint, tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    Image.new("RGB", (40, 24), (10, 200, 30)).save(folder / "evil::x.png")
    Image.new("RGB", (20, 30), (200, 10, 30)).save(folder / "evil", format="PNG")  # what URL chaining reads
    plan, summary = run_job(job(str(folder), str(tmp_path / "out"), tiny_checkpoint))
    frame = results.read_run(run_uri(str(tmp_path / "out"), plan.run_id)).set_index("image_id")
    assert list(frame.index) == ["evil::x.png"]
    row = frame.loc["evil::x.png"]
    assert row["status"] == "ok", row["error"]
    assert (row["width"], row["height"]) == (40, 24)


def test_double_colon_keys_are_literal_on_s3(ray_cluster, tiny_checkpoint, s3_bucket, tmp_path):
    import fsspec

    bucket, options = s3_bucket
    paths = write_images(tmp_path / "images", 3)
    fs = fsspec.filesystem("s3", **options)
    for i, path in enumerate(paths):
        fs.pipe(f"{bucket[5:]}/day/{'odd::' if i == 1 else ''}{path.name}", path.read_bytes())
    plan, summary = run_job(job(f"{bucket}/day/", str(tmp_path / "out"), tiny_checkpoint, storage_options=options))
    frame = results.read_run(run_uri(str(tmp_path / "out"), plan.run_id))
    assert summary.images == 3 and summary.errors == 0, frame[["image_id", "error"]]
    assert f"odd::{paths[1].name}" in set(frame["image_id"])


# -- 4. resuming a run with other settings -------------------------------------------------------


def test_resuming_a_run_id_with_other_settings_is_refused(tiny_checkpoint, tmp_path):
    import headclip

    write_images(tmp_path / "images", 3)
    other = str(tmp_path / "other.safetensors")
    headclip.save_checkpoint(headclip.create_model(backbone="HeadCLIP-Tiny", pretrained=None, image_size=64,
                                                   init_seed=3), other)
    base = dict(run_id="fixed-run", scoring=ScoringOptions(threshold=0.5))
    plan = prepare(job(str(tmp_path / "images"), str(tmp_path / "out"), tiny_checkpoint, **base))
    with pytest.raises(InputError) as caught:
        prepare(job(str(tmp_path / "images"), str(tmp_path / "out"), other, **base))
    assert "run fixed-run was planned with other settings" in str(caught.value) and "checkpoint" in str(caught.value)
    with pytest.raises(InputError) as caught:
        prepare(job(str(tmp_path / "images"), str(tmp_path / "out"), tiny_checkpoint, run_id="fixed-run",
                    scoring=ScoringOptions(threshold=0.99)))
    assert "threshold 0.5 -> 0.99" in str(caught.value) and "checkpoint" not in str(caught.value)
    # the same settings resume, also when the input is spelled with a trailing '/'
    again = prepare(job(str(tmp_path / "images") + "/", str(tmp_path / "out"), tiny_checkpoint, **base))
    assert again.resumed and again.run_id == plan.run_id


# -- 10. changed files and missing ids -----------------------------------------------------------


def test_null_image_ids_in_a_parquet_manifest_fall_back_to_the_uri(tmp_path):
    paths = write_images(tmp_path / "images", 3)
    manifest = tmp_path / "m.parquet"
    pq.write_table(pa.table({"image_uri": [str(p) for p in paths], "image_id": ["first", None, ""]}), manifest)
    table = list_images(str(manifest))
    ids = dict(zip(table["image_uri"].to_pylist(), table["image_id"].to_pylist()))
    assert ids == {str(paths[0]): "first", str(paths[1]): str(paths[1]), str(paths[2]): str(paths[2])}


def test_a_replaced_file_makes_a_new_run(tiny_checkpoint, tmp_path):
    paths = write_images(tmp_path / "images", 3)
    first = prepare(job(str(tmp_path / "images"), str(tmp_path / "out"), tiny_checkpoint))
    assert prepare(job(str(tmp_path / "images"), str(tmp_path / "out"), tiny_checkpoint)).run_id == first.run_id
    Image.new("RGB", (33, 21), (1, 2, 3)).save(paths[1])  # same name, new content
    replaced = prepare(job(str(tmp_path / "images"), str(tmp_path / "out"), tiny_checkpoint))
    assert replaced.run_id != first.run_id and not replaced.resumed
    # the version is kept in the plan, not in the output
    assert "source_version" in replaced.schema.names
    assert "source_version" not in [f.name for f in replaced.extra_fields]


def test_s3_listings_keep_each_object_etag(s3_bucket, tmp_path):
    import fsspec

    bucket, options = s3_bucket
    paths = write_images(tmp_path / "images", 2)
    fs = fsspec.filesystem("s3", **options)
    for path in paths:
        fs.pipe(f"{bucket[5:]}/day/{path.name}", path.read_bytes())
    before = dict(zip(*list_images(f"{bucket}/day/", storage_options=options)
                      .select(["image_id", "source_version"]).to_pydict().values()))
    assert all(v.startswith("etag:") for v in before.values()), before
    fs.pipe(f"{bucket[5:]}/day/{paths[0].name}", paths[1].read_bytes())  # replaced under the same key
    after = dict(zip(*list_images(f"{bucket}/day/", storage_options=options)
                     .select(["image_id", "source_version"]).to_pydict().values()))
    assert after[paths[0].name] != before[paths[0].name] and after[paths[1].name] == before[paths[1].name]


# -- 11. FIFOs and reads that never end ----------------------------------------------------------


def _run_bounded(target, seconds: float):
    """Run ``target`` on a thread; (finished, result or exception)."""
    box = {}

    def body():
        try:
            box["value"] = target()
        except BaseException as err:  # noqa: BLE001 - reported to the test
            box["value"] = err

    thread = threading.Thread(target=body, daemon=True)
    thread.start()
    thread.join(seconds)
    return not thread.is_alive(), box.get("value")


def _score_bounded(scorer, records: pa.Table, seconds: float, hang: str) -> list[dict]:
    """The rows of ``scorer.score_table(records)``; fails with ``hang`` if it takes over ``seconds``."""
    finished, out = _run_bounded(lambda: scorer.score_table(records), seconds)
    assert finished, hang
    assert not isinstance(out, BaseException), out
    return out.to_pylist()


def _release_fifo(path: Path) -> None:
    """Unblock a reader stuck opening a FIFO (if any)."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK)
        os.close(fd)
    except OSError:
        pass


def test_fifos_are_not_listed_and_never_read(tiny_checkpoint, tmp_path, caplog):
    folder = tmp_path / "images"
    write_images(folder, 2)
    os.mkfifo(folder / "x.png")
    try:
        table = list_images(str(folder))
        assert sorted(table["image_id"].to_pylist()) == ["img0000.jpg", "img0001.png"]
        assert "not regular files" in caplog.text
        # a FIFO named by a manifest becomes an error row instead of a hang
        records = pa.table({"image_id": ["fifo", "ok"],
                            "image_uri": [str(folder / "x.png"), str(folder / "img0001.png")]})
        scorer = ImageScorer("r", tiny_checkpoint, ScoringOptions(batch_size=2, io_threads=2))
        rows = _score_bounded(scorer, records, 60, "reading a FIFO hung")
        assert rows[0]["status"] == "error" and "not a regular file" in rows[0]["error"]
        assert rows[1]["status"] == "ok"
    finally:
        _release_fifo(folder / "x.png")


def test_a_read_that_never_answers_times_out(tiny_checkpoint, tmp_path):
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    port = server.getsockname()[1]
    accepted = []
    stop = threading.Event()

    def accept():  # accept connections and never answer
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                accepted.append(server.accept()[0])
            except OSError:
                continue

    threading.Thread(target=accept, daemon=True).start()
    paths = write_images(tmp_path / "images", 1)
    records = pa.table({"image_id": ["silent", "ok"],
                        "image_uri": [f"http://127.0.0.1:{port}/x.png", str(paths[0])]})
    scorer = ImageScorer("r", tiny_checkpoint, ScoringOptions(batch_size=2, io_threads=2, read_timeout=3))
    try:
        rows = _score_bounded(scorer, records, 90, "a read without an answer hung the shard")
        assert rows[0]["status"] == "error" and "read timed out after 3s" in rows[0]["error"]
        assert rows[1]["status"] == "ok"
    finally:
        stop.set()
        for conn in accepted:
            conn.close()
        server.close()


# -- 15. unusable rows and wrongly typed manifests -----------------------------------------------


def test_unusable_rows_become_error_rows(tiny_checkpoint, tmp_path, monkeypatch):
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    paths = write_images(tmp_path / "images", 1)
    uris = ["gs://bucket/a.png", "s3://hostile-no-credentials/a.png", "nope://x/a.png", str(paths[0])]
    records = pa.table({"image_id": [f"r{i}" for i in range(4)], "image_uri": uris})
    with ImageScorer("r", tiny_checkpoint, ScoringOptions(batch_size=2, io_threads=2)) as scorer:
        rows = scorer.score_table(records).to_pylist()
    assert [r["status"] for r in rows] == ["error", "error", "error", "ok"], [r["error"] for r in rows]
    assert "gcsfs" in rows[0]["error"]
    assert "credentials" in rows[1]["error"].lower()
    assert "nope" in rows[2]["error"]
    assert all("\n" not in r["error"] for r in rows[:3])


@pytest.mark.parametrize("columns,message", [
    ({"label": ["good", "bad"], "class_name": ["a", "a"]}, "label must be integers 0 or 1"),
    ({"label": [0, 2], "class_name": ["a", "a"]}, "label must be 0 or 1 on every row, found [2]"),
    ({"label": [0, None], "class_name": ["a", "a"]}, "label must be 0 or 1 on every row, found [None]"),
    ({"mask_rle": ["x", "y"]}, "mask_rle is computed by the job"),
    ({"class_name": [1, 2]}, "class_name must be strings"),
    ({"has_masks": ["yes", "no"]}, "has_masks must be booleans"),
])
def test_manifests_with_wrong_types_are_refused_up_front(tmp_path, columns, message):
    paths = write_images(tmp_path / "images", 2)
    manifest = tmp_path / "m.parquet"
    pq.write_table(pa.table({"image_uri": [str(p) for p in paths], **columns}), manifest)
    with pytest.raises(InputError, match=re.escape(message)):
        list_images(str(manifest))


# -- 18. bad flag values -------------------------------------------------------------------------


@pytest.mark.parametrize("args,message", [
    (["--cpus-per-actor", "-2"], "must be a number in [0.0001, 1e+06] CPUs, got -2"),
    (["--gpus-per-actor", "-1"], "must be a number in [0, 1e+09], got -1"),
    (["--cpus-per-actor", "nan"], "must be a number in [0.0001, 1e+06] CPUs, got nan"),
    (["--progress-interval", "0"], "must be a number in [0.001, 1e+07] seconds, got 0"),
])
def test_bad_flag_values_get_one_line(args, message, tmp_path):
    result = _cli("jobs.score", "--input", "s3://bucket/images/", "--output", str(tmp_path / "o"), *args)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], result.stderr[-2000:]


@pytest.mark.parametrize("options", ['{"client_kwargs": "x"}', '{"config_kwargs": {"retries": 5}}',
                                     '{"no_such_option": 1}'])
def test_storage_options_the_filesystem_cannot_take_are_refused_up_front(options, tmp_path):
    from jobs import score as score_job
    from jobs.cli import UsageError

    with pytest.raises(UsageError, match="--storage-options do not suit s3 storage: "):
        score_job.main(["--input", "s3://bucket/images/", "--output", str(tmp_path / "o"),
                        "--storage-options", options])
    assert not (tmp_path / "o").exists()


# -- 19. unknown flags, refused connections ------------------------------------------------------


@pytest.mark.parametrize("module,args,unknown", [
    ("jobs.score", ["--inptu", "x"], "--inptu"),
    ("jobs.score", ["--input", "x", "--output", "y", "--bogus", "1"], "--bogus 1"),
    ("jobs.audit", ["--date", "2026-01-01", "--histroy", "h"], "--histroy h"),
    ("jobs.show", ["--run", "r", "--toop", "3"], "--toop 3"),
])
def test_an_unknown_flag_is_named(module, args, unknown):
    result = _cli(module, *args)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and f"unrecognized arguments: {unknown}" in lines[0], result.stderr


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_a_refused_connection_is_not_reported_as_not_found(tmp_path, tiny_checkpoint):
    port = _closed_port()
    options = {"key": "k", "secret": "s", "client_kwargs": {"endpoint_url": f"http://127.0.0.1:{port}"},
               "config_kwargs": {"retries": {"max_attempts": 1}, "connect_timeout": 1}}
    for uri, storage_options in [("s3://bucket/day/", options), (f"http://127.0.0.1:{port}/manifest.csv", None),
                                 (f"http://127.0.0.1:{port}/images/x.png", None)]:
        with pytest.raises(InputError) as caught:
            list_images(uri, storage_options=storage_options)
        message = str(caught.value)
        assert "not found" not in message and "connection error" in message, message
    # an image whose server refuses the connection is an error row that says so
    records = pa.table({"image_id": ["a"], "image_uri": [f"http://127.0.0.1:{port}/a.png"]})
    with ImageScorer("r", tiny_checkpoint, ScoringOptions(batch_size=1, io_threads=1)) as scorer:
        row = scorer.score_table(records).to_pylist()[0]
    assert row["status"] == "error" and "connection error" in row["error"] and "not found" not in row["error"]
    # and the job says so before any work
    from jobs import score as score_job
    from jobs.cli import UsageError

    with pytest.raises(UsageError, match="cannot reach .*connection error"):
        score_job.main(["--input", f"http://127.0.0.1:{port}/manifest.csv", "--output", str(tmp_path / "o"),
                        "--checkpoint", tiny_checkpoint])
