"""Fitting prompts and head weights: Ray Train with 2 workers, in-process runs, resume, evaluation."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

import headclip
from headclip.data.datasets import load_dataset
from headclip.model.assets import DEMO_BACKBONE
from headclip.training.launcher import fit
from headclip.training.loop import MODEL_FILE, OPTIMIZER_FILE, STATE_FILE, TrainConfig, evaluate
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


def test_fitting_prompts_and_head_weights_helps_on_held_out_classes(ray_cluster, synthetic, tmp_path):
    """Fitting helps on held-out classes and changes only the learned parts. It runs in this
    process (workers 0): that two Ray Train workers compute exactly what it does (averaged
    gradients, same batches) is checked in test_ray_train_run_resumes_with_same_name."""
    fit_table, held_out = synthetic
    config = TrainConfig(model=MODEL, epochs=4, batch_size=8, seed=111)
    untrained = headclip.create_model(headclip.HeadCLIPConfig(**MODEL))
    before = _pixel_auroc(untrained, held_out)
    data, history = fit(config, fit_table, None, name="fit", storage_path=str(tmp_path / "runs"),
                        workers=0)
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
    """Two Ray Train workers equal one in-process worker on the same batches, and a resumed run
    equals an uninterrupted one.

    16 images, global batch 8: each step's two halves of 4 images are the in-process
    step's batch, and the loss is a mean over images (cross-entropy, focal over
    equal-sized maps, Dice per image), so the averaged gradients of the halves are the
    full batch's gradient. Catches: gradients summed instead of averaged across workers
    (Adam's step is nearly scale-free, so the learned tensors alone would not show it; its
    moments double), gradients not reduced at all, workers reading the wrong share, a
    resume that trains epoch 1 again, or restores the model without the optimiser state.
    """
    fit_table, _ = synthetic
    small = fit_table.slice(0, 16)
    storage = str(tmp_path / "ray-runs")
    config = TrainConfig(model=MODEL, epochs=1, batch_size=8)
    _, first = fit(config, small, None, name="ray-resume", storage_path=storage, workers=2)
    assert [r["epoch"] for r in first] == [1]
    (epoch_one,) = _ray_checkpoints(Path(storage) / "ray-resume").values()
    stamps = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in epoch_one.iterdir()}
    config.epochs = 2
    _, second = fit(config, small, None, name="ray-resume", storage_path=storage, workers=2)
    checkpoints = _ray_checkpoints(Path(storage) / "ray-resume")
    epochs = sorted(checkpoints)
    assert epochs == [1, 2]
    # epoch 1 was not trained again: its report is carried over (wall time included), its files untouched
    assert [r["epoch"] for r in second] == [1, 2] and second[0] == first[0]
    assert checkpoints[1] == epoch_one
    assert {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in epoch_one.iterdir()} == stamps

    # the same two epochs, uninterrupted, in this process (workers 0) on the same batches
    fit(config, small, None, name="straight", storage_path=storage, workers=0)
    local = Path(storage) / "straight"
    _assert_same_training(_trained_state(checkpoints[1]), _trained_state(local / "checkpoint_epoch_0001"))
    _assert_same_training(_trained_state(checkpoints[2]), _trained_state(local / "checkpoint_epoch_0002"))


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


def _anomalyclip_focal(logit: torch.Tensor, target: torch.Tensor, gamma: float = 2.0,
                       smooth: float = 1e-5) -> torch.Tensor:
    """AnomalyCLIP's loss.py FocalLoss (apply_nonlin None, alpha None, size_average): (N, C, H, W) probabilities."""
    num_class = logit.shape[1]
    logit = logit.reshape(logit.shape[0], num_class, -1).permute(0, 2, 1).reshape(-1, num_class)
    target = target.reshape(-1, 1)
    one_hot_key = torch.zeros(target.shape[0], num_class).scatter_(1, target.long(), 1)
    one_hot_key = torch.clamp(one_hot_key, smooth / (num_class - 1), 1.0 - smooth)
    pt = (one_hot_key * logit).sum(1) + smooth
    return (-1 * torch.pow(1 - pt, gamma) * pt.log()).mean()


