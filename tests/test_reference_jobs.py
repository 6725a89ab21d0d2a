"""jobs.reference builds a bank; jobs.score --reference uses it on Ray, or refuses it before Ray starts."""

from __future__ import annotations

import pytest
import torch

import headclip
from headclip.reference import read_bank
from headclip.storage import results
from headclip.storage.layout import run_uri
from jobs import calibrate as calibrate_job
from jobs import cli
from jobs import evaluate as evaluate_job
from jobs import reference as reference_job
from jobs import score as score_job

from .cli_helpers import job_in_process, one_line_refusal
from .scoring_helpers import write_images


def _exit(main, prog, argv, capsys) -> tuple[int, str]:
    with pytest.raises(SystemExit) as info:
        cli.run(main, prog, argv)
    return info.value.code, capsys.readouterr().err


@pytest.fixture(scope="module")
def known_good(tmp_path_factory, tiny_checkpoint, ray_cluster):
    root = tmp_path_factory.mktemp("ref")
    paths = write_images(root / "img", 8)
    lines = ["image_uri,image_id,line"] + [f"{p},{p.name},{'L1' if i % 2 else 'L2'}" for i, p in enumerate(paths)]
    (root / "good.csv").write_text("\n".join(lines[:7]) + "\n")  # six known-good images
    (root / "all.csv").write_text("\n".join(lines + [f"{paths[0]},elsewhere,L3"]) + "\n")
    bank = root / "bank.safetensors"
    assert reference_job.main(["--input", str(root / "good.csv"), "--output", str(bank), "--group-column", "line",
                               "--checkpoint", tiny_checkpoint, "--budget", "20", "--batch-size", "4"]) == 0
    return root, bank


def test_reference_job_builds_one_bank_per_group(known_good, tiny_checkpoint):
    _, bank_path = known_good
    bank = read_bank(str(bank_path))
    assert bank.groups == ["L1", "L2"] and bank.group_column == "line"
    assert {g: c["images"] for g, c in bank.counts.items()} == {"L1": 3, "L2": 3}
    assert all(c["patches"] == 48 and c["kept"] == 20 and t.shape[0] == 20 for c, t in zip(bank.counts.values(), bank.features.values()))
    assert bank.checkpoint_id == headclip.model.checkpoint.read_checkpoint(tiny_checkpoint).checkpoint_id
    assert bank.image_size == 64 and bank.command.startswith("python -m jobs.reference --input")


def test_reference_job_checks_its_inputs_in_one_line(known_good, tiny_checkpoint, tmp_path, capsys, monkeypatch):
    root, _ = known_good
    monkeypatch.setattr(reference_job, "init_ray", lambda *a: pytest.fail("Ray started"))
    base = ["--input", str(root / "good.csv"), "--output", str(tmp_path / "b.safetensors"),
            "--checkpoint", tiny_checkpoint]
    for extra, message in [(["--group-column", "camera"], "no column 'camera'"),
                           (["--layers", "1,99"], "not map layers"),
                           (["--layers", "x"], "--layers: takes comma-separated block numbers")]:
        code, err = _exit(reference_job.main, "jobs.reference", base + extra, capsys)
        assert code == 2 and len(err.strip().splitlines()) == 1 and message in err, err
    assert not (tmp_path / "b.safetensors").exists()


