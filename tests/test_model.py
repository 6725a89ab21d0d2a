"""The HeadCLIP model on the tiny backbone with random weights."""

from __future__ import annotations

import json
import math

import open_clip
import pytest
import torch
import torch.nn.functional as F

import headclip
from headclip.model.vision import interpolate_pos_embedding

from .conftest import tiny_config


def _images(n: int, size: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=generator)


@pytest.mark.parametrize("size", [32, 64, 96])
def test_output_shapes_and_ranges(size):
    model = headclip.create_model(tiny_config(image_size=size))
    out = model.score(_images(3, size))
    assert out.joint_score.shape == (3,)
    assert out.global_score.shape == (3,)
    assert out.anomaly_map.shape == (3, size, size)
    assert out.anomaly_map.dtype == torch.float32
    for tensor in (out.joint_score, out.global_score, out.anomaly_map):
        assert float(tensor.min()) >= 0.0 and float(tensor.max()) <= 1.0
    assert model.vision.grid == size // 16
    assert model.vision.pos_embedding.shape == (1 + (size // 16) ** 2, 64)


def test_default_layers_follow_the_paper():
    config = headclip.HeadCLIPConfig()
    assert (config.backbone, config.pretrained, config.image_size) == ("ViT-L-14-336", "openai", 518)
    from headclip.model.config import default_vv_start_layer

    assert default_vv_start_layer(24) == 6  # the last 19 blocks of 24
    assert 24 - default_vv_start_layer(24) + 1 == 19
    assert default_vv_start_layer(12) == 3


def _tower_config(tmp_path, depth: int, **changes) -> headclip.HeadCLIPConfig:
    """The tiny backbone with a vision tower of ``depth`` layers, registered with open_clip."""
    cfg = json.loads((headclip.model.backbone.MODEL_CONFIG_DIR / "HeadCLIP-Tiny.json").read_text())
    cfg["vision_cfg"]["layers"] = depth
    name = f"HeadCLIP-Test-Depth{depth}"
    (tmp_path / f"{name}.json").write_text(json.dumps(cfg))
    open_clip.add_model_config(tmp_path / f"{name}.json")
    return tiny_config(backbone=name, **changes)


# AnomalyCLIP's features_list is 6, 12, 18, 24 of ViT-L's 24 layers: the quarter
# points depth * k / 4, k = 1..4. For 6 layers they are 1.5, 3, 4.5, 6, rounded
# half up to 2, 3, 5, 6.
@pytest.mark.parametrize("depth, vv_start, quarter_points", [
    (24, 6, (6, 12, 18, 24)),
    (12, 3, (3, 6, 9, 12)),
    (6, 2, (2, 3, 5, 6)),
])
def test_default_map_layers_are_the_towers_quarter_points(tmp_path, depth, vv_start, quarter_points):
    model = headclip.create_model(_tower_config(tmp_path, depth))
    assert model.vision.depth == depth and model.vision.vv_start_layer == vv_start
    assert model.vision.map_layers == quarter_points
    # the training forward and scoring both read every map layer
    with torch.no_grad():
        logits = model(model.normalize(_images(1, 64)))
    assert len(logits.patch_logits) == 4
    assert model.score(_images(1, 64)).anomaly_map.shape == (1, 64, 64)


def test_default_map_layers_never_precede_the_first_vv_layer(tmp_path):
    # quarter points 2, 3, 5, 6 of 6; those before layer 4 move up to it
    model = headclip.create_model(tiny_config(vv_start_layer=4))
    assert model.vision.map_layers == (4, 5, 6)
    two = headclip.create_model(_tower_config(tmp_path, 2))  # quarter points 0.5, 1, 1.5, 2
    assert two.vision.vv_start_layer == 1 and two.vision.map_layers == (1, 2)


def test_joint_score_mixes_global_and_map():
    model = headclip.create_model(tiny_config(alpha=0.3))
    out = model.score(_images(2, 64))
    expected = 0.3 * out.global_score + 0.7 * out.anomaly_map.flatten(1).amax(1)
    torch.testing.assert_close(out.joint_score, expected)
    topk = headclip.create_model(tiny_config(aggregate="topk_mean", top_k=10))
    out = topk.score(_images(2, 64))
    expected = 0.5 * out.global_score + 0.5 * out.anomaly_map.flatten(1).topk(10).values.mean(1)
    torch.testing.assert_close(out.joint_score, expected)


def test_unit_head_weights_equal_anomalyclip_mode(tiny_model):
    images = _images(2, 64)
    anomalyclip = headclip.create_model(tiny_config(head_weights=False))
    anomalyclip.load_state_dict(tiny_model.state_dict())
    ours, ref = tiny_model.score(images), anomalyclip.score(images)
    assert torch.equal(ours.anomaly_map, ref.anomaly_map)
    assert torch.equal(ours.joint_score, ref.joint_score)
    on_both = headclip.create_model(tiny_config(head_weights_on_original=True))
    assert torch.equal(on_both.score(images).anomaly_map, ref.anomaly_map)


def test_changing_one_head_weight_changes_the_map():
    model = headclip.create_model(tiny_config())
    images = _images(2, 64)
    before = model.score(images)
    with torch.no_grad():
        model.vision.head_weights[-1, 2] = 0.25
    after = model.score(images)
    assert not torch.allclose(before.anomaly_map, after.anomaly_map)
    # the original path, and with it the global score, is untouched by default
    assert torch.equal(before.global_score, after.global_score)
    both = headclip.create_model(tiny_config(head_weights_on_original=True))
    with torch.no_grad():
        both.vision.head_weights[-1, 2] = 0.25
    assert not torch.equal(both.score(images).global_score, before.global_score)


def test_batch_equals_single_images(tiny_model):
    images = _images(4, 64, seed=3)
    batch = tiny_model.score(images)
    for i in range(4):
        single = tiny_model.score(images[i:i + 1])
        torch.testing.assert_close(single.anomaly_map[0], batch.anomaly_map[i], rtol=0, atol=1e-5)
        torch.testing.assert_close(single.joint_score[0], batch.joint_score[i], rtol=0, atol=1e-5)
        torch.testing.assert_close(single.global_score[0], batch.global_score[i], rtol=0, atol=1e-5)


def test_optimiser_step_changes_only_learned_parameters():
    model = headclip.create_model(tiny_config())
    model.train()
    assert not model.clip.training
    backbone_before = {k: v.clone() for k, v in model.clip.state_dict().items()}
    learned_before = {k: v.detach().clone() for k, v in model.learnable_parameters().items()}
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert {id(p) for p in trainable} == {id(p) for p in model.learnable_parameters().values()}
    optimiser = torch.optim.Adam(trainable, lr=1e-2)
    logits = model(model.normalize(_images(2, 64)))
    target = torch.tensor([0, 1])
    loss = F.cross_entropy(logits.global_logits, target) + sum(
        F.cross_entropy(l, torch.ones(l.shape[0], *l.shape[2:], dtype=torch.long)) for l in logits.patch_logits
    )
    loss.backward()
    optimiser.step()
    for key, value in model.clip.state_dict().items():
        assert torch.equal(value, backbone_before[key]), key
    for key, param in model.learnable_parameters().items():
        assert not torch.equal(param.detach(), learned_before[key]), key


def test_text_features_are_cached_until_prompts_change():
    model = headclip.create_model(tiny_config())
    with torch.inference_mode():
        first = model.text_features()
        assert model.text_features() is first
    with torch.no_grad():
        model.prompt.ctx_abnormal.add_(0.5)
    with torch.inference_mode():
        second = model.text_features()
    assert second is not first and not torch.allclose(first, second)


def test_original_path_equals_open_clip():
    """At the native size, with ln_post, the class token is open_clip's image embedding."""
    model = headclip.create_model(tiny_config(image_size=224, class_token_layernorm=True))
    images = model.normalize(_images(2, 224))
    with torch.no_grad():
        features = model.vision(images)
        ours = model.vision.project(features.class_token, layernorm=True)
        reference = model.clip.encode_image(images)
    torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-5)


def test_prompt_text_path_equals_open_clip_for_real_words():
    """With deep prompts off and context vectors set to word embeddings, the
    prompt features are open_clip's text embedding of that sentence."""
    model = headclip.create_model(tiny_config(deep_prompt_length=0))
    tokenizer = __import__("open_clip").get_tokenizer("HeadCLIP-Tiny")
    words = "a photo of the big red car on a wet grey road".split()
    assert len(words) == 12
    sentence = tokenizer([" ".join(words) + " object."])
    assert int(sentence.argmax()) == 1 + 12 + 2  # one token per word, then "object", "."
    with torch.no_grad():
        embedded = model.clip.token_embedding(sentence)[0, 1:13]
        model.prompt.ctx_normal.copy_(embedded)
        ours = model.prompt()[0]
        reference = model.clip.encode_text(sentence)[0]
    torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-5)


