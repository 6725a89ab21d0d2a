"""The review loop: jobs.export -> edited review files -> jobs.import_labels -> jobs.evaluate.

A small run of the packaged demo model on generated images (48, four textures) is exported;
a reviewer script flips labels and paints masks in the exported COCO and Label Studio files;
the import must give exactly those labels and masks, and jobs.evaluate on the imported manifest
the figures they imply (sklearn on the run's scores and the edited labels).
"""

from __future__ import annotations

import io
import json
import shutil
import xml.etree.ElementTree as ET
from pathlib import Path

import jsonschema
import numpy as np
import pandas as pd
import pytest
from PIL import Image
from pycocotools.coco import COCO
from sklearn.metrics import average_precision_score, roc_auc_score

from headclip import results
from headclip.evaluation.calibration import clopper_pearson
from headclip.review import estimates, labelstudio
from headclip.review.export import read_export
from headclip.review.selection import Sampling, Selection, select
from headclip.scoring.masks import encode_rle
from headclip.scoring.runner import JobConfig, execute, prepare
from headclip.scoring.scorer import ScoringOptions
from jobs import cli
from jobs import evaluate as evaluate_job
from jobs import export as export_job
from jobs import import_labels as import_job
from jobs.demo import generate

THRESHOLD = 0.94  # about half of the 48 demo images are flagged at this threshold


@pytest.fixture(scope="module")
def scored(ray_cluster, tmp_path_factory):
    """A run of the demo model over 48 generated images (class_name = texture)."""
    root = tmp_path_factory.mktemp("review")
    manifest = generate(root / "data", 48, 64)
    config = JobConfig(input=str(manifest), output=str(root / "out"), checkpoint=None, shard_size=16, actors=1,
                       progress_interval=5.0, scoring=ScoringOptions(batch_size=8, threshold=THRESHOLD))
    plan = prepare(config)
    execute(plan, config)
    run_dir = str(next((root / "out").glob("run_id=*")))
    rows = results.read_run(run_dir)
    assert 20 <= rows["is_anomalous"].sum() and (~rows["is_anomalous"]).sum() >= 20
    return {"root": root, "run": run_dir, "rows": rows.set_index("image_uri", drop=False)}


@pytest.fixture()
def exported(scored, tmp_path):
    """The top 20 and a sample of 20 unflagged images, exported with copies of the images."""
    out = tmp_path / "export"
    assert export_job.main(["--run", scored["run"], "--top", "20", "--sample", "20", "--seed", "3",
                            "--output", str(out)]) == 0
    return out


def _records(export: Path) -> list[dict]:
    return read_export(str(export))[0]


def _mask_of(rows, uri) -> np.ndarray:
    return results.mask(rows.loc[uri])


# -- the export ------------------------------------------------------------------------------


def test_coco_export_reads_with_pycocotools_masks_bit_for_bit(scored, exported):
    rows = scored["rows"]
    coco = COCO(str(exported / "labels.json"))
    records = {r["coco_id"]: r for r in _records(exported)}
    assert sorted(coco.getImgIds()) == sorted(records)
    annotated = set()
    for ann in coco.loadAnns(coco.getAnnIds()):
        record = records[ann["image_id"]]
        row = rows.loc[record["image_uri"]]
        expected = _mask_of(rows, record["image_uri"])
        assert np.array_equal(coco.annToMask(ann).astype(bool), expected)  # bit for bit
        box = row["bbox"]
        assert ann["bbox"] == [box["x0"], box["y0"], box["x1"] - box["x0"], box["y1"] - box["y0"]]
        assert ann["area"] == row["mask_area"]
        attributes = ann["attributes"]
        assert attributes["run_id"] == row["run_id"] and attributes["image_id"] == row["image_id"]
        assert attributes["score"] == pytest.approx(row["score"], abs=1e-6)
        annotated.add(ann["image_id"])
    # flagged images with a mask have one annotation each; unflagged ones none
    expected = {k for k, r in records.items() if r["is_anomalous"] and rows.loc[r["image_uri"], "mask_area"] > 0}
    assert annotated == expected and expected
    # the images are copied beside it (FiftyOne's COCODetectionDataset layout: data/ + labels.json)
    for image in coco.loadImgs(coco.getImgIds()):
        copied = exported / "data" / image["file_name"]
        assert copied.read_bytes() == Path(image["coco_url"]).read_bytes()
        assert Image.open(copied).size == (image["width"], image["height"])


