"""The training and evaluation entry points: provenance, --val-data, and the _eval outputs."""

from __future__ import annotations

import json
import math
import shlex
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from sklearn.metrics import average_precision_score, roc_auc_score

import headclip
from headclip.data.datasets import load_dataset
from headclip.data.loading import load_batch
from headclip.evaluation.metrics import COLUMNS
from headclip.model.assets import DEMO_BACKBONE
from headclip.training.loop import STATE_FILE, evaluate
from jobs import evaluate as evaluate_job
from jobs import train as train_job
from jobs.make_synthetic import write_mvtec_tree

SIZE = 64


@pytest.fixture(scope="module")
def trees(tmp_path_factory) -> tuple[Path, Path]:
    """A fit set (metal, 12 images) and a labelled validation set (wood and tiles, 8 each)."""
    root = tmp_path_factory.mktemp("job-data")
    write_mvtec_tree(root / "fit", ["metal"], per_class=12, size=SIZE, seed=0)
    write_mvtec_tree(root / "val", ["wood", "tiles"], per_class=8, size=SIZE, seed=1)
    return root / "fit", root / "val"


def _scores(model, table) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(joint scores, labels, class names) of a labelled table, one image at a time."""
    records = table.to_pylist()
    scores = []
    with ThreadPoolExecutor(2) as pool:
        for record in records:
            batch = load_batch([record], model.image_size, pool)
            scores.append(float(model.score(batch.images).joint_score[0]))
    return np.array(scores), np.array([r["label"] for r in records]), [r["class_name"] for r in records]


@pytest.fixture(scope="module")
def trained(trees, tmp_path_factory):
    """jobs.train, in this process, one epoch with --val-data; returns (argv, output, run dir, stdout)."""
    fit_root, val_root = trees
    work = tmp_path_factory.mktemp("train-job")
    output = work / "fitted.safetensors"
    argv = ["--data", str(fit_root), "--val-data", str(val_root), "--workers", "0", "--backbone", "HeadCLIP-Tiny",
            "--pretrained", DEMO_BACKBONE, "--image-size", str(SIZE), "--epochs", "1", "--batch-size", "6",
            "--name", "job-run", "--storage-path", str(work / "runs"), "--output", str(output)]
    assert train_job.main(argv) == 0
    return argv, output, work / "runs" / "job-run"


def test_train_records_its_command_as_provenance(trained):
    """The checkpoint's config.extra.provenance is the exact command (catches it dropped or
    recorded without its flags)."""
    argv, output, _ = trained
    checkpoint = headclip.read_checkpoint(str(output))
    assert checkpoint.config.extra["provenance"] == "python -m jobs.train " + shlex.join(argv)
    assert shlex.split(checkpoint.config.extra["provenance"])[3:] == argv
    model = headclip.create_model(checkpoint=str(output))  # and it rebuilds the model
    assert model.config.extra == checkpoint.config.extra


def test_train_reports_validation_metrics_of_val_data(trained, trees):
    """Each epoch's report holds the metrics of --val-data at that epoch's weights: image AUROC
    and AP per class against scikit-learn on the validation images. Catches --val-data ignored,
    metrics of the training set, or of the weights before the epoch."""
    _, output, run_dir = trained
    history = json.loads((run_dir / "checkpoint_epoch_0001" / STATE_FILE).read_text())["history"]
    assert [row["epoch"] for row in history] == [1]
    assert {f"val_{c}" for c in COLUMNS} <= set(history[0])
    model = headclip.create_model(checkpoint=str(output))
    val_table = load_dataset(str(trees[1]))
    scores, labels, classes = _scores(model, val_table)
    classes = np.array(classes)
    auroc = np.mean([roc_auc_score(labels[classes == c], scores[classes == c]) for c in ("tiles", "wood")])
    ap = np.mean([average_precision_score(labels[classes == c], scores[classes == c]) for c in ("tiles", "wood")])
    assert history[0]["val_image_auroc"] == pytest.approx(auroc, abs=1e-6)
    assert history[0]["val_image_ap"] == pytest.approx(ap, abs=1e-6)
    with ThreadPoolExecutor(2) as pool:
        reference = evaluate(model, val_table, 4, pool).table().loc["mean"]
    for column in COLUMNS:
        assert history[0][f"val_{column}"] == pytest.approx(float(reference[column]), abs=1e-6, nan_ok=True), column
    untrained = headclip.create_model(backbone="HeadCLIP-Tiny", pretrained=DEMO_BACKBONE, image_size=SIZE)
    before, _, _ = _scores(untrained, val_table)
    assert not np.allclose(before, scores, atol=1e-4)  # the epoch changed the scores validated


def test_evaluate_writes_metrics_parquet_and_markdown(ray_cluster, trained, trees, tmp_path, capsys):
    """jobs.evaluate writes run_id=<id>/_eval/metrics.parquet and metrics.md: one row per class
    and the mean, the in-process metrics (image ones against scikit-learn), the Markdown as
    percentages with one decimal. Catches the files missing, written from another table,
    rows or columns lost, and fractions printed as percentages (or the reverse)."""
    _, checkpoint, _ = trained
    _, val_root = trees
    out = tmp_path / "eval"
    assert evaluate_job.main(["--data", str(val_root), "--checkpoint", str(checkpoint), "--output", str(out),
                              "--shard-size", "5", "--batch-size", "4", "--actors", "1"]) == 0
    (run_dir,) = out.glob("run_id=*")
    parquet, markdown = run_dir / "_eval" / "metrics.parquet", run_dir / "_eval" / "metrics.md"
    frame = pq.read_table(parquet).to_pandas()
    assert list(frame.columns) == ["class", *COLUMNS]
    assert frame["class"].tolist() == ["tiles", "wood", "mean"]
    table = frame.set_index("class")

    model = headclip.create_model(checkpoint=str(checkpoint))
    val_table = load_dataset(str(val_root))
    with ThreadPoolExecutor(2) as pool:
        reference = evaluate(model, val_table, 4, pool).table()
    np.testing.assert_allclose(table.to_numpy(dtype=float), reference.to_numpy(dtype=float), atol=1e-6)
    scores, labels, classes = _scores(model, val_table)
    classes = np.array(classes)
    for name in ("tiles", "wood"):
        pick = classes == name
        assert table.loc[name, "image_auroc"] == pytest.approx(roc_auc_score(labels[pick], scores[pick]), abs=1e-6)
        assert table.loc[name, "image_ap"] == pytest.approx(average_precision_score(labels[pick], scores[pick]),
                                                            abs=1e-6)
    assert table.loc["mean", "image_auroc"] == pytest.approx(table.loc[["tiles", "wood"], "image_auroc"].mean())

    lines = markdown.read_text().strip().splitlines()
    assert lines[0] == "| class | " + " | ".join(COLUMNS) + " |"
    rows = {cells[0]: cells[1:] for cells in ([c.strip() for c in line.strip("|").split("|")] for line in lines[2:])}
    assert list(rows) == ["tiles", "wood", "mean"]
    for name, cells in rows.items():
        for column, cell in zip(COLUMNS, cells):
            value = table.loc[name, column]
            assert cell == ("n/a" if math.isnan(value) else f"{100 * value:.1f}"), (name, column)
    printed = capsys.readouterr().out
    assert markdown.read_text() in printed and f"metrics: {parquet} and {markdown}" in printed


def test_val_data_that_is_not_a_data_set_is_one_line(tmp_path, trees, capsys):
    fit_root, _ = trees
    from jobs.cli import UsageError

    with pytest.raises(UsageError, match="missing"):
        train_job.main(["--data", str(fit_root), "--val-data", str(tmp_path / "missing"), "--output",
                        str(tmp_path / "x.safetensors"), "--workers", "0", "--backbone", "HeadCLIP-Tiny",
                        "--pretrained", DEMO_BACKBONE, "--image-size", str(SIZE), "--epochs", "1",
                        "--storage-path", str(tmp_path / "runs")])
    assert not (tmp_path / "x.safetensors").exists()
