"""Hostile input to the surfaces added since the first round: flag ranges, stored plans, literal paths,
secrets inside other libraries' messages, audit locks, templates, dates and day indexes.

Each case runs the job as a user would (``run(main, prog, argv)``: the exit code and the lines on
stderr) and expects one line and exit 2 before any work, or a listing that takes what it should.
"""

from __future__ import annotations

import argparse
import datetime as dt
import http.server
import importlib
import json
import logging
import os
import socket
import threading
import time
from functools import partial
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from headclip.storage.layout import audit_lock_uri, day_index_uri

from jobs.cli import Number, run

from .cli_helpers import job_in_process as _job, one_line_refusal as _one_line_refusal
from .scoring_helpers import write_images

JOBS = ("audit", "benchmark", "benchmark_host", "calibrate", "demo", "evaluate", "import_anomalyclip",
        "make_synthetic", "pretrain_demo_backbone", "report", "score", "show", "train")
DAY = "2026-11-23"




# -- numeric flags: one range check each, at parse time -----------------------------------------------


def _numeric_actions():
    from jobs.cli import layers_arg, resources_arg, storage_options_arg

    known = {storage_options_arg, resources_arg, layers_arg}
    for name in JOBS:
        module = importlib.import_module(f"jobs.{name}")
        known |= {getattr(module, f, None) for f in ("webhook_url", "exit_code", "iso_date")} - {None}
        for action in module.build_parser()._actions:
            if action.type is not None:
                yield name, action, known


def test_every_numeric_flag_of_every_job_is_range_checked():
    checked = 0
    for name, action, known in _numeric_actions():
        if action.type in known:
            continue
        flag = f"jobs.{name} {action.option_strings[0]}"
        assert isinstance(action.type, Number), f"{flag} takes {action.type!r}, not a range-checked Number"
        for hostile in ("1e308", "-1e308", "nan", "inf", "-1", "1e400", "99999999999999999999"):
            try:
                value = action.type(hostile)
            except argparse.ArgumentTypeError:
                continue
            assert action.type.low <= value <= action.type.high, f"{flag} took {hostile}"
            assert value == value and abs(value) < 1e12, f"{flag} took {hostile}"
        checked += 1
    assert checked > 60


@pytest.mark.parametrize("job, flags, named", [
    ("score", ["--progress-interval", "1e308"], "--progress-interval"),
    ("score", ["--read-timeout", "1e308"], "--read-timeout"),
    ("score", ["--placement-timeout", "nan"], "--placement-timeout"),
    ("audit", ["--baseline-days", "1000000"], "--baseline-days"),
    ("audit", ["--lookback-days", "99999999"], "--lookback-days"),
    ("calibrate", ["--target-fpr", "1e-300"], "--target-fpr"),
    ("calibrate", ["--pixel-bins", "100000000"], "--pixel-bins"),
    ("evaluate", ["--metric-bins", "100000000"], "--metric-bins"),
    ("score", ["--actor-resources", '{"x": Infinity}'], "--actor-resources"),
])
def test_a_numeric_flag_out_of_range_is_one_line_before_any_work(job, flags, named, tmp_path, capsys):
    base = {"score": ["--input", tmp_path, "--output", tmp_path / "o"],
            "audit": ["--input", tmp_path, "--history", tmp_path / "h"],
            "calibrate": ["--input", tmp_path, "--output", tmp_path / "t.json"],
            "evaluate": ["--data", tmp_path, "--output", tmp_path / "o"]}[job]
    code, _, err = _job(job, base + flags, capsys)
    _one_line_refusal(code, err, named)
    assert not (tmp_path / "o").exists() and not (tmp_path / "h").exists()


# -- a stored plan verifies itself -------------------------------------------------------------------


