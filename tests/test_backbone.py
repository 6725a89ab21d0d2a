"""Backbone loading: weight files through fsspec and the QuickGELU rule."""

from __future__ import annotations

import hashlib
import logging

import open_clip
import pytest
import torch
from open_clip.transformer import QuickGELU
from safetensors.torch import save as save_safetensors

import headclip
from headclip.model.backbone import needs_quick_gelu, quickgelu_sha256s, register_model_configs

from .conftest import tiny_config


def _activation(model) -> type:
    return type(model.clip.visual.transformer.resblocks[0].mlp.gelu)


def _reference_state(seed: int = 7) -> dict[str, torch.Tensor]:
    register_model_configs()
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        clip = open_clip.create_model("HeadCLIP-Tiny")
    return {k: v.clone() for k, v in clip.state_dict().items()}


def test_quick_gelu_rule_for_tags_and_names():
    assert needs_quick_gelu("ViT-L-14-336", "openai") is True
    assert needs_quick_gelu("ViT-B-16", "openai") is True
    assert needs_quick_gelu("ViT-B-16", "laion2b_s34b_b88k") is False
    assert needs_quick_gelu("ViT-B-16-quickgelu", None) is True
    assert needs_quick_gelu("ViT-B-16", "openai", explicit=False) is False
    # the released OpenAI files are recognised by their sha256
    digests = quickgelu_sha256s()
    assert "3035c92b350959924f9f00213499208652fc7ea050643e8b385c2dac08641f02" in digests  # ViT-L-14-336px.pt
    assert needs_quick_gelu("ViT-L-14-336", "/w/renamed.pt", weights_sha256=next(iter(digests))) is True


def test_openai_layout_file_selects_quick_gelu(tmp_path):
    state = _reference_state()
    openai_state = dict(state, input_resolution=torch.tensor(224), context_length=torch.tensor(77),
                        vocab_size=torch.tensor(49408))
    path = tmp_path / "openai-style.pt"
    torch.save(openai_state, path)
    model = headclip.create_model(tiny_config(pretrained=str(path)))
    assert _activation(model) is QuickGELU
    assert model.config.quick_gelu is True
    assert model.config.pretrained_sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    for key, value in state.items():
        assert torch.equal(model.clip.state_dict()[key], value), key


def test_open_clip_layout_file_keeps_gelu_unless_told(tmp_path):
    path = tmp_path / "weights.safetensors"
    path.write_bytes(save_safetensors(_reference_state()))
    model = headclip.create_model(tiny_config(pretrained=str(path)))
    assert _activation(model) is torch.nn.GELU
    forced = headclip.create_model(tiny_config(pretrained=str(path), quick_gelu=True))
    assert _activation(forced) is QuickGELU


def test_weight_file_from_s3_and_sha_check(s3_bucket, tmp_path):
    bucket, options = s3_bucket
    import fsspec

    data = save_safetensors({"module." + k: v for k, v in _reference_state().items()})
    uri = f"{bucket}/weights/tiny.safetensors"
    with fsspec.open(uri, "wb", **options) as handle:
        handle.write(data)
    model = headclip.create_model(tiny_config(pretrained=uri), storage_options=options)
    assert model.config.pretrained_sha256 == hashlib.sha256(data).hexdigest()
    with pytest.raises(ValueError, match="the checkpoint expects"):
        headclip.create_model(tiny_config(pretrained=uri, pretrained_sha256="0" * 64), storage_options=options)


def test_weight_file_for_another_backbone_fails_clearly(tmp_path):
    state = _reference_state()
    state["visual.proj"] = torch.zeros(64, 32)
    path = tmp_path / "bad.safetensors"
    path.write_bytes(save_safetensors(state))
    with pytest.raises(ValueError, match="does not fit the backbone: .*visual.proj") as err:
        headclip.create_model(tiny_config(pretrained=str(path)))
    assert "\n" not in str(err.value)


def test_backbone_is_frozen_and_in_eval_mode(tiny_model):
    assert not any(p.requires_grad for p in tiny_model.clip.parameters())
    assert not tiny_model.clip.training


def test_model_load_keeps_open_clip_info_off_the_log(caplog):
    """open_clip logs each load step at INFO on the root logger; none of it reaches the user's log,
    while the library's own line does."""
    from headclip.model.assets import DEMO_CHECKPOINT_URI

    with caplog.at_level(logging.DEBUG):
        headclip.create_model(checkpoint=DEMO_CHECKPOINT_URI)
    from_open_clip = [r.getMessage() for r in caplog.records if "open_clip" in r.pathname]
    assert from_open_clip == [], from_open_clip
    assert any(r.name == "headclip.model.backbone" and r.getMessage().startswith("backbone ") for r in caplog.records)


def test_checkpoint_check_keeps_open_clip_info_off_the_log(caplog):
    """The driver checks a checkpoint against its backbone's structure before Ray starts (tokenizer
    included); open_clip's INFO lines stay off that log too."""
    from headclip.model.assets import DEMO_CHECKPOINT_URI
    from headclip.model.checkpoint import read_checkpoint
    from headclip.model.validate import check_checkpoint

    with caplog.at_level(logging.DEBUG):
        check_checkpoint(read_checkpoint(DEMO_CHECKPOINT_URI), {}, None)
    from_open_clip = [r.getMessage() for r in caplog.records if "open_clip" in r.pathname]
    assert from_open_clip == [], from_open_clip
