"""jobs.calibrate end to end on a local Ray: generated good images of two lines, thresholds fitted
on one half, false alarms counted on the other; the thresholds applied by jobs.score, jobs.audit
and jobs.evaluate, and refused with another checkpoint."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import headclip
from headclip import results
from headclip.data.synthetic import make_sample
from headclip.evaluation import calibration as cal
from headclip.evaluation.metrics import score_bins
from headclip.evaluation.thresholds import read_thresholds
from jobs import audit as audit_job
from jobs import calibrate as calibrate_job
from jobs import cli
from jobs import evaluate as evaluate_job
from jobs import report as report_job
from jobs import score as score_job

LINES = ("wood", "tiles")  # the test model scores these two surfaces differently
GOOD, DEFECTS, SIZE, TARGET, PIXEL_TARGET, BINS = 40, 4, 48, 0.1, 0.01, 2000


def _write(folder: Path, name: str, array: np.ndarray) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(folder / name)
    return folder / name


@pytest.fixture(scope="module")
def calibrated(ray_cluster, tiny_checkpoint, tmp_path_factory):
    """Half of each line's good images (and a few defects) calibrated, the other half scored with
    the thresholds. Returns a dict of paths, the thresholds and the printed output."""
    root = tmp_path_factory.mktemp("calibrate")
    rng = np.random.default_rng(0)
    halves = {"A": ["image_uri,line,label,mask_uri"], "B": ["image_uri,line"]}
    good_uris = {}
    for line_index, line in enumerate(LINES):
        order = rng.permutation(GOOD)
        for i in range(GOOD):
            sample = make_sample(1000 * line_index + i, SIZE, texture_kind=line, defect=None)
            path = _write(root / "images" / line, f"good-{i:03d}.png", sample.image)
            half = "A" if i in set(order[: GOOD // 2]) else "B"
            halves[half].append(f"images/{line}/{path.name},{line}" + (",0," if half == "A" else ""))
            good_uris.setdefault((line, half), []).append(str(path))
        for i in range(DEFECTS):
            sample = make_sample(5000 + 1000 * line_index + i, SIZE, texture_kind=line, defect="spot")
            path = _write(root / "images" / line, f"defect-{i:03d}.png", sample.image)
            _write(root / "masks" / line, f"defect-{i:03d}.png", (sample.mask * 255).astype(np.uint8))
            halves["A"].append(f"images/{line}/{path.name},{line},1,masks/{line}/{path.name}")
    for half, lines in halves.items():
        (root / f"{half}.csv").write_text("\n".join(lines) + "\n")
    out = io.StringIO()
    argv = ["--input", str(root / "A.csv"), "--checkpoint", tiny_checkpoint, "--output", str(root / "t.json"),
            "--group-column", "line", "--label-column", "label", "--target-fpr", str(TARGET),
            "--target-pixel-fpr", str(PIXEL_TARGET), "--pixel-bins", str(BINS), "--shard-size", "16",
            "--batch-size", "8", "--storage-options", '{"auto_mkdir": true}']
    with contextlib.redirect_stdout(out):
        assert calibrate_job.main(argv) == 0
        assert score_job.main(["--input", str(root / "B.csv"), "--checkpoint", tiny_checkpoint, "--output",
                               str(root / "scores"), "--thresholds", str(root / "t.json"), "--shard-size", "16"]) == 0
    calibration_rows = [results.read_run(str(run)) for run in sorted((root / "t-rows").glob("run_id=*"))]
    scored = results.read_run(str(next((root / "scores").glob("run_id=*"))))
    return {"root": root, "thresholds": read_thresholds(str(root / "t.json")), "printed": out.getvalue(),
            "calibration": calibration_rows, "scored": scored, "good_uris": good_uris}


def _calibration_good(calibrated):
    rows = [r for r in calibrated["calibration"] if (r["label"] == 0).all()]
    assert len(rows) == 1
    return rows[0]


def test_thresholds_are_each_lines_order_statistic(calibrated):
    thresholds = calibrated["thresholds"]
    good = _calibration_good(calibrated)
    assert thresholds.group_column == "line" and sorted(thresholds.groups) == sorted(LINES)
    n = GOOD // 2
    rank = cal.quantile_rank(n, TARGET)
    for line in LINES:
        scores = np.sort(good[good["line"] == line]["score"].to_numpy(np.float64))
        group = thresholds.groups[line]
        assert len(scores) == group.good_images == n and group.rank == rank == 19
        assert group.threshold == scores[rank - 1]
        assert group.calibration_fpr == pytest.approx(np.mean(scores > group.threshold)) == pytest.approx(1 / n)
        assert group.fpr_interval == pytest.approx(cal.fpr_interval(n, rank, 0.95))
    pooled = np.sort(good["score"].to_numpy(np.float64))
    assert thresholds.default.threshold == pooled[cal.quantile_rank(2 * n, TARGET) - 1]
    wood, tiles = (thresholds.groups[line].threshold for line in LINES)
    assert wood != tiles
    # the two lines really score differently: one line's threshold misfires on the other
    other = good[good["line"] == "tiles"]["score"].to_numpy()
    assert abs(np.mean(other > wood) - np.mean(other > tiles)) > 0.2


def test_mask_thresholds_match_the_in_process_maps(calibrated, tiny_checkpoint):
    """The merged actor histograms give the mask threshold that the model's own maps give."""
    model = headclip.create_model(checkpoint=tiny_checkpoint)
    for line in LINES:
        images = [Image.open(uri).convert("RGB") for uri in calibrated["good_uris"][(line, "A")]]
        maps = model.score(headclip.preprocess(images, model.image_size)).anomaly_map.numpy()
        hist = np.bincount(score_bins(maps, BINS).ravel(), minlength=BINS)
        expected, _ = cal.pixel_threshold(hist, PIXEL_TARGET)
        group = calibrated["thresholds"].groups[line]
        assert abs(group.mask_threshold - expected) <= 1.0 / BINS  # batching may move a pixel by one bin
        assert group.normal_pixels == hist.sum() and group.calibration_pixel_fpr <= PIXEL_TARGET


