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


# -- one pass: a reference bank from part of the good images, thresholds on the rest -------------------

PER_LINE, IN_BANK, ONE_PASS_TARGET, REFERENCE_SIZE = 6, 2, 0.2, 96


@pytest.fixture(scope="module")
def one_pass(ray_cluster, tiny_checkpoint, tmp_path_factory):
    """jobs.calibrate --build-reference on six good images of each line, two of each into the bank, at a
    reference size of its own (the held-out images are scored with both forwards)."""
    root = tmp_path_factory.mktemp("one-pass")
    lines = ["image_uri,image_id,line"]
    for line_index, line in enumerate(LINES):
        for i in range(PER_LINE):
            path = _write(root / "images", f"{line}-{i}.png",
                          make_sample(300 + 10 * line_index + i, SIZE, texture_kind=line, defect=None).image)
            lines.append(f"{path},{line}-{i},{line}")
    (root / "good.csv").write_text("\n".join(lines) + "\n")
    argv = ["--input", root / "good.csv", "--checkpoint", tiny_checkpoint, "--output", root / "t.json",
            "--group-column", "line", "--build-reference", root / "bank.safetensors", "--reference-images", IN_BANK,
            "--budget", "24", "--target-fpr", ONE_PASS_TARGET, "--shard-size", "4", "--batch-size", "4",
            "--reference-size", REFERENCE_SIZE]
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert calibrate_job.main([str(a) for a in argv]) == 0
    rows = results.read_run(str(next((root / "t-rows").glob("run_id=*"))))
    return {"root": root, "rows": rows, "printed": out.getvalue(), "listing": lines[1:],
            "thresholds": read_thresholds(str(root / "t.json"))}


def test_one_pass_bank_holds_exactly_the_images_not_calibrated_on(one_pass, tiny_checkpoint, capsys):
    from headclip.reference import read_bank
    from headclip.reference.fingerprint import bank_fingerprint

    from .cli_helpers import job_in_process

    root, rows, thresholds = one_pass["root"], one_pass["rows"], one_pass["thresholds"]
    held_out = set(rows["image_id"])
    assert len(rows) == len(held_out) == 2 * (PER_LINE - IN_BANK) and (rows["status"] == "ok").all()
    assert rows["reference_score"].notna().all()  # scored once, with the bank
    in_bank = [line for line in one_pass["listing"] if line.split(",")[1] not in held_out]
    assert len(in_bank) == 2 * IN_BANK
    ids = [line.split(",")[1] for line in one_pass["listing"]]
    chosen = cal.reference_split([i.split("-")[0] for i in ids], ids, count=IN_BANK)  # the stated rule
    assert [line.split(",")[1] for line in in_bank] == [i for i, c in zip(ids, chosen) if c]
    bank = read_bank(str(root / "bank.safetensors"))
    assert {g: c["images"] for g, c in bank.counts.items()} == {line: IN_BANK for line in LINES}
    assert bank.input_size == REFERENCE_SIZE and bank.image_size == 64
    assert thresholds.reference == {**thresholds.reference, "bank_images": 2 * IN_BANK,
                                    "held_out_images": len(held_out), "fingerprint": bank_fingerprint(bank)}
    # the same bank as jobs.reference builds from exactly the images not calibrated on
    (root / "in-bank.csv").write_text("image_uri,image_id,line\n" + "\n".join(in_bank) + "\n")
    code, _, err = job_in_process("reference", ["--input", root / "in-bank.csv", "--output", root / "again.safetensors",
                                                "--group-column", "line", "--budget", "24", "--checkpoint",
                                                tiny_checkpoint, "--shard-size", "4",
                                                "--reference-size", REFERENCE_SIZE], capsys)
    assert code == 0, err
    again = read_bank(str(root / "again.safetensors"))
    assert again.counts == bank.counts and again.scales == pytest.approx(bank.scales, rel=1e-4)
    for line in LINES:
        assert torch.allclose(again.features[line], bank.features[line], atol=1e-5)
    assert "reference bank" in one_pass["printed"] and "calibrated on scores combined with" in one_pass["printed"]


def test_one_pass_thresholds_are_those_of_the_held_out_combined_scores(one_pass, tiny_checkpoint, capsys):
    """jobs.score --reference on the held-out images, then the calibration function, give the same thresholds."""
    from .cli_helpers import job_in_process

    root, thresholds = one_pass["root"], one_pass["thresholds"]
    held_out = set(one_pass["rows"]["image_id"])
    lines = [line for line in one_pass["listing"] if line.split(",")[1] in held_out]
    (root / "held-out.csv").write_text("image_uri,image_id,line\n" + "\n".join(lines) + "\n")
    code, _, err = job_in_process("score", ["--input", root / "held-out.csv", "--output", root / "scores",
                                            "--checkpoint", tiny_checkpoint, "--reference", root / "bank.safetensors",
                                            "--thresholds", root / "t.json", "--shard-size", "4"], capsys)
    assert code == 0, err  # the thresholds go with this bank: not refused
    scored = results.read_run(str(next((root / "scores").glob("run_id=*"))))
    assert len(scored) == len(held_out) and scored["reference_score"].notna().all()
    hist = np.ones(BINS, np.int64)  # the image threshold does not depend on the pixels
    for line in LINES:
        scores = scored[scored["line"] == line]["score"].to_numpy(np.float64)
        expected = cal.fit_group(scores, hist, ONE_PASS_TARGET, 0.001)
        group = thresholds.groups[line]
        assert group.good_images == len(scores) == PER_LINE - IN_BANK
        assert group.threshold == pytest.approx(expected.threshold, abs=1e-6) and group.rank == expected.rank
    pooled = cal.fit_group(scored["score"].to_numpy(np.float64), hist, ONE_PASS_TARGET, 0.001)
    assert thresholds.default.threshold == pytest.approx(pooled.threshold, abs=1e-6)
    assert thresholds.groups[LINES[0]].threshold != thresholds.groups[LINES[1]].threshold