def _damage_plan(plan_dir: Path, how: str) -> str:
    piece = plan_dir / "images-00000.arrow"
    plan = plan_dir / "plan.json"
    if how.startswith("edited"):
        document = json.loads(plan.read_text())
        if how == "edited count":
            document["num_images"] -= 2
            document["num_shards"] = -(-document["num_images"] // document["shard_size"])
        else:
            document["listing_hash"] = "0" * 64
        plan.write_text(json.dumps(document, indent=2, sort_keys=True))
        return str(plan)
    if how == "deleted piece":
        piece.unlink()
        return str(piece)
    if how == "truncated piece":
        piece.write_bytes(piece.read_bytes()[:-100])
        return str(piece)
    plan.write_text(plan.read_text()[:200])  # truncated plan.json
    return str(plan)


@pytest.mark.parametrize("how, said", [("edited count", "changed after it was written"),
                                       ("edited listing hash", "changed after it was written"),
                                       ("deleted piece", "is missing"), ("truncated piece", "truncated"),
                                       ("truncated plan.json", "not valid JSON")])
def test_a_damaged_plan_is_refused_in_one_line_naming_it_and_the_way_out(how, said, tmp_path, capsys):
    write_images(tmp_path / "images", 7)
    argv = ["--input", tmp_path / "images", "--output", tmp_path / "out", "--shard-size", "2", "--run-id", "r1"]
    code, out, err = _job("score", argv + ["--plan-only"], capsys)
    assert code == 0 and "7 images in 4 shards" in out, err
    damaged = _damage_plan(tmp_path / "out" / "run_id=r1" / "_plan", how)
    for extra in (["--plan-only"], []):  # read back for --plan-only, and for a run: refused before Ray
        code, _, err = _job("score", argv + extra, capsys)
        _one_line_refusal(code, err, "plan is damaged", damaged, said, "--run-id", "run_id=r1")
    assert not list((tmp_path / "out" / "run_id=r1").glob("shard-*"))


def test_a_plan_piece_gone_mid_run_names_the_plan(tmp_path):
    from headclip.errors import PlanError
    from headclip.scoring.plan import read_plan, read_shard_images

    write_images(tmp_path / "images", 5)
    from jobs import score

    assert score.main(["--input", str(tmp_path / "images"), "--output", str(tmp_path / "out"), "--shard-size", "2",
                       "--run-id", "r", "--plan-only"]) == 0
    plan = read_plan(str(tmp_path / "out"), "r")
    assert read_shard_images(plan.shard_source(2)).num_rows == 1
    (tmp_path / "out" / "run_id=r" / "_plan" / "images-00000.arrow").unlink()
    with pytest.raises(PlanError, match="images-00000.arrow is missing; give a new --run-id"):
        read_shard_images(plan.shard_source(2))


# -- literal paths first; links, hidden files, the jobs' own folders ------------------------------------


def _planned(out: str) -> int:
    return int(out.split("images in")[0].split()[-1])


def test_an_existing_folder_named_like_a_glob_is_listed_as_itself(tmp_path, capsys):
    for name in ("in[1]", "a*b", "what?"):
        write_images(tmp_path / name, 3)
        code, out, err = _job("score", ["--input", tmp_path / name, "--output", tmp_path / "o", "--plan-only"], capsys)
        assert code == 0 and _planned(out) == 3, err[-2000:]
    write_images(tmp_path / "in1", 2)  # a path that does not exist is still a glob
    code, out, _ = _job("score", ["--input", f"{tmp_path}/in[0-9]/*", "--output", tmp_path / "o", "--plan-only"],
                        capsys)
    assert code == 0 and _planned(out) == 2


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


def test_a_presigned_manifest_url_is_read_not_globbed(tmp_path, capsys):
    paths = write_images(tmp_path / "images", 4)
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "manifest.csv").write_text("image_uri\n" + "".join(f"{p}\n" for p in paths))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), partial(_Quiet, directory=str(tmp_path / "site")))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    secret = "SigHostile0123456789abcdef"
    url = (f"http://127.0.0.1:{server.server_address[1]}/manifest.csv?X-Amz-Algorithm=AWS4-HMAC-SHA256"
           f"&X-Amz-Credential=AKIAHOSTILE%2F20261207%2Fus-east-1%2Fs3%2Faws4_request&X-Amz-Signature={secret}")
    try:
        code, out, err = _job("score", ["--input", url, "--output", tmp_path / "o", "--plan-only"], capsys)
    finally:
        server.shutdown()
    assert code == 0 and _planned(out) == 4, err[-2000:]
    assert secret not in out + err
    assert secret not in "".join(p.read_text() for p in (tmp_path / "o").rglob("plan.json"))