def test_held_out_half_false_alarms_inside_the_stated_interval(calibrated):
    thresholds, scored = calibrated["thresholds"], calibrated["scored"]
    assert (scored["status"] == "ok").all() and len(scored) == GOOD
    for line in LINES:
        rows, group = scored[scored["line"] == line], thresholds.groups[line]
        assert (rows["threshold"] == np.float32(group.threshold)).all()
        assert (rows["mask_threshold"] == np.float32(group.mask_threshold)).all()
        assert (rows["is_anomalous"] == (rows["score"].astype(np.float64) > group.threshold)).all()
        low, high = cal.held_out_interval(group.good_images, group.rank, len(rows), thresholds.confidence)
        assert low <= int(rows["is_anomalous"].sum()) <= high


def test_halves_over_seeds(calibrated):
    """Every good image's score from the two runs, re-split at random 40 times per line: the false
    alarms of a half stay inside the interval fitted on the other half about as often as stated."""
    good = _calibration_good(calibrated)
    scored = calibrated["scored"]
    for line in LINES:
        scores = np.concatenate([good[good["line"] == line]["score"], scored[scored["line"] == line]["score"]])
        assert len(scores) == GOOD
        inside, rates = [], []
        for seed in range(40):
            order = np.random.default_rng(seed).permutation(GOOD)
            fit_half, held = scores[order[: GOOD // 2]], scores[order[GOOD // 2:]]
            fit = cal.fit_group(fit_half, np.r_[1, np.zeros(9, np.int64)], TARGET, PIXEL_TARGET)
            alarms = int((held > fit.threshold).sum())
            low, high = cal.held_out_interval(fit.good_images, fit.rank, len(held), 0.95)
            inside.append(low <= alarms <= high)
            rates.append(alarms / len(held))
        assert np.mean(inside) >= 0.85, (line, np.mean(inside))
        assert np.mean(rates) <= TARGET + 0.05, (line, np.mean(rates))


def test_defects_warnings_and_recorded_command(calibrated):
    thresholds, printed = calibrated["thresholds"], calibrated["printed"]
    defects = [r for r in calibrated["calibration"] if (r["label"] == 1).all()][0]
    for line in LINES:
        group = thresholds.groups[line]
        found = defects[defects["line"] == line]
        assert group.defects["images"] == DEFECTS
        assert group.defects["detected"] == int((found["score"].astype(np.float64) > group.threshold).sum())
        assert group.defects["pixel_detection_rate"] is not None  # the manifest gave masks
        # 20 good images are too few to show a 10% rate at 95% confidence (29 are needed)
        assert any("needs 29" in w for w in group.warnings)
        assert f"WARNING: {line}: 20 good images cannot show a false-alarm rate below 0.1" in printed
    text = (calibrated["root"] / "t.json").read_text()
    assert "--storage-options '{\"auto_mkdir\": true}'" in thresholds.command  # no secret in it: kept readable
    assert thresholds.command.startswith("python -m jobs.calibrate --input")
    assert thresholds.checkpoint_id == calibrated["scored"]["checkpoint_id"].iloc[0]


def test_report_shows_the_thresholds(calibrated, tmp_path):
    run_dir = next((calibrated["root"] / "scores").glob("run_id=*"))
    with contextlib.redirect_stdout(io.StringIO()):
        assert report_job.main(["--run", str(run_dir), "--output", str(tmp_path / "r.html"), "--top-n", "1"]) == 0
    page = (tmp_path / "r.html").read_text().replace("\u00a0", " ")  # no-break spaces inside each pair
    wood = calibrated["thresholds"].groups["wood"]
    # jobs.report finds the run's group column in its config and reports each line by name
    assert "2 groups by line (image score / mask pixels)" in page
    assert f"wood &gt; {np.float32(wood.threshold):.4g} / &gt; {np.float32(wood.mask_threshold):.4g}" in page
    assert "<tr data-group='wood'>" in page and "<svg class='histogram'" in page and "data-group='wood'" in page


@pytest.fixture()
def other_checkpoint(tmp_path):
    model = headclip.create_model(backbone="HeadCLIP-Tiny", pretrained=None, image_size=64)
    with torch.no_grad():
        next(iter(model.learnable_parameters().values())).add_(0.01)
    path = tmp_path / "other.safetensors"
    headclip.save_checkpoint(model, str(path))
    return str(path)


def _exit(main, prog, argv, capsys) -> tuple[int, str]:
    with pytest.raises(SystemExit) as info:
        cli.run(main, prog, argv)
    return info.value.code, capsys.readouterr().err


def test_another_checkpoint_is_refused_before_ray(calibrated, other_checkpoint, tmp_path, capsys, monkeypatch):
    """jobs.score, jobs.audit and jobs.evaluate: one line, exit 2, no Ray, nothing written."""
    root = calibrated["root"]
    for module in (score_job, audit_job, evaluate_job):
        monkeypatch.setattr(module, "init_ray", lambda *a: pytest.fail("Ray started"))
    cases = [
        (score_job.main, ["--input", str(root / "B.csv"), "--output", str(tmp_path / "o"),
                          "--checkpoint", other_checkpoint, "--thresholds", str(root / "t.json")]),
        (audit_job.main, ["--input", str(root / "images" / "wood"), "--date", "2026-11-23", "--history",
                          str(tmp_path / "h"), "--checkpoint", other_checkpoint, "--thresholds", str(root / "t.json")]),
        (evaluate_job.main, ["--data", str(tmp_path / "labelled.csv"), "--output", str(tmp_path / "e"),
                             "--thresholds", str(root / "t.json")]),  # the demo model, not the calibrated one
    ]
    (tmp_path / "labelled.csv").write_text(f"image_uri,label,class_name\n{root}/images/wood/good-000.png,0,wood\n")
    for main, argv in cases:
        code, err = _exit(main, "jobs.x", argv, capsys)
        assert code == 2 and len(err.strip().splitlines()) == 1 and "calibrated with checkpoint" in err, err
    code, err = _exit(audit_job.main, "jobs.audit", cases[1][1][:-4] + ["--checkpoint", other_checkpoint,
                                                                         "--thresholds", "nope.json"], capsys)
    assert code == 2 and "thresholds file not found: nope.json" in err
    assert not any((tmp_path / name).exists() for name in ("o", "h", "e"))


def test_audit_uses_a_lines_thresholds(calibrated, tiny_checkpoint, tmp_path, capsys):
    root = calibrated["root"]
    day = tmp_path / "day"
    for uri in calibrated["good_uris"][("tiles", "B")][:6]:
        _write(day, Path(uri).name, np.asarray(Image.open(uri)))
    argv = ["--input", str(day), "--date", "2026-11-23", "--history", str(tmp_path / "h"), "--checkpoint",
            tiny_checkpoint, "--thresholds", str(root / "t.json"), "--threshold-group", "tiles", "--shard-size", "8"]
    code, err = _exit(audit_job.main, "jobs.audit", argv + ["--threshold", "0.5"], capsys)
    assert code == 2 and "give --threshold or --thresholds, not both" in err
    code, err = _exit(audit_job.main, "jobs.audit", argv[:-3] + ["nope", "--shard-size", "8"], capsys)
    assert code == 2 and "--threshold-group 'nope' is not in" in err
    assert audit_job.main(argv) == 0
    tiles = calibrated["thresholds"].groups["tiles"]
    rows = results.read_run(str(next((tmp_path / "h" / "scores" / "date=2026-11-23").glob("run_id=*"))))
    assert len(rows) == 6 and (rows["threshold"] == np.float32(tiles.threshold)).all()
    summary = json.loads((tmp_path / "h" / "_reports" / "date=2026-11-23" / "summary.json").read_text())
    assert summary["thresholds"].startswith("calibrated (quantile rule, target false-alarm rate 0.1")
    assert summary["thresholds"].endswith(f"score > {tiles.threshold:.4g} (group tiles)")
    page = (tmp_path / "h" / "_reports" / "date=2026-11-23" / "report.html").read_text()
    assert f"image score &gt; {np.float32(tiles.threshold):.4g}" in page and "alarm thresholds from" in page


def test_evaluate_applies_thresholds_per_class(calibrated, tiny_checkpoint, tmp_path, capsys):
    """A labelled set whose class_name is the line, with the file's group column renamed to match."""
    root = calibrated["root"]
    data = json.loads((root / "t.json").read_text())
    (tmp_path / "t.json").write_text(json.dumps({**data, "group_column": "class_name"}))
    lines = ["image_uri,label,class_name,mask_uri"]
    for line in LINES:
        lines += [f"{uri},0,{line}," for uri in calibrated["good_uris"][(line, "B")][:4]]
        lines += [f"{root}/images/{line}/defect-000.png,1,{line},{root}/masks/{line}/defect-000.png"]
    (tmp_path / "labelled.csv").write_text("\n".join(lines) + "\n")
    assert evaluate_job.main(["--data", str(tmp_path / "labelled.csv"), "--output", str(tmp_path / "e"),
                              "--checkpoint", tiny_checkpoint, "--thresholds", str(tmp_path / "t.json"),
                              "--shard-size", "16"]) == 0
    printed = capsys.readouterr().out
    rows = results.read_run(str(next((tmp_path / "e").glob("run_id=*"))))
    for line in LINES:
        part, group = rows[rows["class_name"] == line], calibrated["thresholds"].groups[line]
        assert (part["threshold"] == np.float32(group.threshold)).all()
        assert (part["is_anomalous"] == (part["score"].astype(np.float64) > group.threshold)).all()
    assert "at the image thresholds used" in printed and "false_alarm_rate" in printed


def test_calibrate_inputs_are_checked_in_one_line(tmp_path, capsys, monkeypatch):
    """Bad flags and unusable manifests fail before Ray; a labelled data set splits into good and defects."""
    monkeypatch.setattr(calibrate_job, "init_ray", lambda *a: pytest.fail("Ray started"))
    for i in range(4):
        _write(tmp_path / "img", f"{i}.png", make_sample(i, 32, defect=None).image)
    _write(tmp_path / "img", "m.png", np.zeros((32, 32), np.uint8))
    rows = ["image_uri,line,label,mask_uri", "img/0.png,a,0,", "img/1.png,a,1,img/m.png", "img/2.png,b,0,",
            "img/3.png,b,1,"]
    (tmp_path / "m.csv").write_text("\n".join(rows) + "\n")
    (tmp_path / "bad.csv").write_text("image_uri,line,label\nimg/0.png,a,2\n")
    (tmp_path / "orphan.csv").write_text("image_uri,line,label\nimg/0.png,a,0\nimg/1.png,c,1\n")
    base = ["--output", str(tmp_path / "t.json")]
    cases = [
        (["--input", str(tmp_path / "m.csv"), "--target-fpr", "0"], "must be a number in [1e-09, 1), got 0"),
        (["--input", "x", "--data", "y"], "not allowed with argument"),
        (["--input", str(tmp_path / "m.csv"), "--group-column", "camera"], "no column 'camera' in the input"),
        (["--input", str(tmp_path / "bad.csv"), "--label-column", "label"], "label must be 0 or 1 on every row, found [2]"),
        (["--input", str(tmp_path / "orphan.csv"), "--label-column", "label", "--group-column", "line"],
         "group 'c' has defects but no good images"),
        (["--input", str(tmp_path / "m.csv"), "--rule", "f1"], "--rule f1 needs labelled defects"),
        (["--input", str(tmp_path / "empty")], "input not found"),
    ]
    for argv, message in cases:
        code, err = _exit(calibrate_job.main, "jobs.calibrate", argv + base, capsys)
        assert code == 2 and len(err.strip().splitlines()) == 1 and message in err, (argv, err)
    args = calibrate_job.build_parser().parse_args(["--input", str(tmp_path / "m.csv"), "--label-column", "label",
                                                    "--group-column", "line", "--rule", "f1"] + base)
    good, defects = calibrate_job.split_images(calibrate_job.read_images(args), args)
    assert good["class_name"].to_pylist() == ["a", "b"] and set(good["label"].to_pylist()) == {0}
    assert all(good["has_masks"].to_pylist())  # a good image's mask is all background
    assert defects["class_name"].to_pylist() == ["a", "b"] and set(defects["label"].to_pylist()) == {1}
    assert defects["has_masks"].to_pylist() == [True, False]  # line b's defect has no mask: image level only
    assert defects["mask_uri"].to_pylist()[0] == str(tmp_path / "img" / "m.png")
    (tmp_path / "m2.csv").write_text("image_uri,label,class_name,mask_uri\nimg/0.png,0,a,\nimg/1.png,1,a,img/m.png\n")
    data = calibrate_job.build_parser().parse_args(["--data", str(tmp_path / "m2.csv"), "--group-column",
                                                    "class_name"] + base)
    good, defects = calibrate_job.split_images(calibrate_job.read_images(data), data)
    assert good.num_rows == 1 and defects.num_rows == 1 and defects["has_masks"].to_pylist() == [True]
    assert calibrate_job.default_rows("s3://b/x/thresholds.json") == "s3://b/x/thresholds-rows"