def test_thresholds_of_a_bank_are_refused_without_it_or_with_another(one_pass, tiny_checkpoint, tmp_path, capsys,
                                                                     monkeypatch, caplog):
    from headclip.reference import read_bank, write_bank

    from .cli_helpers import job_in_process, one_line_refusal

    root = one_pass["root"]
    for module in (score_job, audit_job):
        monkeypatch.setattr(module, "init_ray", lambda *a: pytest.fail("Ray started"))
    other = read_bank(str(root / "bank.safetensors"))
    other.scales = {g: s * 2 for g, s in other.scales.items()}
    write_bank(other, str(tmp_path / "other.safetensors"))
    score = ["--input", root / "good.csv", "--output", tmp_path / "o", "--checkpoint", tiny_checkpoint,
             "--thresholds", root / "t.json"]
    code, _, err = job_in_process("score", score, capsys)
    one_line_refusal(code, err, "calibrated on scores combined with reference bank", "give it with --reference")
    code, _, err = job_in_process("score", score + ["--reference", tmp_path / "other.safetensors"], capsys)
    one_line_refusal(code, err, "calibrated with reference bank", "not with")
    audit = ["--input", root / "images", "--date", "2026-11-23", "--history", tmp_path / "h", "--checkpoint",
             tiny_checkpoint, "--thresholds", root / "t.json"]
    code, _, err = job_in_process("audit", audit, capsys)
    one_line_refusal(code, err, "give it with --reference")
    assert not any((tmp_path / name).exists() for name in ("o", "h"))
    # zero-shot thresholds with a bank: a warning, not a refusal
    data = json.loads((root / "t.json").read_text())
    data.pop("reference")
    (tmp_path / "zero-shot.json").write_text(json.dumps(data))
    plan = ["--input", root / "good.csv", "--output", tmp_path / "p", "--checkpoint", tiny_checkpoint,
            "--thresholds", tmp_path / "zero-shot.json", "--reference", root / "bank.safetensors", "--plan-only"]
    with caplog.at_level("WARNING"):
        code, _, err = job_in_process("score", plan, capsys)
    assert code == 0, err
    assert "calibrated on zero-shot scores" in caplog.text


def test_build_reference_flags_are_checked_before_ray(one_pass, tiny_checkpoint, tmp_path, capsys, monkeypatch):
    from .cli_helpers import job_in_process, one_line_refusal

    root = one_pass["root"]
    monkeypatch.setattr(calibrate_job, "init_ray", lambda *a: pytest.fail("Ray started"))
    base = ["--input", root / "good.csv", "--output", tmp_path / "t.json", "--group-column", "line"]
    bank = ["--build-reference", tmp_path / "b.safetensors"]
    for extra, words in [(bank + ["--reference-images", PER_LINE], ("has 6 good images", "too few")),
                         (["--reference-fraction", "0.5"], ("--reference-fraction needs --build-reference",)),
                         (bank + ["--reference", root / "bank.safetensors"], ("not both",)),
                         (bank + ["--layers", "99"], ("not map layers",))]:
        code, _, err = job_in_process("calibrate", base + extra, capsys)
        one_line_refusal(code, err, *words)
    assert not any(tmp_path.iterdir())
    # the same command again (another --budget): the bank would be rebuilt, so its calibration rows are not resumed
    bank = (root / "bank.safetensors").read_bytes()
    again = ["--input", root / "good.csv", "--output", tmp_path / "t.json", "--group-column", "line",
             "--checkpoint", tiny_checkpoint,
             "--rows", root / "t-rows", "--build-reference", root / "bank.safetensors", "--reference-images", IN_BANK,
             "--budget", "12", "--target-fpr", ONE_PASS_TARGET, "--shard-size", "4", "--batch-size", "4"]
    code, _, err = job_in_process("calibrate", again, capsys)
    one_line_refusal(code, err, "scored with an earlier --build-reference bank", "give another --rows")
    assert not any(tmp_path.iterdir()) and (root / "bank.safetensors").read_bytes() == bank


def test_reference_split_is_seeded_per_group_and_ignores_the_listing_order():
    ids = [f"img-{i}" for i in range(20)]
    keys = ["a"] * 12 + ["b"] * 8
    chosen = cal.reference_split(keys, ids, fraction=0.25, seed=7)
    assert sum(chosen[:12]) == 3 and sum(chosen[12:]) == 2
    order = np.random.default_rng(0).permutation(20)
    shuffled = cal.reference_split([keys[i] for i in order], [ids[i] for i in order], fraction=0.25, seed=7)
    assert {ids[i] for i, c in zip(order, shuffled) if c} == {i for i, c in zip(ids, chosen) if c}
    assert cal.reference_split(keys, ids, fraction=0.25, seed=8) != chosen
    assert sum(cal.reference_split(keys, ids, count=1)) == 2
    with pytest.raises(ValueError, match="group 'b' has 1 good image"):
        cal.reference_split(["a", "a", "b"], ["1", "2", "3"], fraction=0.5)