def test_selection_top_and_stratified_sample_are_recorded(scored, exported):
    rows = scored["rows"]
    records = _records(exported)
    sampling = json.loads((exported / "sampling.json").read_text())
    ok = rows[rows["status"] == "ok"]
    top = set(ok.sort_values("score", ascending=False)["image_uri"][:20])
    assert {r["image_uri"] for r in records if "top" in r["reasons"]} == top
    sampled = [r for r in records if r["in_sample"]]
    assert len(sampled) == 20 and not any(r["is_anomalous"] for r in sampled)
    unflagged = ok[~ok["is_anomalous"]].groupby("class_name").size()
    assert {g: s["population"] for g, s in sampling["groups"].items()} == unflagged.to_dict()
    drawn = {g: s["drawn"] for g, s in sampling["groups"].items()}
    assert sum(drawn.values()) == 20
    for group, n in drawn.items():  # proportional allocation, largest remainder
        assert abs(n - 20 * unflagged[group] / unflagged.sum()) < 1
        assert sum(1 for r in sampled if r["group"] == group) == n
    assert sampling["seed"] == 3 and sampling["flagged_images"] == int(ok["is_anomalous"].sum())
    # the same seed draws the same sample; the draw depends on it
    frame = results.read_run(scored["run"])
    again, _ = select(frame, Selection(sample=20, seed=3))
    assert set(again["image_uri"]) == {r["image_uri"] for r in sampled}
    other, _ = select(frame, Selection(sample=5, seed=4))
    assert set(other["image_uri"]) <= set(ok.loc[~ok["is_anomalous"], "image_uri"])


def test_where_clause_selects_with_duckdb(scored, tmp_path, capsys):
    rows = scored["rows"]
    out = tmp_path / "wood"
    assert export_job.main(["--run", scored["run"], "--where", "class_name = 'wood' AND score > 0.9",
                            "--images", "uri", "--output", str(out)]) == 0
    expected = set(rows[(rows["class_name"] == "wood") & (rows["score"] > 0.9)]["image_uri"])
    records = _records(out)
    assert {r["image_uri"] for r in records} == expected and expected
    assert not (out / "data").exists()
    assert {r["file_name"] for r in records} == expected  # referenced by URI


def _plain_brush_decode(rle: list[int], width: int, height: int) -> np.ndarray:
    """rle-pack's decode (thi.ng/umbrella, as Label Studio documents it), bit by bit."""
    bits = [(byte >> (7 - k)) & 1 for byte in rle for k in range(8)]
    pos = 0

    def read(n):
        nonlocal pos
        value = 0
        for _ in range(n):
            value = value * 2 + bits[pos]
            pos += 1
        return value

    num = read(32)
    word = read(5) + 1
    sizes = [read(4) + 1 for _ in range(4)]
    out, i = [0] * num, 0
    while i < num:
        x = read(1)
        j = i + 1 + read(sizes[read(2)])
        if x:
            value = read(word)
            out[i:j] = [value] * (j - i)
            i = j
        else:
            while i < j:
                out[i] = read(word)
                i += 1
    return np.array(out, np.uint8).reshape(height, width, 4)[:, :, 3] > 0


# Label Studio's task import format and its prediction results, from its documentation
# (labelstud.io/guide/tasks and /guide/predictions, "brushlabels" and "choices" results).
RESULT_SCHEMA = {
    "type": "object", "required": ["from_name", "to_name", "type", "value"],
    "properties": {
        "id": {"type": "string"}, "from_name": {"type": "string"}, "to_name": {"type": "string"},
        "type": {"enum": ["choices", "brushlabels"]},
        "original_width": {"type": "integer", "minimum": 1}, "original_height": {"type": "integer", "minimum": 1},
        "image_rotation": {"type": "number"},
        "value": {"type": "object", "oneOf": [
            {"required": ["choices"], "properties": {"choices": {"type": "array", "items": {"type": "string"}}}},
            {"required": ["format", "rle", "brushlabels"],
             "properties": {"format": {"const": "rle"},
                            "rle": {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 255}},
                            "brushlabels": {"type": "array", "items": {"type": "string"}}}}]}},
    "if": {"properties": {"type": {"const": "brushlabels"}}},
    "then": {"required": ["original_width", "original_height"]}}