def test_links_hidden_files_and_the_jobs_own_folders(tmp_path, capsys, caplog):
    paths = write_images(tmp_path / "data", 3)
    os.symlink(paths[0], tmp_path / "data" / "linked.png")  # a valid link is an image
    os.symlink(tmp_path / "nowhere.png", tmp_path / "data" / "broken.png")  # a broken one is skipped
    write_images(tmp_path / "data" / "_overlays", 2)  # what jobs.show writes into an output folder
    write_images(tmp_path / "data" / ".cache", 1)
    (tmp_path / "data" / ".hidden.png").write_bytes(paths[1].read_bytes())
    with caplog.at_level(logging.INFO, logger="headclip.data.listing"):
        code, out, err = _job("score", ["--input", tmp_path / "data", "--output", tmp_path / "o", "--plan-only",
                                        "--run-id", "links"], capsys)
    assert code == 0 and _planned(out) == 4, err[-2000:]
    table = pa.ipc.open_file(str(tmp_path / "o" / "run_id=links" / "_plan" / "images-00000.arrow")).read_all()
    assert sorted(table["image_id"].to_pylist()) == sorted([p.name for p in paths] + ["linked.png"])
    logged = caplog.text
    assert "skipped 4 hidden files" in logged and "skipped 1 entries that are not regular files" in logged


# -- secrets inside other libraries' messages -----------------------------------------------------------


def test_botocore_repeating_the_credentials_of_an_s3_uri_prints_none(tmp_path, capsys):
    key, secret = "AKIAHOSTILE0002", "s3cr3t-Hostile-Two"
    code, out, err = _job("score", ["--input", f"s3://{key}:{secret}@bucket/day/", "--output", tmp_path / "o",
                                    "--storage-options", '{"client_kwargs": {"endpoint_url": "http://127.0.0.1:9"}}'],
                          capsys)
    assert code == 2 and "Invalid bucket name" in err, err[-2000:]  # botocore's own message, repeated
    assert key not in out + err and secret not in out + err


def test_a_remembered_secret_is_hidden_in_any_message_and_log_line():
    from headclip.redact import RedactingFilter, redact_text, remember_secrets

    remember_secrets(["--input", "https://u:pa%2Fss-Hostile@host/x?token=tok-Hostile-3&v=1",
                      "--storage-options", '{"secret": "opt-Hostile-4"}'])
    text = redact_text("bucket u:pa/ss-Hostile@host; token tok-Hostile-3; 'opt-Hostile-4'; K:V-Hostile@bkt v=1")
    for word in ("pa/ss-Hostile", "tok-Hostile-3", "opt-Hostile-4", "V-Hostile"):
        assert word not in text
    assert "v=1" in text
    record = logging.LogRecord("x", logging.ERROR, __file__, 1, "failed: %s", ("tok-Hostile-3",), None)
    assert RedactingFilter().filter(record) and record.getMessage() == "failed: ***"


# -- audits: locks, templates, dates, day indexes --------------------------------------------------------


def _audit(tmp_path, *extra) -> list:
    return ["--input", tmp_path / "missing", "--allow-missing-day", "--history", tmp_path / "h", *extra]


@pytest.mark.parametrize("started", ["yesterday", None, 1e20, float("nan"), True])
def test_a_damaged_audit_lock_is_taken_over_with_a_warning(started, tmp_path, capsys, caplog):
    lock = Path(audit_lock_uri(str(tmp_path / "h"), dt.date.fromisoformat(DAY)))
    lock.parent.mkdir(parents=True)
    lock.write_text(json.dumps({"pid": "x", "host": socket.gethostname(), "started": started, "token": "t"}))
    code, out, err = _job("audit", _audit(tmp_path, "--date", DAY), capsys)
    assert code == 0 and f"AUDIT OK {DAY}" in out, err[-2000:]
    assert "taking over a stale audit lock" in caplog.text and not lock.exists()


