"""Fitting prompts and head weights: Ray Train with 2 workers, in-process runs, resume, evaluation."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch

import headclip
from headclip.data.datasets import load_dataset
from headclip.model.assets import DEMO_BACKBONE
from headclip.training.launcher import fit
from headclip.training.loop import STATE_FILE, TrainConfig, evaluate
from jobs.make_synthetic import write_mvtec_tree

from .scoring_helpers import job, run_job

SIZE = 128
MODEL = dict(backbone="HeadCLIP-Tiny", pretrained=DEMO_BACKBONE, image_size=SIZE)


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    root = tmp_path_factory.mktemp("synthetic")
    write_mvtec_tree(root / "fit", ["metal", "leather"], per_class=24, size=SIZE, seed=0)
    write_mvtec_tree(root / "held-out", ["wood", "tiles"], per_class=16, size=SIZE, seed=1)
    return load_dataset(str(root / "fit")), load_dataset(str(root / "held-out"))


def _pixel_auroc(model, table) -> float:
    with ThreadPoolExecutor(4) as pool:
        return float(evaluate(model, table, 16, pool).table().loc["mean", "pixel_auroc"])


def test_two_ray_train_workers_fit_prompts_and_head_weights(ray_cluster, synthetic, tmp_path):
    fit_table, held_out = synthetic
    config = TrainConfig(model=MODEL, epochs=4, batch_size=8, seed=111)
    untrained = headclip.create_model(headclip.HeadCLIPConfig(**MODEL))
    before = _pixel_auroc(untrained, held_out)
    data, history = fit(config, fit_table, None, name="two-workers", storage_path=str(tmp_path / "runs"),
                        workers=2)
    losses = [row["loss"] for row in sorted(history, key=lambda r: r["epoch"])]
    assert len(losses) == 4 and losses[-1] < losses[0]

    exported = tmp_path / "fitted.safetensors"
    exported.write_bytes(data)
    fitted = headclip.create_model(checkpoint=str(exported))
    after = _pixel_auroc(fitted, held_out)
    assert after > before + 0.05, (before, after)
    # only the prompts and head weights changed; the backbone is bit-identical
    for key, value in untrained.clip.state_dict().items():
        assert torch.equal(value, fitted.clip.state_dict()[key]), key
    for name, param in untrained.learnable_parameters().items():
        assert not torch.equal(param, fitted.learnable_parameters()[name]), name
    assert fitted.config.pretrained_sha256 == untrained.config.pretrained_sha256
    # the exported checkpoint loads into the scoring job
    images = Path(held_out["image_uri"][0].as_py()).parent
    plan, summary = run_job(job(str(images), str(tmp_path / "scores"), str(exported)))
    assert summary.errors == 0 and summary.checkpoint_id == fitted.checkpoint_id


def test_stopped_run_resumes_from_its_checkpoint(synthetic, tmp_path):
    fit_table, _ = synthetic
    small = fit_table.slice(0, 16)
    storage = str(tmp_path / "runs")
    config = TrainConfig(model=MODEL, epochs=1, batch_size=8)
    _, first = fit(config, small, None, name="resumable", storage_path=storage, workers=0)
    assert [r["epoch"] for r in first] == [1]
    epoch_one = Path(storage) / "resumable" / "checkpoint_epoch_0001" / STATE_FILE
    stamp = epoch_one.stat().st_mtime_ns
    config.epochs = 3
    resumed_bytes, second = fit(config, small, None, name="resumable", storage_path=storage, workers=0)
    assert [r["epoch"] for r in second] == [1, 2, 3]
    assert second[0] == first[0]
    assert epoch_one.stat().st_mtime_ns == stamp  # epoch 1 was not trained again
    states = sorted((Path(storage) / "resumable").glob(f"checkpoint_epoch_*/{STATE_FILE}"))
    assert [json.loads(p.read_text())["epoch"] for p in states] == [1, 2, 3]
    # resuming (model and optimiser state) gives exactly the uninterrupted run
    straight_bytes, _ = fit(config, small, None, name="straight", storage_path=storage, workers=0)
    resumed = headclip.read_checkpoint(_write(tmp_path / "a.safetensors", resumed_bytes))
    straight = headclip.read_checkpoint(_write(tmp_path / "b.safetensors", straight_bytes))
    for name, tensor in straight.tensors.items():
        torch.testing.assert_close(resumed.tensors[name], tensor, rtol=0, atol=1e-6)


def test_ray_train_run_resumes_with_same_name(ray_cluster, synthetic, tmp_path):
    fit_table, _ = synthetic
    small = fit_table.slice(0, 16)
    storage = str(tmp_path / "ray-runs")
    config = TrainConfig(model=MODEL, epochs=1, batch_size=8)
    fit(config, small, None, name="ray-resume", storage_path=storage, workers=2)
    config.epochs = 2
    fit(config, small, None, name="ray-resume", storage_path=storage, workers=2)
    epochs = sorted(json.loads(p.read_text())["epoch"]
                    for p in (Path(storage) / "ray-resume").glob(f"checkpoint_*/{STATE_FILE}"))
    assert epochs == [1, 2]


def test_metrics_from_scoring_actors_match_in_process(ray_cluster, synthetic, tmp_path):
    _, held_out = synthetic
    model = headclip.create_model(headclip.HeadCLIPConfig(**MODEL))
    checkpoint = str(tmp_path / "m.safetensors")
    headclip.save_checkpoint(model, checkpoint)
    config = job("held-out", str(tmp_path / "eval"), checkpoint, shard_size=7, actors=2, cpus_per_actor=1)
    from headclip.scoring.runner import execute, prepare

    plan = prepare(config, held_out)
    summary = execute(plan, config)
    with ThreadPoolExecutor(4) as pool:
        reference = evaluate(model, held_out, 8, pool).table()
    merged = summary.metrics.table()
    assert list(merged.index) == list(reference.index) == ["tiles", "wood", "mean"]
    np.testing.assert_allclose(merged.to_numpy(dtype=float), reference.to_numpy(dtype=float), atol=1e-6)
    # rerunning reads the stored per-shard states back
    again = execute(prepare(config, held_out), config)
    assert again.shards_skipped == plan.num_shards
    np.testing.assert_allclose(again.metrics.table().to_numpy(dtype=float), merged.to_numpy(dtype=float))


def _write(path: Path, data: bytes) -> str:
    path.write_bytes(data)
    return str(path)