TASK_SCHEMA = {
    "type": "array", "items": {
        "type": "object", "required": ["data"], "properties": {
            "data": {"type": "object", "required": ["image"], "properties": {"image": {"type": "string"}}},
            "predictions": {"type": "array", "items": {
                "type": "object", "required": ["result"],
                "properties": {"model_version": {"type": "string"}, "score": {"type": "number"},
                               "result": {"type": "array", "items": RESULT_SCHEMA}}}}}}}


def test_label_studio_tasks_follow_its_schema_and_config(scored, exported):
    rows = scored["rows"]
    tasks = json.loads((exported / "label-studio" / "tasks.json").read_text())
    jsonschema.validate(tasks, TASK_SCHEMA)
    config = ET.fromstring((exported / "label-studio" / "config.xml").read_text())
    controls = {c.get("name"): c for c in config if c.get("toName")}
    images = {c.get("name") for c in config if c.tag == "Image"}
    choice_values = {c.get("value") for c in controls["verdict"]}
    brush_values = {c.get("value") for c in controls["defect"]}
    records = {r["image_id"]: r for r in _records(exported)}
    brushes = 0
    for item in tasks:
        record = records[item["data"]["image_id"]]
        assert item["data"]["image"] == record["image_uri"]
        for result in item["predictions"][0]["result"]:
            assert result["from_name"] in controls and result["to_name"] in images
            if result["type"] == "choices":
                assert set(result["value"]["choices"]) <= choice_values
                assert result["value"]["choices"] == [("defect" if record["is_anomalous"] else "normal")]
            else:
                assert set(result["value"]["brushlabels"]) <= brush_values
                w, h = result["original_width"], result["original_height"]
                assert (w, h) == (record["width"], record["height"])
                expected = _mask_of(rows, record["image_uri"])
                assert np.array_equal(_plain_brush_decode(result["value"]["rle"], w, h), expected)
                assert np.array_equal(labelstudio.decode_brush(result["value"]["rle"], w, h), expected)
                brushes += 1
    assert brushes == sum(1 for r in records.values()
                          if r["is_anomalous"] and rows.loc[r["image_uri"], "mask_area"] > 0) > 0


def test_label_studio_sdk_reads_the_tasks(exported):
    """With the optional 'review' extra installed: Label Studio's own SDK validates the tasks."""
    sdk = pytest.importorskip("label_studio_sdk.label_interface")
    from label_studio_sdk.converter import brush

    interface = sdk.LabelInterface((exported / "label-studio" / "config.xml").read_text())
    for item in json.loads((exported / "label-studio" / "tasks.json").read_text()):
        assert interface.validate_task({"data": item["data"]})  # its validate_task fails on any prediction
        assert interface.validate_prediction(item["predictions"][0], return_errors=True) == []
        for result in item["predictions"][0]["result"]:
            if result["type"] == "brushlabels":
                w, h = result["original_width"], result["original_height"]
                theirs = brush.decode_rle(result["value"]["rle"]).reshape(h, w, 4)[:, :, 3] > 0
                assert np.array_equal(theirs, labelstudio.decode_brush(result["value"]["rle"], w, h))


def test_brush_rle_round_trips_long_runs_and_single_pixels():
    rng = np.random.default_rng(0)
    for shape, p in (((1, 1), 1.0), ((5, 7), 0.5), ((300, 260), 0.0005), ((300, 260), 1.0)):
        mask = rng.random(shape) < p
        rle = labelstudio.encode_brush(mask)
        assert np.array_equal(_plain_brush_decode(rle, shape[1], shape[0]), mask)
    with pytest.raises(ValueError, match="holds"):
        labelstudio.decode_brush(labelstudio.encode_brush(np.ones((4, 4), bool)), 5, 4)


