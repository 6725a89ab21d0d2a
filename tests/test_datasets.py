"""The four data-set layouts, locally and on S3, with one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import fsspec
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from headclip.data.datasets import DatasetError, detect_layout, load_dataset
from headclip.data.loading import load_mask
from jobs import evaluate as evaluate_job
from jobs.make_synthetic import write_mvtec_tree


@pytest.fixture()
def mvtec(tmp_path) -> Path:
    root = tmp_path / "mvtec"
    write_mvtec_tree(root, ["metal", "leather"], per_class=6, size=32)
    (root / "metal" / "train" / "good").mkdir(parents=True)  # the train split is not read
    return root


def test_mvtec_layout(mvtec):
    table = load_dataset(str(mvtec))
    assert detect_layout(str(mvtec)) == "mvtec"
    assert table.num_rows == 12
    rows = table.to_pylist()
    assert {r["class_name"] for r in rows} == {"metal", "leather"}
    for row in rows:
        assert row["has_masks"]
        if row["label"]:
            assert row["mask_uri"].endswith("_mask.png") and Path(row["mask_uri"]).exists()
            assert "/ground_truth/" in row["mask_uri"]
        else:
            assert row["mask_uri"] is None and "/test/good/" in row["image_uri"]
    only = load_dataset(str(mvtec), classes=["metal"])
    assert set(only["class_name"].to_pylist()) == {"metal"}


def test_missing_mask_and_unknown_class_fail_with_one_line(mvtec):
    with pytest.raises(DatasetError, match="unknown class 'bottle'.*available: leather, metal") as err:
        load_dataset(str(mvtec), classes=["bottle"])
    assert "\n" not in str(err.value)
    mask = next((mvtec / "metal" / "ground_truth").rglob("*_mask.png"))
    mask.unlink()
    with pytest.raises(DatasetError, match="missing mask for .*expected .*_mask.png") as err:
        load_dataset(str(mvtec))
    assert "\n" not in str(err.value)


def test_visa_layout(mvtec, tmp_path):
    root = tmp_path / "visa"
    (root / "split_csv").mkdir(parents=True)
    lines = ["object,split,label,image,mask"]
    for row in load_dataset(str(mvtec)).to_pylist():
        image = Path(row["image_uri"]).relative_to(mvtec)
        mask = Path(row["mask_uri"]).relative_to(mvtec) if row["mask_uri"] else ""
        split = "train" if image.name == "000.png" else "test"
        lines.append(f"{row['class_name']},{split},{'anomaly' if row['label'] else 'normal'},"
                     f"../mvtec/{image},{'../mvtec/' + str(mask) if mask else ''}")
    (root / "split_csv" / "1cls.csv").write_text("\n".join(lines) + "\n")
    table = load_dataset(str(root))
    assert detect_layout(str(root)) == "visa"
    assert table.num_rows == 10  # the two 000.png rows are in the train split
    anomalous = [r for r in table.to_pylist() if r["label"]]
    assert anomalous and all(Path(r["mask_uri"]).exists() for r in anomalous)
    broken = next(i for i, line in enumerate(lines) if ",test,anomaly," in line)
    lines[broken] = lines[broken].rsplit(",", 1)[0] + ","  # an anomaly without its mask
    (root / "split_csv" / "1cls.csv").write_text("\n".join(lines) + "\n")
    with pytest.raises(DatasetError, match="missing mask for anomalous image"):
        load_dataset(str(root))


def test_anomalyclip_meta_json(mvtec):
    meta = {"train": {}, "test": {}}
    for row in load_dataset(str(mvtec)).to_pylist():
        meta["test"].setdefault(row["class_name"], []).append({
            "img_path": str(Path(row["image_uri"]).relative_to(mvtec)),
            "mask_path": str(Path(row["mask_uri"]).relative_to(mvtec)) if row["mask_uri"] else "",
            "cls_name": row["class_name"], "specie_name": "x", "anomaly": row["label"]})
    (mvtec / "meta.json").write_text(json.dumps(meta))
    table = load_dataset(str(mvtec))
    assert detect_layout(str(mvtec)) == "meta"
    assert table.num_rows == 12 and sum(table["label"].to_pylist()) == 6
    with pytest.raises(DatasetError, match="no 'val' split"):
        load_dataset(str(mvtec), split="val")


def test_manifest_with_image_labels_only(tmp_path, mvtec):
    rows = load_dataset(str(mvtec)).to_pylist()
    manifest = tmp_path / "scans.csv"
    manifest.write_text("image_uri,mask_uri,label,class_name\n" + "".join(
        f"{r['image_uri']},,{r['label']},brain\n" for r in rows))
    table = load_dataset(str(manifest))
    assert table.num_rows == 12
    assert not any(table["has_masks"].to_pylist()) and not any(table["mask_uri"].to_pylist())


def test_mvtec_on_s3(mvtec, s3_bucket):
    bucket, options = s3_bucket
    fs = fsspec.filesystem("s3", **options)
    fs.put(str(mvtec), f"{bucket[5:]}/datasets/", recursive=True)
    table = load_dataset(f"{bucket}/datasets/mvtec", storage_options=options)
    assert table.num_rows == 12
    assert all(u.startswith(f"{bucket}/datasets/mvtec/") for u in table["image_uri"].to_pylist())
    masks = [m for m in table["mask_uri"].to_pylist() if m]
    assert len(masks) == 6 and all(fs.exists(m) for m in masks)


def _anomalyclip_mask(path: Path, size: int) -> np.ndarray:
    """AnomalyCLIP's dataset.py (``> 0`` on the grey mask, as 0/255) and utils.get_transform's
    target transform (Resize, CenterCrop, ToTensor), then test.py's ``> 0.5``."""
    from torchvision import transforms

    img_mask = np.array(Image.open(path).convert("L")) > 0
    img_mask = Image.fromarray(img_mask.astype(np.uint8) * 255)
    target_transform = transforms.Compose([transforms.Resize((size, size)), transforms.CenterCrop(size),
                                           transforms.ToTensor()])
    return target_transform(img_mask)[0].numpy() > 0.5