def _anomalyclip_dice(input: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """AnomalyCLIP's loss.py BinaryDiceLoss."""
    n = targets.shape[0]
    input_flat, targets_flat = input.reshape(n, -1), targets.reshape(n, -1)
    dice = (2 * (input_flat * targets_flat).sum(1) + 1) / (input_flat.sum(1) + targets_flat.sum(1) + 1)
    return 1 - dice.sum() / n


def test_loss_is_anomalyclips_over_four_layers():
    """AnomalyCLIP's train.py: image cross-entropy + 4 * sum over layers (focal + dice + dice)."""
    from headclip.training.loss import headclip_loss

    model = headclip.create_model(headclip.HeadCLIPConfig(backbone="HeadCLIP-Tiny", pretrained=None, image_size=64))
    generator = torch.Generator().manual_seed(7)
    images = torch.randint(0, 256, (4, 3, 64, 64), dtype=torch.uint8, generator=generator)
    labels = torch.tensor([0, 1, 1, 0])
    masks = torch.zeros(4, 64, 64, dtype=torch.bool)
    masks[1, 10:30, 5:40] = True
    masks[2, 40:60, 30:50] = True
    with torch.no_grad():
        logits = model(model.normalize(images))
    assert len(logits.patch_logits) == 4
    parts = headclip_loss(logits, labels, masks, None)

    gt = masks.float()
    loss = 0
    for layer in logits.patch_logits:
        # compute_similarity: softmax over (normal, abnormal) per patch, (B, N, 2);
        # get_similarity_map: the (side, side) grid upsampled bilinearly to the input
        similarity = layer.flatten(2).transpose(1, 2).softmax(-1)
        side = int(similarity.shape[1] ** 0.5)
        similarity_map = similarity.reshape(4, side, side, 2).permute(0, 3, 1, 2)
        similarity_map = F.interpolate(similarity_map, (64, 64), mode="bilinear")
        loss += _anomalyclip_focal(similarity_map, gt)
        loss += _anomalyclip_dice(similarity_map[:, 1, :, :], gt)
        loss += _anomalyclip_dice(similarity_map[:, 0, :, :], 1 - gt)
    image_loss = F.cross_entropy(logits.global_logits, labels)
    torch.testing.assert_close(parts.pixel, loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(parts.image, image_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(parts.total, 4 * loss + image_loss, rtol=1e-5, atol=1e-6)


def _ray_checkpoints(run_dir: Path) -> dict[int, Path]:
    """Epoch -> checkpoint directory of a Ray Train run."""
    found = {}
    for state in run_dir.glob(f"checkpoint_*/{STATE_FILE}"):
        epoch = json.loads(state.read_text())["epoch"]
        assert epoch not in found, f"epoch {epoch} was checkpointed twice"
        found[epoch] = state.parent
    return found


def _trained_state(directory: Path) -> dict[str, torch.Tensor]:
    """The learned tensors, Adam's moments and step counts of a checkpoint directory."""
    tensors = dict(headclip.read_checkpoint(str(directory / MODEL_FILE)).tensors)
    tensors.update({f"adam.{k}": v for k, v in load_file(str(directory / OPTIMIZER_FILE)).items()})
    steps = json.loads((directory / STATE_FILE).read_text())["steps"]
    tensors.update({f"adam.{k}.step": torch.tensor(v) for k, v in steps.items()})
    return tensors


def _assert_same_training(ours: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]) -> None:
    """Equal up to float32 summation order (two half-batch gradients reduced by gloo against
    one full-batch backward): measured differences are below 1e-6 on the parameters and
    1e-6 of each tensor's scale on the Adam moments; a factor of 2 in the gradients changes
    the first moment by 100 % and the second by 300 %."""
    assert ours.keys() == reference.keys()
    for name, ref in reference.items():
        if name.startswith("adam."):
            atol = 1e-4 * max(float(ref.abs().max()), 1e-6)
            torch.testing.assert_close(ours[name], ref, rtol=1e-3, atol=atol, msg=lambda m: f"{name}: {m}")
        else:  # one Adam step moves a parameter by up to lr = 1e-3
            torch.testing.assert_close(ours[name], ref, rtol=0, atol=1e-5, msg=lambda m: f"{name}: {m}")


def _write(path: Path, data: bytes) -> str:
    path.write_bytes(data)
    return str(path)