# -- the round trip ----------------------------------------------------------------------------


def _rect(height, width, y0, x0, y1, x1) -> np.ndarray:
    mask = np.zeros((height, width), bool)
    mask[y0:y1, x0:x1] = True
    return mask


def _review_coco(export: Path, rows) -> tuple[dict, dict, dict]:
    """The reviewer script: 3 flagged images rejected, 2 sampled images painted as defects, 2 masks repainted.

    Returns (reviewed COCO, expected label per image_uri, expected mask per image_uri).
    """
    doc = json.loads((export / "labels.json").read_text())
    records = {r["coco_id"]: r for r in _records(export)}
    by_image = {}
    for ann in doc["annotations"]:
        by_image.setdefault(ann["image_id"], []).append(ann)
    flagged = sorted(by_image)
    rejected, repainted = flagged[:3], flagged[3:5]
    missed = [k for k, r in records.items() if r["in_sample"]][:2]
    labels = {r["image_uri"]: int(k in by_image) for k, r in records.items()}
    masks = {records[k]["image_uri"]: _mask_of(rows, records[k]["image_uri"]) for k in by_image}
    doc["annotations"] = [a for a in doc["annotations"] if a["image_id"] not in rejected]
    for k in rejected:
        labels[records[k]["image_uri"]] = 0
        del masks[records[k]["image_uri"]]
    for k in repainted + missed:
        r = records[k]
        painted = _rect(r["height"], r["width"], 5 + k % 7, 9, 30, 25 + k % 5)
        doc["annotations"] = [a for a in doc["annotations"] if a["image_id"] != k]
        doc["annotations"].append({"id": 1000 + k, "image_id": k, "category_id": 1, "iscrowd": 0,
                                   "segmentation": encode_rle(painted), "bbox": [9, 5, 16, 25], "area": 0})
        labels[r["image_uri"]], masks[r["image_uri"]] = 1, painted
    return doc, labels, masks


def _read_png(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path)) > 0


def test_round_trip_coco_edits_then_evaluate(scored, exported, tmp_path, capsys):
    rows = scored["rows"]
    doc, labels, masks = _review_coco(exported, rows)
    reviewed = tmp_path / "reviewed.json"
    reviewed.write_text(json.dumps(doc))
    out = tmp_path / "imported"
    assert import_job.main(["--export", str(exported), "--labels", str(reviewed), "--output", str(out),
                            "--reviewer", "qa-1"]) == 0
    printed = capsys.readouterr().out
    manifest = pd.read_csv(out / "manifest.csv")
    assert dict(zip(manifest["image_uri"], manifest["label"])) == labels
    assert set(manifest["reviewer"]) == {"qa-1"}
    for row in manifest.itertuples():
        if row.label:
            assert np.array_equal(_read_png(out / row.mask_uri), masks[row.image_uri])
        else:
            assert pd.isna(row.mask_uri)
    flagged = dict(zip(manifest["image_uri"], manifest["model_flagged"]))
    false_alarms = sum(1 for u, y in labels.items() if flagged[u] and not y)
    missed = sum(1 for u, y in labels.items() if y and not flagged[u])
    assert (false_alarms, missed) == (3, 2)  # the edits, and nothing else, disagree with the model
    assert f"{missed} missed defects, {false_alarms} false alarms" in printed
    differ = pd.read_csv(out / "disagreements.csv")
    assert sorted(differ["disagreement"]) == ["false alarm"] * 3 + ["missed defect"] * 2
    n_flagged = int(manifest["model_flagged"].sum())
    assert f"{n_flagged - 3} of {n_flagged} confirmed" in printed
    assert "2 defects in 20 sampled" in printed

    # jobs.evaluate on the imported manifest as it is: the figures the edits imply
    assert evaluate_job.main(["--data", str(out / "manifest.csv"), "--output", str(tmp_path / "eval"),
                              "--shard-size", "16", "--actors", "1"]) == 0
    metrics = pd.read_parquet(next((tmp_path / "eval").glob("run_id=*/_eval/metrics.parquet"))).set_index("class")
    evaluated = results.read_run(str(next((tmp_path / "eval").glob("run_id=*")))).set_index("image_uri")
    np.testing.assert_allclose(evaluated["score"], rows.loc[evaluated.index, "score"], atol=2e-5)  # same model
    assert dict(zip(evaluated.index, evaluated["label"])) == labels
    scores = evaluated["score"].astype(float)
    checked = 0
    for name, part in manifest.groupby("class_name"):
        y, s = part["label"].to_numpy(), scores.loc[part["image_uri"]].to_numpy()
        if 0 < y.sum() < len(y):
            assert metrics.loc[name, "image_auroc"] == pytest.approx(roc_auc_score(y, s), abs=1e-9)
            assert metrics.loc[name, "image_ap"] == pytest.approx(average_precision_score(y, s), abs=1e-9)
            checked += 1
        if y.sum():
            assert metrics.loc[name, "pixel_auroc"] == metrics.loc[name, "pixel_auroc"]  # masks were read
    assert checked >= 2