def test_deep_prompts_replace_tokens_in_their_layers():
    model = headclip.create_model(tiny_config())
    assert model.prompt.deep.shape == (8, 4, 64)  # text layers 2..9
    with torch.no_grad():
        base = model.prompt().clone()
        model.prompt.deep[7].add_(1.0)  # layer 9's prompt
        changed = model.prompt()
    assert not torch.allclose(base, changed)


def _plain_vv_attention(block, x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """softmax(V V^T * scale) V per head and token, with explicit loops; x: (N, D)."""
    attn = block.attn
    heads, dim = attn.num_heads, attn.embed_dim
    head_dim = dim // heads
    hidden = block.ln_1(x)
    w_v = attn.in_proj_weight[2 * dim:]
    b_v = attn.in_proj_bias[2 * dim:]
    values = hidden @ w_v.t() + b_v  # (N, D)
    out = torch.zeros_like(values)
    scale = 1.0 / math.sqrt(head_dim)
    for h in range(heads):
        v = values[:, h * head_dim:(h + 1) * head_dim]
        for i in range(v.shape[0]):
            scores = torch.stack([torch.dot(v[i], v[j]) * scale for j in range(v.shape[0])])
            probs = torch.exp(scores - scores.max())
            probs = probs / probs.sum()
            mixed = sum(probs[j] * v[j] for j in range(v.shape[0]))
            out[i, h * head_dim:(h + 1) * head_dim] = weights[h] * mixed
    return out @ attn.out_proj.weight.t() + attn.out_proj.bias


def test_vv_attention_of_one_block_equals_plain_loop():
    model = headclip.create_model(tiny_config(image_size=32))
    block = model.clip.visual.transformer.resblocks[3]
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(1, 5, 64, generator=generator, dtype=torch.float64)
    x_vv = torch.randn(1, 5, 64, generator=generator, dtype=torch.float64)
    weights = torch.tensor([1.0, 0.5, 2.0, 0.0], dtype=torch.float64)
    model = model.double()
    with torch.no_grad():
        new_x, new_vv = model.vision.block_forward(block, x, x_vv, weights)
        expected_vv = x_vv[0] + _plain_vv_attention(block, x[0], weights)
        expected_x = block(x)  # open_clip's own block: the original path
    torch.testing.assert_close(new_vv[0], expected_vv, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(new_x, expected_x, rtol=1e-10, atol=1e-10)


def test_positional_embedding_interpolation():
    pos = torch.randn(1 + 14 * 14, 8)
    same = interpolate_pos_embedding(pos, 14)
    assert torch.equal(same, pos)
    resized = interpolate_pos_embedding(pos, 37)
    assert resized.shape == (1 + 37 * 37, 8)
    assert torch.equal(resized[0], pos[0])


def _resized_grid(pos: torch.Tensor, grid: int, mode: str) -> torch.Tensor:
    """AnomalyCLIP's VisionTransformer.forward: the patch positions as a (1, width, g, g) image,
    ``F.interpolate(..., (grid, grid), mode)`` with the default align_corners (False), class position kept."""
    side = int(round((pos.shape[0] - 1) ** 0.5))
    patches = pos[1:].reshape(1, side, side, -1).permute(0, 3, 1, 2)
    patches = F.interpolate(patches, (grid, grid), mode=mode, align_corners=False)
    return torch.cat([pos[:1], patches.reshape(1, -1, grid * grid).transpose(1, 2)[0]], dim=0)


def test_position_embeddings_are_resized_bilinearly_as_anomalyclip():
    pos = torch.randn(1 + 14 * 14, 8, generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(interpolate_pos_embedding(pos, 37), _resized_grid(pos, 37, "bilinear"),
                               rtol=0, atol=1e-6)
    torch.testing.assert_close(interpolate_pos_embedding(pos, 37, "bicubic"), _resized_grid(pos, 37, "bicubic"),
                               rtol=0, atol=1e-6)
    # the model's default: the tiny tower's 14 x 14 grid resized to 4 x 4 for 64 px inputs
    model = headclip.create_model(tiny_config())
    assert model.config.pos_embedding_interpolation == "bilinear"
    expected = _resized_grid(model.clip.visual.positional_embedding.detach(), 4, "bilinear")
    torch.testing.assert_close(model.vision.pos_embedding, expected, rtol=0, atol=1e-6)
    bicubic = headclip.create_model(tiny_config(pos_embedding_interpolation="bicubic"))
    assert not torch.allclose(bicubic.vision.pos_embedding, expected)
    with pytest.raises(ValueError, match="pos_embedding_interpolation must be one of"):
        tiny_config(pos_embedding_interpolation="nearest")


def test_invalid_settings_fail_with_one_line():
    with pytest.raises(ValueError, match="not a multiple of the patch size"):
        headclip.create_model(tiny_config(image_size=70))
    with pytest.raises(ValueError, match="map layer 1 must lie between"):
        headclip.create_model(tiny_config(map_layers=(1,)))
    with pytest.raises(ValueError, match="aggregate must be one of"):
        tiny_config(aggregate="median")
    with pytest.raises(ValueError, match="unknown open_clip model"):
        headclip.create_model(tiny_config(backbone="ViT-Q-99"))


def test_several_map_layers_are_averaged():
    model = headclip.create_model(tiny_config(map_layers=(4, 6)))
    images = model.normalize(_images(2, 64))
    with torch.no_grad():
        logits = model(images)
    assert len(logits.patch_logits) == 2
    global_score, anomaly_map = model.anomaly_probabilities(logits)
    mean_prob = torch.stack([l.softmax(1)[:, 1] for l in logits.patch_logits]).mean(0)
    upsampled = F.interpolate(mean_prob[:, None], size=(64, 64), mode="bilinear", align_corners=False)[:, 0]
    from headclip.model.smoothing import gaussian_blur

    torch.testing.assert_close(anomaly_map, gaussian_blur(upsampled, 4.0))


def _dpam_attention(block, x: torch.Tensor, weights) -> torch.Tensor:
    """The V-V path's attention output of one open_clip block, written out per head.

    x: (B, N, D), the original path entering the block (both paths read its
    ``ln_1``); per head h, ``w_h * softmax(V_h V_h^T / sqrt(d)) V_h``; the heads
    are concatenated and only then sent through the block's out-projection.
    ``weights`` None: AnomalyCLIP's DPAM, no head weights at all.
    """
    attn = block.attn
    dim, heads = attn.embed_dim, attn.num_heads
    head_dim = dim // heads
    values = F.linear(block.ln_1(x), attn.in_proj_weight[2 * dim:], attn.in_proj_bias[2 * dim:])
    per_head = []
    for h in range(heads):
        v = values[..., h * head_dim:(h + 1) * head_dim]
        mixed = torch.softmax(v @ v.transpose(-1, -2) / math.sqrt(head_dim), dim=-1) @ v
        per_head.append(mixed if weights is None else weights[h] * mixed)
    return attn.out_proj(torch.cat(per_head, dim=-1))


def _anomalyclip_vision(model, images: torch.Tensor, weights) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Reference dual-path vision forward built from open_clip's own modules.

    The original path is open_clip's plain block forward, layer by layer. The
    V-V path starts from the hidden state entering the first V-V layer and adds
    :func:`_dpam_attention` of every later block (no MLP). ``weights``: None,
    or (adapted layers, heads). Returns the final class token and the V-V patch
    tokens (class token removed) of each map layer.
    """
    visual = model.clip.visual
    assert visual.positional_embedding.shape[0] == 1 + model.vision.grid ** 2  # native size: no interpolation
    x = visual.conv1(images).flatten(2).transpose(1, 2)
    cls = visual.class_embedding.view(1, 1, -1).expand(x.shape[0], -1, -1)
    x = visual.ln_pre(visual.patch_dropout(torch.cat([cls, x], dim=1) + visual.positional_embedding))
    start, x_vv, tokens = model.vision.vv_start_layer, None, {}
    for layer, block in enumerate(visual.transformer.resblocks, start=1):
        assert isinstance(block.ls_1, torch.nn.Identity)  # AnomalyCLIP's blocks have no layer scale
        if layer >= start:
            x_vv = x if x_vv is None else x_vv
            x_vv = x_vv + _dpam_attention(block, x, None if weights is None else weights[layer - start])
        x = block(x)  # open_clip's own block: the original path
        tokens[layer] = None if x_vv is None else x_vv[:, 1:]
    return x[:, 0], [tokens[layer] for layer in model.vision.map_layers]


def _maps_from_tokens(model, class_token, patch_tokens):
    """HeadCLIP's head (projection, text similarity, map) on given vision features."""
    from unittest import mock

    from headclip.model.vision import VisionFeatures

    with mock.patch.object(model.vision, "forward", lambda images: VisionFeatures(class_token, patch_tokens)):
        return model.anomaly_probabilities(model(None))


@pytest.mark.parametrize("map_layers", [(6,), (2, 4, 6)])
@pytest.mark.parametrize("head_weights", ["ones", "random"])
def test_vision_encoder_equals_anomalyclip_reference(map_layers, head_weights):
    """README: "with all weights at 1 the model is AnomalyCLIP exactly", and weights scale heads.

    The reference is built from open_clip's blocks (plain block forward for the
    original path, the V-V sum written out per head), in float64, at the
    backbone's native 224 px. It catches: head weights applied after the
    out-projection (or to V before the attention), the V-V path reading its own
    hidden state instead of the original path's, a wrong softmax scale or axis,
    an MLP on the V-V path, a V-V path starting at another layer, and weights
    of 1 that are not the identity.
    """
    model = headclip.create_model(tiny_config(image_size=224, map_layers=map_layers)).double()
    assert model.vision.vv_start_layer == 2 and model.vision.head_weights.shape == (5, 4)
    if head_weights == "random":
        generator = torch.Generator().manual_seed(5)
        with torch.no_grad():
            model.vision.head_weights.copy_(torch.rand(5, 4, generator=generator, dtype=torch.float64) * 2)
        weights = model.vision.head_weights.detach().clone()
    else:
        assert torch.equal(model.vision.head_weights, torch.ones(5, 4, dtype=torch.float64))
        weights = None  # AnomalyCLIP: no head weights at all
    images = model.normalize(_images(2, 224, seed=4)).double()
    with torch.no_grad():
        features = model.vision(images)
        ref_class, ref_tokens = _anomalyclip_vision(model, images, weights)
        assert len(features.patch_tokens) == len(ref_tokens) == len(map_layers)
        torch.testing.assert_close(features.class_token, ref_class, rtol=1e-10, atol=1e-10)
        for ours, ref in zip(features.patch_tokens, ref_tokens):
            torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-10)
        global_score, anomaly_map = model.anomaly_probabilities(model(images))
        ref_global, ref_map = _maps_from_tokens(model, ref_class, ref_tokens)
    torch.testing.assert_close(anomaly_map, ref_map, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(global_score, ref_global, rtol=1e-9, atol=1e-9)
    if head_weights == "random":  # the weights matter: the unweighted reference differs
        with torch.no_grad():
            _, unweighted = _anomalyclip_vision(model, images, None)
        assert (features.patch_tokens[-1] - unweighted[-1]).abs().max() > 1e-3


def test_patch_features_leave_the_scores_unchanged_and_give_the_map_logits(tiny_model):
    images = _images(3, 64, seed=5)
    plain, with_features = tiny_model.score(images), tiny_model.score(images, patch_features=True)
    assert plain.patch_features is None
    for name in ("joint_score", "global_score", "anomaly_map"):
        assert torch.equal(getattr(plain, name), getattr(with_features, name))
    features = with_features.patch_features
    layers = len(tiny_model.vision.map_layers)
    grid = tiny_model.vision.grid
    assert features.shape == (3, grid * grid, layers, tiny_model.clip.visual.output_dim)
    torch.testing.assert_close(features.norm(dim=-1), torch.ones(3, grid * grid, layers))
    # each layer's features are the vectors its logits compare with the text
    with torch.no_grad():
        logits = tiny_model(tiny_model.normalize(images))
        text = tiny_model.text_features()
    for layer in range(layers):
        expected = (features[:, :, layer] @ text.t() / tiny_model.config.temperature).transpose(1, 2)
        torch.testing.assert_close(expected.reshape(3, 2, grid, grid), logits.patch_logits[layer].float())