@pytest.mark.parametrize("template, found", [("{line}/date={date}/", "{line}"), ("x/{0}/{date}", "{0}"),
                                             ("x/{/{date}", "'{'"), ("x/{date}/}", "'}'")])
def test_a_prefix_template_with_other_braces_is_one_line(template, found, tmp_path, capsys):
    code, _, err = _job("audit", ["--date", DAY, "--prefix-template", f"{tmp_path}/{template}", "--history",
                                  tmp_path / "h"], capsys)
    _one_line_refusal(code, err, "--prefix-template", found)


def test_a_day_that_does_not_exist_is_named_as_such(tmp_path, capsys):
    code, _, err = _job("audit", _audit(tmp_path, "--date", "2026-02-30"), capsys)
    _one_line_refusal(code, err, "2026-02-30 is not a day of the calendar")
    code, _, err = _job("audit", _audit(tmp_path, "--date", "yesterday"), capsys)
    _one_line_refusal(code, err, "must be YYYY-MM-DD")


def test_windows_reaching_before_year_one_do_not_overflow(tmp_path, capsys):
    code, out, err = _job("audit", _audit(tmp_path, "--date", "0001-01-03", "--baseline-days", "3660",
                                          "--lookback-days", "3660"), capsys)
    assert code == 0 and "AUDIT OK 0001-01-03" in out, err[-2000:]


def test_a_day_index_with_a_wrong_column_type_is_built_again(tmp_path, caplog):
    from headclip.storage.history import scored_images_for

    index = Path(day_index_uri(str(tmp_path / "h"), dt.date.fromisoformat(DAY)))
    index.parent.mkdir(parents=True)
    wrong = pa.table({"image_uri": [1, 2], "status": ["ok", "ok"], "source_version": ["a", "b"],
                      "scored_at": pa.array([0, 0], pa.timestamp("us", tz="UTC"))})
    with pa.OSFile(str(index), "wb") as sink, pa.ipc.new_file(sink, wrong.schema) as writer:
        writer.write_table(wrong)
    with caplog.at_level(logging.WARNING):
        found = scored_images_for(str(tmp_path / "h"), ["s3://b/x.png"], [dt.date.fromisoformat(DAY)])
    assert found == {} and "wrong type" in caplog.text
    assert pa.ipc.open_file(str(index)).schema.field("image_uri").type == pa.string()


def test_a_long_lookback_reads_only_the_days_the_history_holds(tmp_path):
    from headclip.storage.history import build_day_index
    from jobs.audit import build_parser, lookup_days

    history = tmp_path / "h"
    day = dt.date.fromisoformat(DAY)
    for back in (1, 400, 5000):
        build_day_index(str(history), day - dt.timedelta(days=back),
                        pa.table({"image_uri": ["u"], "status": ["ok"], "source_version": [None],
                                  "scored_at": pa.array([0], pa.timestamp("us", tz="UTC"))}))
    args = build_parser().parse_args(["--input", "x", "--history", str(history), "--lookback-days", "3660"])
    assert lookup_days(args, day) == [day - dt.timedelta(days=400), day - dt.timedelta(days=1), day]
    assert len(list(Path(day_index_uri(str(history), day)).parent.iterdir())) == 3  # none for an empty day


def test_layer_lists_are_range_checked():
    """--layers (jobs.reference, jobs.calibrate) takes block numbers 1 to 1000. Catches: a huge or negative
    block number taken as it is (an index error or a silent empty selection later)."""
    from jobs.cli import layers_arg

    assert layers_arg("3, 6,9") == (3, 6, 9)
    for hostile in ("0", "-1", "99999999999999999999", "1e3", "", "a,b"):
        with pytest.raises(argparse.ArgumentTypeError):
            layers_arg(hostile)