def _label_studio_export(export: Path) -> list[dict]:
    """Tasks as Label Studio exports them once each prediction is accepted as the annotation."""
    tasks = json.loads((export / "label-studio" / "tasks.json").read_text())
    for k, item in enumerate(tasks, start=1):
        item["id"] = k
        item["annotations"] = [{"id": k, "completed_by": {"id": 7, "email": "qa@example.com"},
                                "result": json.loads(json.dumps(item["predictions"][0]["result"])),
                                "was_cancelled": False, "created_at": "2026-12-07T10:00:00Z",
                                "updated_at": "2026-12-07T10:05:00Z"}]
    return tasks


def test_round_trip_label_studio_edits(scored, exported, tmp_path, capsys):
    rows = scored["rows"]
    tasks = _label_studio_export(exported)
    records = {r["image_id"]: r for r in _records(exported)}
    flagged = [t for t in tasks if records[t["data"]["image_id"]]["is_anomalous"]]
    sampled = [t for t in tasks if records[t["data"]["image_id"]]["in_sample"]]
    for item in flagged[:2]:  # rejected: normal, region removed
        item["annotations"][0]["result"] = [{"from_name": "verdict", "to_name": "image", "type": "choices",
                                             "value": {"choices": ["normal"]}}]
    painted = _rect(64, 64, 10, 12, 20, 40)
    target = sampled[0]
    target["annotations"][0]["result"] = [
        {"from_name": "verdict", "to_name": "image", "type": "choices", "value": {"choices": ["defect"]}},
        {"from_name": "defect", "to_name": "image", "type": "brushlabels", "original_width": 64,
         "original_height": 64, "value": {"format": "rle", "rle": labelstudio.encode_brush(painted),
                                          "brushlabels": ["defect"]}}]
    sampled[1]["annotations"].append({"id": 99, "was_cancelled": True, "result": []})  # a skip is ignored
    path = tmp_path / "project-1.json"
    path.write_text(json.dumps(tasks))
    out = tmp_path / "imported"
    assert import_job.main(["--export", str(exported), "--labels", str(path), "--output", str(out)]) == 0
    manifest = pd.read_csv(out / "manifest.csv").set_index("image_id")
    assert set(manifest["reviewer"]) == {"qa@example.com"}
    assert set(manifest["reviewed_at"]) == {"2026-12-07T10:05:00Z"}
    for item in tasks:
        image_id, record = item["data"]["image_id"], records[item["data"]["image_id"]]
        expected = int(record["is_anomalous"] and item not in flagged[:2]) or int(item is target)
        assert manifest.loc[image_id, "label"] == expected
        if item is target:
            assert np.array_equal(_read_png(out / manifest.loc[image_id, "mask_uri"]), painted)
        elif expected:
            assert np.array_equal(_read_png(out / manifest.loc[image_id, "mask_uri"]),
                                  _mask_of(rows, record["image_uri"]))
    assert "1 missed defects, 2 false alarms" in capsys.readouterr().out


# -- bad review files ---------------------------------------------------------------------------


def _import_fails(argv, capsys) -> list[str]:
    with pytest.raises(SystemExit) as exit_info:
        cli.run(import_job.main, "jobs.import_labels", argv)
    assert exit_info.value.code == 2
    return [line for line in capsys.readouterr().err.splitlines() if line.startswith("jobs.import_labels:")]


