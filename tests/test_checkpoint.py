"""Checkpoints: safetensors + JSON through fsspec, mismatches, AnomalyCLIP import."""

from __future__ import annotations

import json
import pickle

import open_clip
import pytest
import torch

import headclip
from headclip.model.checkpoint import CheckpointError, read_checkpoint

from .conftest import tiny_config


def _trained_model():
    model = headclip.create_model(tiny_config(alpha=0.25, sigma=2.0, aggregate="topk_mean", top_k=7))
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for param in model.learnable_parameters().values():
            param.add_(torch.randn(param.shape, generator=generator) * 0.1)
    return model


def _assert_same_learned_state(a, b):
    for name, param in a.learnable_parameters().items():
        assert torch.equal(param, b.learnable_parameters()[name]), name


def test_local_round_trip_is_exact(tmp_path):
    model = _trained_model()
    path = str(tmp_path / "m.safetensors")
    ckpt_id = headclip.save_checkpoint(model, path)
    loaded = headclip.create_model(checkpoint=path)
    _assert_same_learned_state(model, loaded)
    assert loaded.checkpoint_id == ckpt_id
    assert loaded.config.alpha == 0.25 and loaded.config.aggregate == "topk_mean" and loaded.config.top_k == 7
    assert loaded.config.vv_start_layer == 2 and loaded.config.map_layers == (2, 3, 5, 6)
    images = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8)
    assert torch.equal(model.score(images).joint_score, loaded.score(images).joint_score)
    # the id is the sha256 of the content, and the content is deterministic
    assert headclip.save_checkpoint(loaded, str(tmp_path / "again.safetensors")) == ckpt_id
    import hashlib

    assert hashlib.sha256(open(path, "rb").read()).hexdigest() == ckpt_id
    assert headclip.save_checkpoint(model, "file://" + str(tmp_path / "u.safetensors")) == ckpt_id


def test_checkpoint_holds_only_learned_state_and_config(tmp_path):
    from safetensors import safe_open

    path = str(tmp_path / "m.safetensors")
    headclip.save_checkpoint(_trained_model(), path)
    with safe_open(path, "pt") as handle:
        keys = set(handle.keys())
        meta = json.loads(handle.metadata()["headclip"])
    assert keys == {"prompt.ctx_normal", "prompt.ctx_abnormal", "prompt.deep", "vision.head_weights"}
    config = meta["config"]
    for field in ("backbone", "pretrained", "pretrained_sha256", "image_size", "map_layers", "alpha", "sigma", "aggregate"):
        assert field in config
    assert config["pos_embedding_interpolation"] == "bilinear"
    assert meta["headclip_version"] == headclip.__version__


