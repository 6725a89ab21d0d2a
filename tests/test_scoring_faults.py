"""Bad input, dying actors and interrupted runs: nothing is lost, nothing doubled."""

from __future__ import annotations

import io
import os
import shutil
import signal
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path
from unittest import mock

import numpy as np
import pandas as pd
import pytest
from PIL import Image

import headclip
from headclip import results
from headclip.storage.layout import run_uri
from headclip.scoring.runner import execute, prepare
from headclip.scoring.scorer import ScoringOptions

from .scoring_helpers import jpeg_bytes, job, run_job, slow_checkpoint, write_images

REPO = Path(__file__).resolve().parents[1]


def _png(width: int, height: int, idat: bytes, bit_depth: int = 8) -> bytes:
    """A grayscale PNG written chunk by chunk: any header, any compressed data."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, bit_depth, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def _header_only_bomb(width: int, height: int) -> bytes:
    """A PNG of about 70 bytes whose header declares width x height: decoding it fails as truncated."""
    return _png(width, height, zlib.compress(b"\x00" * 64))


def _real_bomb() -> bytes:
    """A valid 1-bit 8000 x 8000 PNG of about 8 kB; decoded, 64 Mpx (192 MB as RGB)."""
    packer = zlib.compressobj(9)
    row = b"\x00" * (1 + 8000 // 8)
    return _png(8000, 8000, b"".join(packer.compress(row) for _ in range(8000)) + packer.flush(), bit_depth=1)


def test_bombs_are_refused_from_the_header_before_decoding():
    """An image declaring more pixels than max_pixels is refused before any pixel is decoded.

    With the decoder (``ImageFile.load``) replaced by one that fails, the bombs still get their
    "decompression bomb" error and their declared size, so the answer came from the header.
    Catches the limit checked after ``image.load()`` (the 70-byte bomb would then be reported
    as truncated, the real one decoded into 192 MB first).
    """
    from PIL import ImageFile

    from headclip.data.decode import decode_image
    from headclip.errors import ImageDecodeError

    header_only, real = _header_only_bomb(4000, 4000), _real_bomb()
    assert len(header_only) < 100 and len(real) < 10_000
    with mock.patch.object(ImageFile.ImageFile, "load", side_effect=AssertionError("pixels were decoded")):
        for data, side in ((header_only, 4000), (real, 8000)):
            with pytest.raises(ImageDecodeError, match=rf"^decompression bomb: {side}x{side} = {side * side} "
                                                       r"pixels exceeds the limit of 1000000$") as caught:
                decode_image(data, max_pixels=1_000_000)
            assert (caught.value.width, caught.value.height) == (side, side)
        # beyond PIL's own limit, Image.open refuses from the header too
        with pytest.raises(ImageDecodeError, match="^decompression bomb: Image size"):
            decode_image(_header_only_bomb(30000, 30000))
        # the replaced decoder is reached by an image within the limit
        small = io.BytesIO()
        Image.new("L", (8, 8)).save(small, format="PNG")
        with pytest.raises(ImageDecodeError, match="pixels were decoded"):
            decode_image(small.getvalue(), max_pixels=1_000_000)
    with pytest.raises(ImageDecodeError, match="^truncated image"):  # what decoding the 70 bytes gives
        decode_image(header_only, max_pixels=10**9)


def _zoo(folder: Path) -> dict[str, str]:
    """Write the bad-input zoo; returns file name -> expected status."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    base = Image.fromarray(rng.integers(0, 255, (40, 56, 3), dtype=np.uint8))
    (folder / "zero.png").write_bytes(b"")
    whole = jpeg_bytes(base)
    (folder / "truncated.jpg").write_bytes(whole[: len(whole) // 2])
    (folder / "random.png").write_bytes(rng.bytes(2048))
    (folder / "text.jpg").write_text("this is not an image\n")
    Image.new("RGB", (1, 1), (200, 10, 10)).save(folder / "one-pixel.png")
    Image.new("L", (3000, 1000)).save(folder / "bomb.png")  # 3 Mpx against a 1 Mpx limit
    (folder / "bomb-header.png").write_bytes(_header_only_bomb(4000, 4000))  # 70 bytes, 16 Mpx declared
    (folder / "bomb-real.png").write_bytes(_real_bomb())  # 8 kB, 64 Mpx when decoded
    Image.fromarray(rng.integers(0, 65535, (30, 50), dtype=np.uint16)).save(folder / "sixteen-bit.png")
    Image.new("CMYK", (32, 32), (10, 200, 30, 0)).save(folder / "cmyk.jpg")
    base.convert("P", palette=Image.Palette.ADAPTIVE).save(folder / "palette.png")
    base.convert("RGBA").save(folder / "rgba.png")
    # stored rotated, with EXIF orientation 6 ("rotate 90 CW to display"): 40 wide x 56 tall upright
    upright = base.transpose(Image.Transpose.ROTATE_90)
    stored = upright.transpose(Image.Transpose.ROTATE_90)
    exif = Image.Exif()
    exif[0x0112] = 6
    stored.save(folder / "exif-rotated.jpg", exif=exif.tobytes(), quality=95)
    (folder / "deleted.png").write_bytes((folder / "one-pixel.png").read_bytes())
    (folder / "read-error.png").write_bytes((folder / "one-pixel.png").read_bytes())
    expected = {name: "ok" for name in ("one-pixel.png", "sixteen-bit.png", "cmyk.jpg", "palette.png",
                                        "rgba.png", "exif-rotated.jpg")}
    expected.update({name: "error" for name in ("zero.png", "truncated.jpg", "random.png", "text.jpg",
                                                "bomb.png", "bomb-header.png", "bomb-real.png",
                                                "deleted.png", "read-error.png")})
    return expected


def test_bad_input_zoo_yields_one_row_each(ray_cluster, tiny_checkpoint, tmp_path):
    folder = tmp_path / "zoo"
    expected = _zoo(folder)
    config = job(str(folder), str(tmp_path / "out"), tiny_checkpoint,
                 scoring=ScoringOptions(batch_size=4, io_threads=4, max_pixels=1_000_000))
    plan = prepare(config)
    assert plan.num_images == len(expected)
    (folder / "deleted.png").unlink()  # between listing and reading
    (folder / "read-error.png").unlink()
    (folder / "read-error.png").mkdir()  # reading it fails
    summary = execute(plan, config)
    frame = results.read_run(run_uri(config.output, plan.run_id)).set_index("image_id")
    assert len(frame) == len(expected) and summary.images == len(expected)
    assert summary.errors == sum(1 for s in expected.values() if s == "error")
    for name, status in expected.items():
        row = frame.loc[name]
        assert row["status"] == status, (name, row["error"])
        if status == "error":
            assert isinstance(row["error"], str) and "\n" not in row["error"]
            assert pd.isna(row["score"]) and row["mask_rle"] is None
        else:
            assert pd.isna(row["error"]) and 0.0 <= row["score"] <= 1.0
    assert "empty file" in frame.loc["zero.png", "error"]
    assert "truncated" in frame.loc["truncated.jpg", "error"]
    assert "not a recognised image" in frame.loc["random.png", "error"]
    assert "decompression bomb" in frame.loc["bomb.png", "error"]
    assert (frame.loc["bomb.png", "width"], frame.loc["bomb.png", "height"]) == (3000, 1000)
    for name, side in (("bomb-header.png", 4000), ("bomb-real.png", 8000)):  # refused from the header
        assert frame.loc[name, "error"] == (f"decompression bomb: {side}x{side} = {side * side} pixels exceeds "
                                            "the limit of 1000000")
        assert (frame.loc[name, "width"], frame.loc[name, "height"]) == (side, side)
    assert "not found" in frame.loc["deleted.png", "error"]
    assert "read error" in frame.loc["read-error.png", "error"]
    assert (frame.loc["one-pixel.png", "width"], frame.loc["one-pixel.png", "height"]) == (1, 1)
    # EXIF-rotated images are scored upright
    rotated = frame.loc["exif-rotated.jpg"]
    assert (rotated["width"], rotated["height"]) == (40, 56)
    model = headclip.create_model(checkpoint=tiny_checkpoint)
    upright = Image.open(folder / "exif-rotated.jpg")
    from PIL import ImageOps

    upright = ImageOps.exif_transpose(upright)
    reference = model.score(headclip.preprocess([upright], model.image_size))
    assert abs(float(reference.joint_score[0]) - rotated["score"]) < 2e-5


def _score_command(input_dir, output_dir, checkpoint, ray_address):
    return [sys.executable, "-m", "jobs.score", "--input", str(input_dir), "--output", str(output_dir),
            "--checkpoint", checkpoint, "--shard-size", "2", "--batch-size", "2", "--actors", "1",
            "--ray-address", ray_address, "--progress-interval", "0.5"]


def _ray_job_of(driver_pid: int) -> str:
    """The Ray job id (hex) of the driver process ``driver_pid``."""
    from ray._private import state

    jobs = [job["JobID"] for job in state.jobs() if job["DriverPid"] == driver_pid]
    assert len(jobs) == 1, f"driver {driver_pid} has {len(jobs)} Ray jobs"
    return jobs[0]


def _process_gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().rsplit(")", 1)[1].split()[0] == "Z"  # a zombie has exited
    except FileNotFoundError:
        return True


def _wait_for_actors_gone(job_id: str, timeout: float) -> None:
    """Wait until every actor of Ray job ``job_id`` is DEAD and its worker process has exited; fail at the deadline."""
    from ray._private import state

    deadline = time.monotonic() + timeout
    while True:
        # Ray Data's detached service actors (stats, autoscaling, locations) outlive any driver: the job
        # that first used Ray Data in this Ray created them, and they are shared, not that job's work
        actors = [a for a in state.actors().values() if a["JobID"] == job_id and not a.get("IsDetached")]
        alive = [a["Name"] or a["ActorID"] for a in actors if a["State"] != "DEAD" or not _process_gone(a["Pid"])]
        if actors and not alive:
            return
        if time.monotonic() > deadline:
            pytest.fail(f"the killed driver's actors are still alive after {timeout} s: {alive or 'none found'}")
        time.sleep(0.1)


@pytest.mark.processes
def test_interrupted_run_resumes_with_same_rows(ray_cluster, tmp_path):
    checkpoint = slow_checkpoint(tmp_path)
    write_images(tmp_path / "images", 40)
    out = tmp_path / "out"
    process = subprocess.Popen(_score_command(tmp_path / "images", out, checkpoint, ray_cluster), cwd=REPO,
                               start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    try:
        while len(list(out.glob("run_id=*/shard-*.parquet"))) < 3:
            if process.poll() is not None:
                pytest.fail(f"the job ended (exit code {process.returncode}) before it could be interrupted")
            if time.monotonic() > deadline:
                pytest.fail("the job published fewer than 3 shards in 120 s; it could not be interrupted mid-run")
            time.sleep(0.02)
        driver_job = _ray_job_of(process.pid)
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    # Ray kills the dead driver's actors asynchronously: one may still publish a shard, so the
    # snapshot waits until every actor of that job is dead and its process has exited.
    _wait_for_actors_gone(driver_job, timeout=60)
    finished = {p: p.stat().st_mtime_ns for p in out.glob("run_id=*/shard-*.parquet")}
    assert 3 <= len(finished) < 20, len(finished)

    config = job(str(tmp_path / "images"), str(out), checkpoint, shard_size=2,
                 scoring=ScoringOptions(batch_size=2, io_threads=4))
    plan, summary = run_job(config)
    assert plan.resumed and summary.shards_skipped == len(finished)
    assert summary.shards_scored == 20 - len(finished)
    for path, stamp in finished.items():
        assert path.stat().st_mtime_ns == stamp, f"{path.name} was re-scored"
    resumed = results.read_run(run_uri(str(out), plan.run_id))

    reference_out = tmp_path / "uninterrupted"
    plan_ref, _ = run_job(job(str(tmp_path / "images"), str(reference_out), checkpoint, shard_size=2,
                              scoring=ScoringOptions(batch_size=2, io_threads=4)))
    assert plan_ref.run_id == plan.run_id
    reference = results.read_run(run_uri(str(reference_out), plan.run_id))
    assert len(resumed) == 40 and resumed["image_id"].is_unique
    columns = [c for c in reference.columns if c not in ("scored_at", "anomaly_map", "mask_rle", "bbox")]
    pd.testing.assert_frame_equal(resumed[columns], reference[columns], check_exact=False, atol=2e-5)
    def masks(frame):
        return [(list(r["size"]), r["counts"]) for r in frame["mask_rle"]]

    assert masks(resumed) == masks(reference)


def _cli(*args, cwd=REPO):
    return subprocess.run([sys.executable, "-m", "jobs.score", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=120)


def _cli_in_process(capsys, *args) -> tuple[int, str]:
    """jobs.score's entry point (jobs.cli.run) in this process: (exit code, stderr)."""
    from jobs.cli import run
    from jobs.score import main

    capsys.readouterr()
    with pytest.raises(SystemExit) as exited:
        run(main, "jobs.score", list(args))
    return exited.value.code, capsys.readouterr().err


@pytest.mark.parametrize("args,message", [
    (["--input", "x", "--output", "y", "--batch-size", "0"], "must be an integer in [1, 65536] images, got 0"),
    (["--input", "x"], "the following arguments are required: --output"),
    (["--input", "x", "--output", "y", "--threshold", "2"], "must be a number in [0, 1], got 2"),
    (["--input", "x", "--output", "y", "--storage-options", "{oops"], "not valid JSON"),
    (["--input", "x", "--output", "y", "--actor-resources", '{"accelerator": 0}'], "positive amounts"),
    (["--input", "x", "--output", "y", "--actor-resources", "[1]"], "positive amounts"),
    (["--input", "x", "--output", "y", "--engine", "core"], "--engine was removed: every job runs on Ray Data"),
    (["--input", "x", "--output", "y", "--cpu-stages", "tasks"], "--cpu-stages was removed: images are always read"),
    (["--input", "x", "--output", "y", "--engine"], "--engine was removed"),
])
def test_bad_flags_get_one_line(args, message):
    result = _cli(*args)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], result.stderr


def test_unusable_inputs_fail_before_any_work(tmp_path, tiny_checkpoint, capsys):
    (tmp_path / "empty").mkdir()
    cases = [
        (["--input", str(tmp_path / "empty"), "--output", str(tmp_path / "o")], "no images found"),
        (["--input", str(tmp_path / "missing"), "--output", str(tmp_path / "o")], "input not found"),
    ]
    write_images(tmp_path / "imgs", 1)
    cases.append((["--input", str(tmp_path / "imgs"), "--output", str(tmp_path / "o"),
                   "--checkpoint", str(tmp_path / "nope.safetensors")], "cannot read checkpoint"))
    (tmp_path / "afile").write_text("x")
    cases.append((["--input", str(tmp_path / "imgs"), "--output", str(tmp_path / "afile" / "o"),
                   "--checkpoint", tiny_checkpoint], "cannot use output"))
    # the last case through a real process (no Ray starts); the others through the same
    # entry point in this process, which is what that process runs
    *in_process, (last_args, last_message) = cases
    for args, message in in_process:
        code, stderr = _cli_in_process(capsys, *args)
        assert code == 2, stderr
        assert "Traceback" not in stderr
        assert message in stderr.strip().splitlines()[-1], stderr
    result = _cli(*last_args)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert last_message in result.stderr.strip().splitlines()[-1], result.stderr
    assert "Started a local Ray instance" not in result.stderr
    shutil.rmtree(tmp_path / "o", ignore_errors=True)


def test_a_pool_whose_maximum_is_below_its_minimum_is_one_line(capsys):
    code, stderr = _cli_in_process(capsys, "--input", "x", "--output", "y", "--min-actors", "3", "--max-actors", "2")
    assert code == 2 and stderr.strip().splitlines()[-1].endswith("--max-actors 2 is below --min-actors 3"), stderr