def test_a_bank_of_another_checkpoint_is_refused_before_ray(known_good, tmp_path, capsys, monkeypatch):
    root, bank = known_good
    model = headclip.create_model(backbone="HeadCLIP-Tiny", pretrained=None, image_size=64)
    with torch.no_grad():
        next(iter(model.learnable_parameters().values())).add_(0.01)
    other = str(tmp_path / "other.safetensors")
    headclip.save_checkpoint(model, other)
    monkeypatch.setattr(score_job, "init_ray", lambda *a: pytest.fail("Ray started"))
    argv = ["--input", str(root / "all.csv"), "--output", str(tmp_path / "o"), "--checkpoint", other]
    code, err = _exit(score_job.main, "jobs.score", argv + ["--reference", str(bank)], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "was built with checkpoint" in err, err
    code, err = _exit(score_job.main, "jobs.score", argv + ["--reference", str(tmp_path / "nope")], capsys)
    assert code == 2 and "cannot read reference bank" in err, err
    assert not (tmp_path / "o").exists()
    # jobs.evaluate and jobs.calibrate with the demo model: the bank is of the tiny checkpoint
    for module in (evaluate_job, calibrate_job):
        monkeypatch.setattr(module, "init_ray", lambda *a: pytest.fail("Ray started"))
    (tmp_path / "labelled.csv").write_text(f"image_uri,label,class_name\n{root}/img/img0000.jpg,0,wood\n")
    for main, argv in [(evaluate_job.main, ["--data", str(tmp_path / "labelled.csv"), "--output", str(tmp_path / "e")]),
                       (calibrate_job.main, ["--input", str(root / "good.csv"), "--output", str(tmp_path / "t.json")])]:
        code, err = _exit(main, "jobs.x", argv + ["--reference", str(bank)], capsys)
        assert code == 2 and len(err.strip().splitlines()) == 1 and "was built with checkpoint" in err, err
    assert not any((tmp_path / name).exists() for name in ("e", "t.json", "t-rows"))


def test_score_job_with_a_bank_on_ray(known_good, tiny_checkpoint, tmp_path, ray_cluster):
    root, bank = known_good
    out = tmp_path / "scores"
    assert score_job.main(["--input", str(root / "all.csv"), "--output", str(out), "--checkpoint", tiny_checkpoint,
                           "--reference", str(bank), "--shard-size", "4", "--cpus-per-actor", "1"]) == 0
    run_dirs = [p for p in out.iterdir() if p.name.startswith("run_id=")]
    frame = results.read_run(str(run_dirs[0])).set_index("image_id")
    assert len(frame) == 9 and (frame["status"] == "ok").all()
    assert frame.loc["elsewhere", "reference_group"] == "*"
    assert (frame.drop(index="elsewhere")["reference_group"] == frame.drop(index="elsewhere")["line"]).all()
    combined = 0.5 * frame["zero_shot_score"] + 0.5 * frame["reference_score"]
    assert ((frame["score"] - combined).abs() < 1e-5).all()
    assert frame["reference_score"].between(0, 1).all()


def _in_process_features(checkpoint, uris):
    """(B, N, layers, E) patch features of ``uris`` from the model in this process, and its map layers:
    read and decoded by the scorer's own loader, batched by its feeder, no Ray."""
    from headclip.scoring.scorer import ImageScorer, ScoringOptions

    with ImageScorer("ref", checkpoint, ScoringOptions(batch_size=len(uris))) as scorer:
        images = list(scorer.loader.iterate([{"image_uri": str(u), "image_id": str(u)} for u in uris]))
        pixels, errors = scorer.feeder.batch(images)
        assert errors == [None] * len(uris)
        return scorer.model.score(pixels, patch_features=True).patch_features, tuple(scorer.model.vision.map_layers)


def _same_bank(a, b):
    assert a.groups == b.groups and a.layers == b.layers and a.counts == b.counts
    for group in a.groups:
        assert torch.allclose(a.features[group], b.features[group], atol=1e-5), group
    assert a.scales == pytest.approx(b.scales, rel=1e-4)


def test_the_ray_bank_is_the_in_process_one(known_good, tiny_checkpoint):
    """The actors' features, gathered on the driver, build the bank the model in this process builds."""
    from headclip.reference import BankBuilder
    from headclip.reference.build import BankSettings

    root, bank_path = known_good
    rows = [line.split(",") for line in (root / "good.csv").read_text().splitlines()[1:]]
    features, map_layers = _in_process_features(tiny_checkpoint, [r[0] for r in rows])
    builder = BankBuilder(map_layers, BankSettings(budget=20))
    builder.add(features, [r[2] for r in rows])
    ray_bank = read_bank(str(bank_path))
    expected = builder.build(ray_bank.checkpoint_id, ray_bank.backbone, 64, ray_bank.embed_dim, "line")
    _same_bank(ray_bank, expected)
    assert ray_bank.groups == ["L1", "L2"] and all(t.shape[0] == 20 for t in ray_bank.features.values())


def test_unreadable_known_good_images_are_counted(known_good, tiny_checkpoint, tmp_path, capsys):
    root, _ = known_good
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    good = (root / "good.csv").read_text().splitlines()[:4]
    lines = good + [f"{tmp_path / 'broken.png'},broken,L1", f"{tmp_path / 'missing.png'},missing,L2"]
    (tmp_path / "m.csv").write_text("\n".join(lines) + "\n")
    code, out, err = job_in_process("reference", ["--input", tmp_path / "m.csv", "--output", tmp_path / "b.safetensors",
                                                  "--checkpoint", tiny_checkpoint, "--group-column", "line",
                                                  "--budget", "100", "--shard-size", "2"], capsys)
    assert code == 0, err
    assert "3 known-good images (2 unreadable)" in out, out
    bank = read_bank(str(tmp_path / "b.safetensors"))
    assert sum(c["images"] for c in bank.counts.values()) == 3
    (tmp_path / "bad.csv").write_text("\n".join(lines[:1] + lines[-2:]) + "\n")
    code, out, err = job_in_process("reference", ["--input", tmp_path / "bad.csv", "--output", tmp_path / "c",
                                                  "--checkpoint", tiny_checkpoint], capsys)
    one_line_refusal(code, err, "none of the 2 known-good images could be read")
    assert not (tmp_path / "c").exists()


def test_patch_caps_rule():
    from headclip.reference.collect import PRESELECT_FACTOR, SCALE_IMAGES, patch_caps

    groups = ["a"] * (SCALE_IMAGES + 10) + ["b"] * 3
    caps = patch_caps(groups, budget=50)
    cap = -(-PRESELECT_FACTOR * 50 // (SCALE_IMAGES + 10))
    assert caps == [0] * SCALE_IMAGES + [cap] * 10 + [0] * 3  # group b: its images are its first ones
    assert patch_caps(groups, budget=50, patches_per_image=cap) == [0] * len(groups)  # the cap saves nothing
    assert patch_caps(groups, budget=50, patches_per_image=cap + 1)[SCALE_IMAGES] == cap


def test_actors_preselect_an_images_patches_as_the_bank_would(known_good, tiny_checkpoint):
    """A capped image sends the patches the bank's own method picks from all of its patches."""
    import numpy as np

    from headclip.reference.build import BankSettings
    from headclip.reference.collect import collect_on_ray
    from headclip.reference.coreset import subsample
    from headclip.scoring.runner import JobConfig
    from headclip.scoring.scorer import ScoringOptions

    root, _ = known_good
    listing = headclip.data.listing.list_images(str(root / "good.csv"))
    features, map_layers = _in_process_features(tiny_checkpoint, listing["image_uri"].to_pylist())
    config = JobConfig(input="", output="", checkpoint=tiny_checkpoint, shard_size=4,
                       scoring=ScoringOptions(batch_size=4))
    caps = [0, 5, 1, 16, 5, 0]
    got = collect_on_ray(listing, config, 64, map_layers, BankSettings(coreset="greedy", seed=3), caps)
    assert sorted(got.features) == list(range(6)) and not got.errors
    for row, cap in enumerate(caps):
        full = features[row].flatten(1)
        expected = full if cap in (0, 16) else full[subsample(full, cap, "greedy", 3 + row)]
        np.testing.assert_allclose(got.features[row], expected.numpy(), atol=1e-5)


def test_a_bank_at_its_own_size_through_the_jobs_on_ray(known_good, tiny_checkpoint, tmp_path, capsys, monkeypatch):
    """jobs.reference --reference-size builds, on Ray, the bank this process builds from the images at that
    side; jobs.score --reference sends each image at both sides through the decode stage and scores as the
    scorer in this process does; a side off the patch grid is one line before Ray."""
    from headclip.reference import BankBuilder
    from headclip.reference.build import BankSettings
    from headclip.scoring.scorer import ImageScorer, ScoringOptions

    root, _ = known_good
    bank_path = tmp_path / "bank96.safetensors"
    code, out, err = job_in_process("reference", ["--input", root / "good.csv", "--output", bank_path,
                                                  "--checkpoint", tiny_checkpoint, "--reference-size", "96",
                                                  "--budget", "1000", "--shard-size", "4"], capsys)
    assert code == 0, err
    assert "at 96px (the model scores at 64px)" in out, out
    bank = read_bank(str(bank_path))
    assert bank.input_size == 96 and bank.image_size == 64 and bank.counts["*"]["patches"] == 6 * 36
    good = [line.split(",") for line in (root / "good.csv").read_text().splitlines()[1:]]
    with ImageScorer("ref", tiny_checkpoint, ScoringOptions(batch_size=8)) as scorer:
        scorer.read_at(96)
        pixels, _ = scorer.feeder.batch(list(scorer.loader.iterate([{"image_uri": r[0], "image_id": r[1]} for r in good])))
        builder = BankBuilder(scorer.model.vision.map_layers, BankSettings(budget=1000))
        builder.add(scorer.model.patch_features(pixels), [None] * len(good))
    _same_bank(bank, builder.build(bank.checkpoint_id, bank.backbone, 64, bank.embed_dim, reference_size=96))

    out_dir = tmp_path / "scores"
    assert score_job.main(["--input", str(root / "all.csv"), "--output", str(out_dir), "--checkpoint", tiny_checkpoint,
                           "--reference", str(bank_path), "--shard-size", "4", "--cpus-per-actor", "1"]) == 0
    run_dir = next(p for p in out_dir.iterdir() if p.name.startswith("run_id="))
    frame = results.read_run(str(run_dir)).set_index("image_id")
    records = [{"image_uri": line.split(",")[0], "image_id": line.split(",")[1]}
               for line in (root / "all.csv").read_text().splitlines()[1:]]
    with ImageScorer("x", tiny_checkpoint, ScoringOptions(batch_size=4, reference=str(bank_path))) as scorer:
        expected = {r["image_id"]: r for r in scorer.score_rows(records)}
    assert len(frame) == 9 and (frame["status"] == "ok").all()
    for image_id, row in expected.items():
        for column in ("score", "reference_score", "zero_shot_score"):
            assert frame.loc[image_id, column] == pytest.approx(row[column], abs=1e-5), (image_id, column)

    monkeypatch.setattr(reference_job, "init_ray", lambda *a: pytest.fail("Ray started"))
    code, err = _exit(reference_job.main, "jobs.reference", ["--input", str(root / "good.csv"), "--output",
                      str(tmp_path / "b.safetensors"), "--checkpoint", tiny_checkpoint, "--reference-size", "72"], capsys)
    one_line_refusal(code, err, "--reference-size 72", "multiple of the patch size 16")