def test_checkpoint_without_interpolation_mode_keeps_bicubic(tmp_path, caplog):
    """Checkpoints written before the setting existed were fitted with bicubic position embeddings."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    model = _trained_model()
    path = str(tmp_path / "new.safetensors")
    headclip.save_checkpoint(model, path)
    with safe_open(path, "pt") as handle:
        meta = json.loads(handle.metadata()["headclip"])
    del meta["config"]["pos_embedding_interpolation"]
    old = str(tmp_path / "old.safetensors")
    save_file(load_file(path), old, metadata={"headclip": json.dumps(meta, sort_keys=True)})
    with caplog.at_level("INFO", logger="headclip.model.checkpoint"):
        loaded = headclip.create_model(checkpoint=old)
    assert loaded.config.pos_embedding_interpolation == "bicubic"
    assert any("old.safetensors" in r.getMessage() and "bicubic" in r.getMessage() for r in caplog.records)
    bicubic = headclip.create_model(tiny_config(pos_embedding_interpolation="bicubic"))
    assert torch.equal(loaded.vision.pos_embedding, bicubic.vision.pos_embedding)
    _assert_same_learned_state(model, loaded)
    assert headclip.create_model(checkpoint=path).config.pos_embedding_interpolation == "bilinear"


def test_s3_round_trip(s3_bucket):
    bucket, options = s3_bucket
    model = _trained_model()
    uri = f"{bucket}/models/headclip.safetensors"
    ckpt_id = headclip.save_checkpoint(model, uri, storage_options=options)
    loaded = headclip.create_model(checkpoint=uri, storage_options=options)
    _assert_same_learned_state(model, loaded)
    assert loaded.checkpoint_id == ckpt_id


def _register_wide_backbone(tmp_path):
    cfg = json.loads((headclip.model.backbone.MODEL_CONFIG_DIR / "HeadCLIP-Tiny.json").read_text())
    cfg["text_cfg"]["width"] = 96
    cfg["vision_cfg"]["layers"] = 8
    (tmp_path / "HeadCLIP-Test-Wide.json").write_text(json.dumps(cfg))
    open_clip.add_model_config(tmp_path / "HeadCLIP-Test-Wide.json")


def test_mismatched_checkpoint_fails_with_one_line(tmp_path):
    _register_wide_backbone(tmp_path)
    path = str(tmp_path / "m.safetensors")
    headclip.save_checkpoint(_trained_model(), path)
    with pytest.raises(CheckpointError) as err:
        headclip.create_model(checkpoint=path, backbone="HeadCLIP-Test-Wide")
    message = str(err.value)
    assert "\n" not in message
    assert "does not match backbone HeadCLIP-Test-Wide" in message
    assert "width 64" in message and "width 96" in message
    # a layer-count mismatch names the head weights
    model = headclip.create_model(tiny_config(vv_start_layer=3))
    headclip.save_checkpoint(model, path)
    with pytest.raises(CheckpointError, match="head weights cover 4 layers x 4 heads.*5 adapted layers") as err:
        headclip.create_model(checkpoint=path, vv_start_layer=2)
    assert "\n" not in str(err.value)


def test_unreadable_checkpoints_fail_clearly(tmp_path):
    with pytest.raises(CheckpointError, match="cannot read checkpoint"):
        read_checkpoint(str(tmp_path / "missing.safetensors"))
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError, match="not a safetensors file"):
        read_checkpoint(str(junk))
    from safetensors.torch import save_file

    plain = tmp_path / "plain.safetensors"
    save_file({"x": torch.zeros(2)}, str(plain))
    with pytest.raises(CheckpointError, match="without a HeadCLIP config"):
        read_checkpoint(str(plain))


def _anomalyclip_state(width: int = 64, dtype=torch.float16) -> dict:
    generator = torch.Generator().manual_seed(2)
    state = {
        "ctx_pos": torch.randn(1, 1, 12, width, generator=generator).to(dtype),
        "ctx_neg": torch.randn(1, 1, 12, width, generator=generator).to(dtype),
        "token_prefix_pos": torch.randn(1, 1, 1, width).to(dtype),
        "token_suffix_neg": torch.randn(1, 1, 64, width).to(dtype),
    }
    for i in range(8):
        state[f"compound_prompts_text.{i}"] = torch.randn(4, width, generator=generator).to(dtype)
    return {"prompt_learner": state}


def test_anomalyclip_import(tmp_path):
    source = tmp_path / "epoch_15.pth"
    original = _anomalyclip_state()
    torch.save(original, source)
    output = str(tmp_path / "imported.safetensors")
    ckpt_id = headclip.import_anomalyclip(str(source), output, tiny_config())
    model = headclip.create_model(checkpoint=output)
    assert model.checkpoint_id == ckpt_id
    state = original["prompt_learner"]
    assert torch.equal(model.prompt.ctx_normal, state["ctx_pos"][0, 0].float())
    assert torch.equal(model.prompt.ctx_abnormal, state["ctx_neg"][0, 0].float())
    for i in range(8):
        assert torch.equal(model.prompt.deep[i], state[f"compound_prompts_text.{i}"].float())
    assert torch.equal(model.vision.head_weights, torch.ones(5, 4))
    assert model.config.pretrained is None and model.config.backbone == "HeadCLIP-Tiny"


def test_anomalyclip_import_refuses_wrong_width_and_code(tmp_path):
    source = tmp_path / "wide.pth"
    torch.save(_anomalyclip_state(width=768), source)
    with pytest.raises(CheckpointError, match="width 768"):
        headclip.import_anomalyclip(str(source), str(tmp_path / "o.safetensors"), tiny_config())

    class Payload:
        def __reduce__(self):
            return (print, ("unpickled code ran",))

    evil = tmp_path / "evil.pth"
    with open(evil, "wb") as handle:
        pickle.dump({"prompt_learner": Payload()}, handle)
    with pytest.raises(CheckpointError, match="not a weights-only torch file"):
        headclip.import_anomalyclip(str(evil), str(tmp_path / "o.safetensors"), tiny_config())
