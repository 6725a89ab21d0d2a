"""Hostile labelled input: group values without a group, malformed labelled sets, masks that do not
fit their image, and the comparisons that decide a flag (an image or pixel exactly at its threshold,
coloured defect pixels, caption matching), each checked against a plain reference.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch
from PIL import Image
from pycocotools import mask as coco_mask

from headclip import results
from headclip.data.synthetic import make_sample

from .cli_helpers import job_in_process as _job, one_line_refusal as _one_line_refusal
from .scoring_helpers import write_images




def _image(folder: Path, name: str, seed: int, size=(48, 48), defect=None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    sample = make_sample(seed, max(size), defect=defect)
    Image.fromarray(sample.image).resize(size).save(folder / name)
    return folder / name


# -- a group value that names no group: the pooled default, in calibration and scoring alike ------------


def test_blank_group_values_are_no_group_in_calibrate_and_score(ray_cluster, tiny_checkpoint, tmp_path, capsys,
                                                                caplog):
    from headclip.evaluation.thresholds import read_thresholds

    lines = ["image_uri,line"]
    for i in range(36):
        path = _image(tmp_path / "good", f"g{i:02d}.png", i)
        lines.append(f"{path},{('a', 'b', '', '  ')[i % 4]}")
    (tmp_path / "good.csv").write_text("\n".join(lines) + "\n")
    scored = ["image_uri,line"] + [f"{_image(tmp_path / 'new', f'n{i}.png', 100 + i)},{v}"
                                   for i, v in enumerate(["a", "", "   ", "b", "c"])]
    (tmp_path / "new.csv").write_text("\n".join(scored) + "\n")
    with caplog.at_level(logging.WARNING):
        code, _, err = _job("calibrate", ["--input", tmp_path / "good.csv", "--checkpoint", tiny_checkpoint,
                                          "--output", tmp_path / "t.json", "--group-column", "line", "--target-fpr",
                                          "0.2", "--shard-size", "16"], capsys)
        assert code == 0, err[-3000:]
        assert "18 images have no value in column 'line'" in caplog.text
        thresholds = read_thresholds(str(tmp_path / "t.json"))
        assert sorted(thresholds.groups) == ["a", "b"] and thresholds.default.good_images == 36
        code, _, err = _job("score", ["--input", tmp_path / "new.csv", "--checkpoint", tiny_checkpoint, "--output",
                                      tmp_path / "scores", "--thresholds", tmp_path / "t.json"], capsys)
        assert code == 0, err[-3000:]
    assert "2 images have no line value" in caplog.text and "1 images of line c were not calibrated" in caplog.text
    rows = results.read_run(str(next((tmp_path / "scores").glob("run_id=*")))).set_index("line")
    default = np.float32(thresholds.default.threshold)
    for value, expected in (("a", thresholds.groups["a"].threshold), ("b", thresholds.groups["b"].threshold),
                            ("", default), ("   ", default), ("c", default)):
        assert rows.loc[value, "threshold"] == np.float32(expected), value


def test_scoring_options_and_thresholds_read_group_values_alike():
    from headclip.evaluation.thresholds import FORMAT, Thresholds, group_key
    from headclip.scoring.tasks import ScoringOptions

    options = ScoringOptions(threshold=0.2, mask_threshold=0.3, group_column="line",
                             group_thresholds={"a": (0.7, 0.8), "1": (0.6, 0.6)})
    for value, key, expected in (("a", "a", (0.7, 0.8)), (" a ", "a", (0.7, 0.8)), ("", None, (0.2, 0.3)),
                                 ("  \t", None, (0.2, 0.3)), (None, None, (0.2, 0.3)), (float("nan"), None, (0.2, 0.3)),
                                 (1, "1", (0.6, 0.6)), ("z", "z", (0.2, 0.3))):
        assert group_key(value) == key, value
        assert options.thresholds_for({"line": value}) == expected, value
    group = {"threshold": 0.4, "mask_threshold": 0.5, "good_images": 10, "rank": 9, "calibration_fpr": 0.1,
             "expected_fpr": 0.1, "fpr_interval": [0.0, 0.3], "fpr_bound": 0.3, "min_good_images": 10,
             "normal_pixels": 100, "calibration_pixel_fpr": 0.01, "pixel_bins": 100}
    document = {"format": FORMAT, "checkpoint_id": "c", "rule": "quantile", "target_fpr": 0.1,
                "target_pixel_fpr": 0.01, "confidence": 0.95, "group_column": "line", "default": group,
                "groups": {"": {**group, "threshold": 0.0001}, " ": group, "a": group}}
    thresholds = Thresholds.from_dict(document)  # a file that an earlier calibration wrote with a blank group
    assert sorted(thresholds.groups) == ["a"] and thresholds.for_group("").threshold == 0.4


# -- malformed labelled sets and thresholds files: one line each ---------------------------------------


def _meta(root: Path, split) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "meta.json").write_text(json.dumps({"test": split}))
    return root


@pytest.mark.parametrize("case, said", [
    ("meta anomaly yes", "label must be 0 or 1, got 'yes'"),
    ("meta split is a list", "split 'test' must map class names to lists of records, got list"),
    ("meta class is a dict", "class 'bottle' of split 'test' must be a list of records, got dict"),
    ("meta record without img_path", "a record has no 'img_path'"),
    ("meta record is a string", "a record is str, not an object"),
    ("manifest label null", "label must be 0 or 1, got None"),
    ("manifest label abc", "label must be 0 or 1, got 'abc'"),
    ("manifest duplicate ids", "names two images"),
    ("visa without object", "lacks column 'object'"),
    ("visa label maybe", "label must be normal or anomaly, got 'maybe'"),
])
def test_a_malformed_labelled_set_is_one_line(case, said, tmp_path, capsys):
    root = tmp_path / "set"
    if case == "meta anomaly yes":
        _meta(root, {"bottle": [{"img_path": "a.png", "anomaly": "yes"}]})
    elif case == "meta split is a list":
        _meta(root, [{"img_path": "a.png", "anomaly": 0}])
    elif case == "meta class is a dict":
        _meta(root, {"bottle": {"img_path": "a.png"}})
    elif case == "meta record without img_path":
        _meta(root, {"bottle": [{"anomaly": 0, "mask_path": ""}]})
    elif case == "meta record is a string":
        _meta(root, {"bottle": ["a.png"]})
    elif case.startswith("manifest"):
        rows = {"manifest label null": "a.png,,bottle\n", "manifest label abc": "a.png,abc,bottle\n",
                "manifest duplicate ids": "a.png,0,bottle,x\nb.png,0,bottle,x\n"}[case]
        header = "image_uri,label,class_name" + (",image_id" if "duplicate" in case else "")
        root.mkdir()
        root = root / "m.csv"
        root.write_text(f"{header}\n{rows}")
    else:
        (root / "split_csv").mkdir(parents=True)
        header, row = (("split,label,image,mask", "test,normal,a.png,") if case == "visa without object"
                       else ("object,split,label,image,mask", "candle,test,maybe,a.png,"))
        (root / "split_csv" / "1cls.csv").write_text(f"{header}\n{row}\n")
    code, _, err = _job("evaluate", ["--data", root, "--output", tmp_path / "o"], capsys)
    _one_line_refusal(code, err, said)


def test_a_thresholds_file_nested_deeply_is_one_line(tmp_path, capsys):
    write_images(tmp_path / "images", 1)
    (tmp_path / "deep.json").write_text("[" * 100_000 + "]" * 100_000)
    code, _, err = _job("score", ["--input", tmp_path / "images", "--output", tmp_path / "o", "--thresholds",
                                  tmp_path / "deep.json"], capsys)
    _one_line_refusal(code, err, "deep.json", "nested too deeply")


def test_images_differing_only_in_extension_are_two_images(tmp_path):
    from headclip.data.datasets import load_dataset

    for name in ("002.png", "002.jpg"):
        _image(tmp_path / "mvtec" / "bottle" / "test" / "good", name, 2)
    (tmp_path / "visa" / "split_csv").mkdir(parents=True)
    (tmp_path / "visa" / "split_csv" / "1cls.csv").write_text(
        "object,split,label,image,mask\ncandle,test,normal,img/002.png,\ncandle,test,normal,img/002.jpg,\n")
    for root, layout in ((tmp_path / "mvtec", "mvtec"), (tmp_path / "visa", "visa")):
        ids = load_dataset(str(root), layout)["image_id"].to_pylist()
        assert len(ids) == len(set(ids)) == 2 and {i.rsplit(".", 1)[1] for i in ids} == {"png", "jpg"}, ids


# -- masks: another size is refused, coloured defect pixels count -------------------------------------


def test_a_mask_of_another_size_is_an_error_row_not_stretched(ray_cluster, tiny_checkpoint, tmp_path, capsys):
    folder = tmp_path / "set"
    rows = ["image_uri,label,class_name,mask_uri"]
    for i, (mask_size, label) in enumerate([((64, 48), 1), ((32, 32), 1), (None, 0)]):
        image = _image(folder, f"i{i}.png", i, (64, 48), defect="spot" if label else None)
        mask = ""
        if mask_size:
            mask = folder / f"m{i}.png"
            Image.fromarray(np.pad(np.full((8, 8), 255, np.uint8), 4)).resize(mask_size).save(mask)
        rows.append(f"{image},{label},bottle,{mask}")
    (folder / "m.csv").write_text("\n".join(rows) + "\n")
    code, _, err = _job("evaluate", ["--data", folder / "m.csv", "--checkpoint", tiny_checkpoint, "--output",
                                     tmp_path / "o"], capsys)
    assert code == 0, err[-3000:]
    frame = results.read_run(str(next((tmp_path / "o").glob("run_id=*")))).set_index("image_id")
    wrong = frame.loc[str(folder / "i1.png")]
    assert wrong["status"] == "error" and "the mask is 32x32 pixels, its image 64x48" in wrong["error"]
    assert (frame.drop(index=str(folder / "i1.png"))["status"] == "ok").all()


@pytest.mark.parametrize("mode", ["RGB red", "RGB green", "P palette", "RGBA blue"])
def test_coloured_defect_pixels_are_defect(mode, tmp_path):
    from headclip.data.loading import load_mask

    defect = np.zeros((32, 32), bool)
    defect[5:12, 20:30] = True
    if mode == "P palette":
        image = Image.fromarray(defect.astype(np.uint8), mode="L").convert("P")
        image.putpalette([0, 0, 0, 0, 128, 0] + [0] * 762)
    else:
        colour = {"RGB red": (255, 0, 0), "RGB green": (0, 200, 0), "RGBA blue": (0, 0, 90, 255)}[mode]
        pixels = np.zeros((32, 32, len(colour)), np.uint8)
        pixels[..., -1] = 255 if mode.startswith("RGBA") else 0
        pixels[defect] = colour
        image = Image.fromarray(pixels, mode="RGBA" if mode.startswith("RGBA") else "RGB")
    image.save(tmp_path / "m.png")
    np.testing.assert_array_equal(load_mask(str(tmp_path / "m.png"), 32, image_size=(32, 32)), defect)


# -- the comparisons that decide a flag, at the value itself ------------------------------------------


@pytest.mark.parametrize("host_masks", [True, False])  # False: the device path, here on CPU tensors
def test_a_pixel_exactly_at_the_mask_threshold_is_not_in_the_mask(host_masks):
    from headclip.scoring.masks import encode_maps

    rng = np.random.default_rng(3)
    maps = rng.choice(np.array([0.25, 0.5, 0.75, 1.0], np.float32), size=(3, 8, 8))
    thresholds = [0.5, 0.75, 0.25]
    batch = encode_maps(torch.from_numpy(maps), [(8, 8)] * 3, thresholds, host_masks=host_masks)
    for j, limit in enumerate(thresholds):
        expected = np.array([[maps[j, y, x] > limit for x in range(8)] for y in range(8)])  # a plain loop
        rle = batch.encoded(j).mask_rle
        decoded = coco_mask.decode({"size": rle["size"], "counts": rle["counts"].encode()}).astype(bool)
        np.testing.assert_array_equal(decoded, expected)
        assert batch.encoded(j).mask_area == int(expected.sum())


def test_an_image_exactly_at_its_threshold_is_not_anomalous(tiny_checkpoint, tmp_path):
    from headclip.scoring.scorer import ScoringOptions, ImageScorer

    paths = write_images(tmp_path / "images", 6)
    table = pa.table({"image_id": [p.name for p in paths], "image_uri": [str(p) for p in paths],
                      "gid": [str(i) for i in range(len(paths))]})
    with ImageScorer("r", tiny_checkpoint, ScoringOptions(batch_size=3, io_threads=2)) as scorer:
        first = scorer.score_table(table).to_pylist()
    scores = [row["score"] for row in first]
    assert len(set(scores)) == len(scores)
    # each image gets its own score as threshold; one image gets a threshold just below its score
    below = float(np.nextafter(np.float32(scores[0]), np.float32(-1)))
    groups = {str(i): (below if i == 0 else s, 0.5) for i, s in enumerate(scores)}
    options = ScoringOptions(batch_size=3, io_threads=2, group_column="gid", group_thresholds=groups)
    with ImageScorer("r", tiny_checkpoint, options) as scorer:
        again = scorer.score_table(table).to_pylist()
    assert [row["score"] for row in again] == scores
    assert [row["is_anomalous"] for row in again] == [True] + [False] * (len(paths) - 1)


def test_captions_count_as_positives_exactly_when_they_describe_the_image():
    from headclip.training.captions import ANY_DEFECT, caption_for, compatible

    textures, defects = ("wood", "tiles"), (None, "scratch", "spot")
    for cap_texture in (None, *textures):
        for cap_defect in (None, ANY_DEFECT, "scratch", "spot"):
            for texture in textures:
                for defect in defects:
                    texture_ok = cap_texture in (None, texture)
                    defect_ok = (cap_defect is None) if defect is None else cap_defect in (ANY_DEFECT, defect)
                    assert compatible((cap_texture, cap_defect), texture, defect) == (texture_ok and defect_ok), \
                        ((cap_texture, cap_defect), texture, defect)
    rng = np.random.default_rng(0)
    seen = set()
    for _ in range(400):
        texture, defect = textures[rng.integers(2)], defects[rng.integers(3)]
        text, (cap_texture, cap_defect) = caption_for(rng, texture, defect, generic_share=0.3)
        assert compatible((cap_texture, cap_defect), texture, defect), text
        assert (texture in text) == (cap_texture is not None), text
        assert (defect is not None and defect in text) == (cap_defect not in (None, ANY_DEFECT)), text
        seen.add((cap_texture is None, cap_defect))
    assert len(seen) >= 6  # generic and named captions of every kind were drawn