def test_bad_review_files_give_one_line_each_and_import_nothing(scored, exported, tmp_path, capsys):
    doc = json.loads((exported / "labels.json").read_text())
    tasks = _label_studio_export(exported)
    first = doc["images"][0]
    flagged_ann = doc["annotations"][0]
    cases = {}
    # an image that is not in the export, and an annotation naming an unknown image id
    unknown = json.loads(json.dumps(doc))
    unknown["images"].append({**first, "id": 900, "file_name": "99999_stranger.png", "coco_url": "/nowhere.png",
                              "headclip": {}})
    unknown["annotations"].append({**flagged_ann, "id": 901, "image_id": 777})
    cases["unknown"] = (unknown, ["'99999_stranger.png' (id 900) is not in the export",
                                  "annotation 901 names unknown image id 777"])
    # a mask of the wrong size
    wrong = json.loads(json.dumps(doc))
    wrong["annotations"][0]["segmentation"] = encode_rle(np.ones((10, 12), bool))
    cases["wrong-size"] = (wrong, ["is 12x10, the image is"])
    # the same image reviewed twice
    twice = json.loads(json.dumps(doc))
    twice["images"].append({**first, "id": 902})
    cases["duplicate"] = (twice, [f"image {first['headclip']['image_id']} is reviewed more than once"])
    # an exported image left out
    partial = json.loads(json.dumps(doc))
    partial["images"] = partial["images"][1:]
    partial["annotations"] = [a for a in partial["annotations"] if a["image_id"] != first["id"]]
    cases["partial"] = (partial, ["1 exported images have no review"])
    # Label Studio: two annotations on one task, a brush of the wrong size, an unknown image id
    ls = json.loads(json.dumps(tasks))
    ls[0]["annotations"].append(dict(ls[0]["annotations"][0], id=55))
    brush_task = next(t for t in ls[1:] if len(t["annotations"][0]["result"]) == 2)
    brush_task["annotations"][0]["result"][1]["original_width"] = 65
    ls[-1]["data"]["image_id"] = "no/such/image"
    ls[-1]["data"]["image_uri"] = ls[-1]["data"]["image"] = "/no/such.png"
    kept = next(t for t in ls[1:] if len(t["annotations"][0]["result"]) == 2 and t is not brush_task)
    kept["annotations"][0]["result"][0]["value"]["choices"] = ["normal"]  # rejected, but the region left in
    ls[-2]["annotations"][0]["result"][0]["value"]["choices"] = ["defect"]  # a defect, nothing painted
    cases["label-studio"] = (ls, ["has 2 annotations in task 1", "is 65x64, the image is 64x64",
                                  "names image 'no/such/image', not in the export", "have no review",
                                  "is marked 'normal' but has a painted defect region",
                                  f"image {ls[-2]['data']['image_id']} is marked defect with no region painted"])
    for name, (review, expected) in cases.items():
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps(review))
        out = tmp_path / f"out-{name}"
        lines = _import_fails(["--export", str(exported), "--labels", str(path), "--output", str(out)], capsys)
        problems = lines[:-1]
        assert len(problems) == len(expected), (name, lines)
        for text in expected:
            assert sum(text in line for line in problems) == 1, (name, text, lines)
        assert "nothing imported" in lines[-1]
        assert not out.exists(), name  # nothing written


def test_missing_image_file_is_refused(scored, tmp_path, capsys):
    """A reviewed image whose file is gone is named; nothing is imported."""
    export = tmp_path / "export"
    assert export_job.main(["--run", scored["run"], "--top", "3", "--images", "uri", "--output", str(export)]) == 0
    records = _records(export)
    gone = tmp_path / "moved.png"
    shutil.move(records[1]["image_uri"], gone)
    try:
        lines = _import_fails(["--export", str(export), "--labels", str(export / "labels.json"), "--output",
                               str(tmp_path / "out")], capsys)
    finally:
        shutil.move(gone, records[1]["image_uri"])
    assert lines[:-1] == [f"jobs.import_labels: image {records[1]['image_id']} is missing: "
                          f"{records[1]['image_uri']} does not exist"]
    assert not (tmp_path / "out").exists()