def test_masks_with_class_ids_load_as_anomalyclip_reads_them(tmp_path):
    ids = np.zeros((37, 50), dtype=np.uint8)
    ids[5:20, 8:30] = 1  # one defect, class id 1
    ids[24:33, 33:47] = 2  # another, class id 2
    ids[30, 2] = 1  # a single pixel
    Image.fromarray(ids).save(tmp_path / "ids.png")
    Image.fromarray((ids > 0).astype(np.uint8) * 255).save(tmp_path / "binary.png")
    for size in (64, 24):
        expected = _anomalyclip_mask(tmp_path / "ids.png", size)
        assert expected.any()
        np.testing.assert_array_equal(load_mask(str(tmp_path / "ids.png"), size), expected)
        np.testing.assert_array_equal(load_mask(str(tmp_path / "binary.png"), size), expected)


def _visa_tree(mvtec: Path, root: Path, mask_values) -> Path:
    """A VisA layout over the images of ``mvtec``; ``mask_values(i, mask)`` writes the i-th mask's pixels."""
    lines = ["object,split,label,image,mask"]
    for i, row in enumerate(load_dataset(str(mvtec)).to_pylist()):
        folder = "Anomaly" if row["label"] else "Normal"
        image = Path(row["class_name"]) / "Data" / "Images" / folder / f"{i:03d}.png"
        (root / image).parent.mkdir(parents=True, exist_ok=True)
        (root / image).write_bytes(Path(row["image_uri"]).read_bytes())
        mask = ""
        if row["label"]:
            mask = Path(row["class_name"]) / "Data" / "Masks" / folder / f"{i:03d}.png"
            (root / mask).parent.mkdir(parents=True, exist_ok=True)
            defect = np.asarray(Image.open(row["mask_uri"])) > 0
            Image.fromarray(mask_values(i, defect).astype(np.uint8)).save(root / mask)
        lines.append(f"{row['class_name']},test,{'anomaly' if row['label'] else 'normal'},{image},{mask}")
    (root / "split_csv").mkdir(parents=True)
    (root / "split_csv" / "1cls.csv").write_text("\n".join(lines) + "\n")
    return root


def _evaluate(ray_cluster, root: Path, checkpoint: str, output: Path, capsys) -> pd.DataFrame:
    code = evaluate_job.main(["--data", str(root), "--layout", "visa", "--checkpoint", checkpoint,
                              "--output", str(output), "--actors", "1", "--shard-size", "8", "--batch-size", "4",
                              "--ray-address", ray_cluster])
    assert code == 0
    printed = capsys.readouterr().out
    assert "-bin histograms; binning error at most (points): auroc " in printed, printed
    (metrics,) = output.glob("run_id=*/_eval/metrics.parquet")
    return pd.read_parquet(metrics).set_index("class")


def test_visa_class_id_masks_evaluate_as_binary_masks(ray_cluster, tiny_checkpoint, tmp_path, capsys):
    """VisA stores masks as class ids (0 background, 1, 2, ...): the same pixel metrics as 0/255 masks."""
    mvtec = tmp_path / "mvtec"
    write_mvtec_tree(mvtec, ["metal", "leather"], per_class=8, size=48, seed=3)
    binary = _visa_tree(mvtec, tmp_path / "visa-255", lambda i, defect: defect * 255)
    class_ids = _visa_tree(mvtec, tmp_path / "visa-ids", lambda i, defect: defect * (1 + i % 2))
    values = {int(v) for p in (class_ids / "metal" / "Data" / "Masks").rglob("*.png")
              for v in np.unique(np.asarray(Image.open(p)))}
    assert values == {0, 1, 2}
    expected = _evaluate(ray_cluster, binary, tiny_checkpoint, tmp_path / "eval-255", capsys)
    got = _evaluate(ray_cluster, class_ids, tiny_checkpoint, tmp_path / "eval-ids", capsys)
    pixel = [c for c in expected.columns if c.startswith("pixel_")]
    assert pixel and not expected[pixel].isna().any().any()
    pd.testing.assert_frame_equal(got, expected)