def test_export_flags_are_checked_in_one_line(scored, tmp_path, capsys):
    cases = [(["--run", scored["run"], "--output", str(tmp_path / "x")], "choose images to review"),
             (["--run", scored["run"], "--where", "no_such_column > 1", "--output", str(tmp_path / "x")],
              "--where"),
             (["--run", str(tmp_path / "nothing"), "--top", "3", "--output", str(tmp_path / "x")],
              "no readable shard files"),
             (["--run", scored["run"], "--sample", "3", "--group-column", "line", "--output", str(tmp_path / "x")],
              "no column 'line'")]
    for argv, text in cases:
        with pytest.raises(SystemExit) as exit_info:
            cli.run(export_job.main, "jobs.export", argv)
        assert exit_info.value.code == 2
        err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("jobs.export:")]
        assert len(err) == 1 and text in err[0], err
        assert not (tmp_path / "x").exists()


def test_export_and_import_on_s3(scored, s3_bucket, tmp_path):
    bucket, options = s3_bucket
    flag = ["--storage-options", json.dumps(options)]
    assert export_job.main(["--run", scored["run"], "--flagged", "--output", f"{bucket}/review"] + flag) == 0
    records, sampling = read_export(f"{bucket}/review", options)
    assert len(records) == sampling.flagged_images
    import fsspec

    fs = fsspec.filesystem("s3", **options)
    assert fs.exists(f"{bucket[5:]}/review/data/{records[0]['file_name']}")
    local = tmp_path / "labels.json"
    local.write_bytes(fs.cat_file(f"{bucket[5:]}/review/labels.json"))
    assert import_job.main(["--export", f"{bucket}/review", "--labels", str(local), "--output",
                            f"{bucket}/reviewed"] + flag) == 0
    manifest = pd.read_csv(io.BytesIO(fs.cat_file(f"{bucket[5:]}/reviewed/manifest.csv")))
    assert len(manifest) == len(records)


# -- the estimates ------------------------------------------------------------------------------


def test_estimates_match_a_plain_computation():
    sampling = Sampling(run_ids=["r"], group_column="line", seed=0, rules={}, ok_images=1000, flagged_images=30,
                        groups={"a": {"population": 600, "drawn": 20}, "b": {"population": 370, "drawn": 10}})
    frame = pd.DataFrame({
        "model_flagged": [True] * 30 + [False] * 30,
        "label": [1] * 24 + [0] * 6 + [1] * 2 + [0] * 18 + [1] * 3 + [0] * 7,
        "in_sample": [False] * 30 + [True] * 30,
        "review_group": [""] * 30 + ["a"] * 20 + ["b"] * 10})
    precision = estimates.flagged_precision(frame, sampling, 0.95)
    assert (precision.value, precision.low, precision.high) == (0.8, *clopper_pearson(24, 30, 0.95))
    assert "every flagged image" in precision.detail
    rate, groups = estimates.unflagged_defect_rate(frame, sampling, 0.95)
    assert rate.value == pytest.approx((600 * 2 / 20 + 370 * 3 / 10) / 970)
    low_a, high_a = clopper_pearson(2, 20, 0.975)
    low_b, high_b = clopper_pearson(3, 10, 0.975)
    assert rate.low == pytest.approx((600 * low_a + 370 * low_b) / 970)
    assert rate.high == pytest.approx((600 * high_a + 370 * high_b) / 970)
    assert groups["b"]["defects"] == 3
    missed = estimates.miss_rate(frame, sampling, rate)
    assert missed.value == pytest.approx(rate.value * 970 / (rate.value * 970 + 24))
    assert missed.low <= missed.value <= missed.high
    lines = estimates.summary_lines(frame, sampling)
    assert lines[0].startswith("precision of the flagged images: 80.0 %")
    # the top of the flagged set is not a random sample of it, and says so
    partial = Sampling(**{**sampling.to_dict(), "flagged_images": 300})
    assert "not a random sample" in estimates.flagged_precision(frame, partial, 0.95).detail
    assert estimates.miss_rate(frame, partial, rate) is None
