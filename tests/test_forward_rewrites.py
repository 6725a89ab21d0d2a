"""The forward-pass rewrites: each equal to the original forward, bf16 within its tolerance, compile, profile."""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import replace
from unittest import mock

import pytest
import torch

import headclip
from headclip.model.inference import FallbackForward, compile_model, prepare_for_inference, set_precision
from headclip.model.profile import architecture_config, flops_per_image, peak_bf16_tflops
from headclip.model.vision import ForwardOptions, attention_backends

from .conftest import tiny_config
from .test_model import _anomalyclip_vision, _images

REFERENCE = ForwardOptions.reference()
REWRITES = {
    "split_sdpa": replace(REFERENCE, split_sdpa=True),
    "class_token_last": replace(REFERENCE, class_token_last=True),
    "fold_head_weights": replace(REFERENCE, fold_head_weights=True),
    "all": ForwardOptions(),
}
CONFIGS = {
    "default": {},  # 64 px (interpolated positions), map layers 2, 3, 5, 6 of 6
    "last_layer_not_a_map_layer": dict(map_layers=(3, 4)),
    "weights_on_original": dict(head_weights_on_original=True),
    "no_head_weights": dict(head_weights=False),
}
# bf16 tower vs fp32 on the same inputs, in probability units: on this test's inputs (tiny
# backbone, random weights) 0.0023 (joint), 0.0042 (global) and 0.0046 (map) at most;
# docs/speed.md states these bounds and the figures measured on ViT-B-16.
BF16_SCORE_TOL = 0.01
BF16_MAP_TOL = 0.02


def _random_head_weights(model, seed: int = 5) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        model.vision.head_weights.copy_(torch.rand(model.vision.head_weights.shape, generator=generator) * 2)


def _outputs(model, options: ForwardOptions, images: torch.Tensor):
    model.vision.options = options
    with torch.no_grad():
        normalised = model.normalize(images)
        features = model.vision(normalised)
        logits = model(normalised)
    return features, logits, model.score(images)


@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("rewrite", REWRITES)
def test_each_rewrite_equals_the_original_forward(rewrite, config):
    model = headclip.create_model(tiny_config(**CONFIGS[config]))
    _random_head_weights(model)
    images = _images(3, 64, seed=7)
    ref_features, ref_logits, ref_scores = _outputs(model, REFERENCE, images)
    features, logits, scores = _outputs(model, REWRITES[rewrite], images)

    def close(a, b):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)

    close(features.class_token, ref_features.class_token)
    for ours, ref in zip(features.patch_tokens, ref_features.patch_tokens, strict=True):
        close(ours, ref)
    close(logits.global_logits, ref_logits.global_logits)
    for ours, ref in zip(logits.patch_logits, ref_logits.patch_logits, strict=True):
        close(ours, ref)
    close(scores.joint_score, ref_scores.joint_score)
    close(scores.global_score, ref_scores.global_score)
    close(scores.anomaly_map, ref_scores.anomaly_map)


@pytest.mark.parametrize("options", [REFERENCE, ForwardOptions()], ids=["original", "all_rewrites"])
def test_original_and_rewritten_forward_equal_anomalyclip(options):
    """Both forwards equal the reference built from open_clip's blocks (tests/test_model.py), float64."""
    model = headclip.create_model(tiny_config(image_size=224)).double()
    _random_head_weights(model)
    model.vision.options = options
    images = model.normalize(_images(2, 224, seed=4)).double()
    with torch.no_grad():
        features = model.vision(images)
        ref_class, ref_tokens = _anomalyclip_vision(model, images, model.vision.head_weights.detach())
    torch.testing.assert_close(features.class_token, ref_class, rtol=1e-10, atol=1e-10)
    for ours, ref in zip(features.patch_tokens, ref_tokens, strict=True):
        torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-10)


def test_split_sdpa_makes_no_concatenated_copies():
    model = headclip.create_model(tiny_config())
    images = model.normalize(_images(1, 64))
    counts = {}
    for name, options in (("original", REFERENCE), ("split", REWRITES["split_sdpa"])):
        model.vision.options = options
        with mock.patch("torch.cat", wraps=torch.cat) as cat, torch.no_grad():
            model.vision(images)
        counts[name] = cat.call_count
    vv_layers = model.vision.depth - model.vision.vv_start_layer + 1
    assert counts == {"original": 1 + 3 * vv_layers, "split": 1}  # the class token is prepended once


def _layer_flops(tokens: int, width: int, queries: int | None = None) -> int:
    """Matrix-product FLOPs of one pre-LN block (qkv, attention, out-proj, MLP of ratio 4) per image."""
    q = tokens if queries is None else queries
    return (2 * q * width * width + 4 * tokens * width * width  # q; k and v
            + 4 * q * tokens * width  # QK^T and AV
            + 2 * q * width * width + 16 * q * width * width)  # out-proj, MLP


def _score_flops(model, class_token_last: bool) -> int:
    """The analytic FLOP count of model.score per image (tiny tower: mlp ratio 4, proj to embed_dim)."""
    vision, size = model.vision, model.image_size
    width, patches, embed = vision.width, vision.grid ** 2, model.clip.visual.proj.shape[1]
    tokens = patches + 1
    total = 2 * patches * 3 * vision.patch_size ** 2 * width  # patch embedding
    for layer in range(1, vision.depth + 1):
        last = class_token_last and layer == vision.depth
        total += _layer_flops(tokens, width, 1 if last else None)
        if vision.vv_start_layer <= layer <= max(vision.map_layers):
            total += 4 * tokens * tokens * width + 2 * tokens * width * width  # V-V attention, out-proj
    total += 2 * width * embed + 2 * embed * 2  # class token: projection, similarity to 2 prompts
    total += len(vision.map_layers) * (2 * patches * width * embed + 2 * patches * embed * 2)
    radius = int(4.0 * model.config.sigma + 0.5)
    total += 2 * (2 * size * size * (2 * radius + 1))  # separable Gaussian, two passes
    return total


@pytest.mark.parametrize("class_token_last", [False, True])
def test_flop_count_matches_the_analytic_count(class_token_last):
    model = headclip.create_model(tiny_config())
    model.vision.options = replace(ForwardOptions(), class_token_last=class_token_last)
    images = _images(2, 64)
    assert flops_per_image(model, images) == _score_flops(model, class_token_last)


def test_bf16_tower_is_within_the_stated_tolerance_of_fp32():
    model = headclip.create_model(tiny_config())
    _random_head_weights(model)
    images = _images(4, 64, seed=1)
    fp32 = model.score(images)
    set_precision(model, "bf16")
    assert model.clip.visual.conv1.weight.dtype == torch.bfloat16 and model.vision.dtype == torch.bfloat16
    assert model.vision.head_weights.dtype == torch.float32  # learned state stays fp32
    bf16 = model.score(images)
    on_cuda = mock.Mock(device=torch.device("cuda"))
    assert isinstance(model._autocast(on_cuda), contextlib.nullcontext)  # a bf16 tower runs without autocast
    assert bf16.anomaly_map.dtype == torch.float32
    assert float((bf16.joint_score - fp32.joint_score).abs().max()) <= BF16_SCORE_TOL
    assert float((bf16.global_score - fp32.global_score).abs().max()) <= BF16_SCORE_TOL
    assert float((bf16.anomaly_map - fp32.anomaly_map).abs().max()) <= BF16_MAP_TOL
    assert not torch.equal(bf16.anomaly_map, fp32.anomaly_map)  # it did run in bf16
    set_precision(model, "auto")
    with pytest.warns(UserWarning) if not torch.cuda.is_available() else contextlib.nullcontext():
        assert isinstance(model._autocast(on_cuda), torch.autocast)  # fp32 weights: autocast on CUDA, as before
    torch.testing.assert_close(model.score(images).anomaly_map, fp32.anomaly_map, rtol=0, atol=1e-2)
    with pytest.raises(ValueError, match="precision must be one of"):
        set_precision(model, "fp8")


def test_cudnn_preference_is_cuda_only():
    assert isinstance(attention_backends(torch.device("cpu"), True), type(attention_backends(torch.device("cuda"),
                                                                                             False)))
    from torch.nn.attention import SDPBackend

    with attention_backends(torch.device("cuda"), True):  # sets the CUDA SDPA backend order; no GPU needed
        order = torch._C._get_sdp_priority_order()
    assert order[0] == int(SDPBackend.CUDNN_ATTENTION)


def test_compiled_forward_equals_eager_and_logs_its_time(caplog):
    """torch.compile on the CPU (inductor, C++): about 30-60 s on two cores."""
    model = headclip.create_model(tiny_config())
    _random_head_weights(model)
    images = _images(2, 64, seed=2)
    eager = model.score(images)
    started = time.perf_counter()
    with caplog.at_level(logging.INFO, logger="headclip.model.inference"):
        seconds = compile_model(model, batch_size=2)
    assert seconds is not None and 0 < seconds <= time.perf_counter() - started
    assert isinstance(model.forward, FallbackForward) and model.forward.compiled is not None
    assert any("forward compiled in" in r.getMessage() for r in caplog.records)
    compiled = model.score(images)
    torch.testing.assert_close(compiled.anomaly_map, eager.anomaly_map, rtol=0, atol=1e-5)
    torch.testing.assert_close(compiled.joint_score, eager.joint_score, rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="compiled already"):
        compile_model(model, batch_size=2)


def test_failed_compilation_falls_back_to_eager_with_one_warning(caplog):
    model = headclip.create_model(tiny_config())
    images = _images(2, 64, seed=2)
    eager = model.score(images)

    def broken(*args, **kwargs):
        raise RuntimeError("backend compiler failed\nlong traceback follows")

    with mock.patch("torch.compile", return_value=broken), caplog.at_level(logging.INFO):
        assert compile_model(model, batch_size=2) is None
        again = model.score(images)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == ["torch.compile failed, running eager: RuntimeError: backend compiler failed"]
    assert torch.equal(again.anomaly_map, eager.anomaly_map)


def test_an_error_of_the_eager_forward_too_is_raised():
    def fails(*args):
        raise ValueError("bad input")

    forward = FallbackForward(fails, fails)
    with pytest.raises(ValueError, match="bad input"):
        forward(1)
    assert forward.compiled is None


def test_prepare_for_inference_sets_precision_and_compiles():
    model = headclip.create_model(tiny_config())
    with mock.patch("headclip.model.inference.compile_model") as compile_:
        assert prepare_for_inference(model, "bf16", compile=True, batch_size=8) is model
    compile_.assert_called_once_with(model, 8)
    assert model.vision.dtype == torch.bfloat16
    untouched = headclip.create_model(tiny_config())
    with mock.patch("headclip.model.inference.compile_model") as compile_:
        prepare_for_inference(untouched)
    compile_.assert_not_called()
    assert untouched.vision.dtype == torch.float32


@pytest.mark.parametrize("name, peak", [
    ("NVIDIA H100 80GB HBM3", 989.0), ("NVIDIA H100 PCIe", None), ("NVIDIA H100 NVL", None),
    ("NVIDIA A100-SXM4-80GB", 312.0), ("NVIDIA A100 80GB PCIe", 312.0), ("NVIDIA L4", 121.0),
    ("NVIDIA L40S", None), ("NVIDIA A10G", 70.0), ("NVIDIA A10", None), ("NVIDIA H200", 989.0),
    ("CPU (x86_64, 2 threads)", None),
])
def test_peak_table(name, peak):
    assert peak_bf16_tflops(name) == peak


def test_architecture_of_openai_weights_is_quickgelu_with_random_values():
    config = architecture_config("ViT-L-14-336", "openai", 518)
    assert (config.pretrained, config.quick_gelu, config.image_size) == (None, True, 518)
    assert architecture_config("ViT-B-16", "laion2b_s34b_b88k", 224).quick_gelu is False
    assert architecture_config("ViT-B-16", None, 224).quick_gelu is False


def test_benchmark_profile_prints_flops_rate_and_kernels(capsys):
    from jobs import benchmark

    argv = ["--profile", "--backbone", "HeadCLIP-Tiny", "--image-size", "64", "--batch-size", "2", "--device", "cpu"]
    assert benchmark.main(argv) == 0
    out = capsys.readouterr().out
    model = headclip.create_model(tiny_config())
    expected = _score_flops(model, class_token_last=True) / 1e9
    assert f"{expected:.1f} GFLOP/image" in out
    assert "images/s" in out and "TFLOP/s (peak unknown for this device)" in out
    assert "aten::" in out  # the profiler's operator table


def test_gpu_check_smoke_runs_every_step_on_the_cpu(tmp_path, capsys):
    import json

    from jobs import gpu_check

    assert gpu_check.main(["--smoke", "--no-compile", "--cpu-time", "--output", str(tmp_path / "check.json")]) == 0
    result = json.loads((tmp_path / "check.json").read_text())
    names = [s["step"] for s in result["steps"]]
    assert names == [s[0] for s in gpu_check.steps() if not s[3]]
    assert result["backbone"] == "HeadCLIP-Tiny" and result["peak_tflops"] is None and result["cpu_time"]
    for step in result["steps"]:
        assert step["best_images_per_second"] > 0 and step["flops_per_image"] > 0
    fp32_steps = [s for s in result["steps"] if "bf16" not in s["step"] and "cuDNN" not in s["step"]]
    assert all(s["max_abs_diff_map"] <= 1e-5 and s["max_abs_diff_score"] <= 1e-5 for s in fp32_steps)
    assert all(s["max_abs_diff_map"] <= BF16_MAP_TOL for s in result["steps"])
    flops = [s["flops_per_image"] for s in result["steps"]]
    assert flops[2] < flops[1]  # the class token alone in the last layer
    bank = result["reference_bank"]
    assert bank["patches"] == 20_000 and bank["lists"] > 1 and bank["without"] > 0
    assert bank["indexed"] > 0 and bank["exact"] > 0
    printed = capsys.readouterr().out
    assert "original forward" in printed and "with a reference bank of 20,000 patches" in printed


def test_score_flags_reach_the_scorer_that_loads_the_model():
    from headclip.model.assets import DEMO_CHECKPOINT_URI
    from headclip.scoring.scorer import ImageScorer
    from jobs import score
    from jobs.cli import job_config

    base = ["--input", "in/", "--output", "out/"]
    defaults = job_config(score.build_parser().parse_args(base)).scoring
    assert (defaults.precision, defaults.compile) == ("auto", False)
    options = job_config(score.build_parser().parse_args(base + ["--precision", "bf16", "--compile",
                                                                 "--batch-size", "4"])).scoring
    assert (options.precision, options.compile, options.batch_size) == ("bf16", True, 4)
    with pytest.raises(SystemExit) as exit_:
        score.build_parser().parse_args(base + ["--precision", "fp8"])
    assert exit_.value.code == 2
    with mock.patch("headclip.model.inference.compile_model") as compile_:
        with ImageScorer("r", DEMO_CHECKPOINT_URI, options) as scorer:
            assert scorer.model.vision.dtype == torch.bfloat16
    compile_.assert_called_once_with(scorer.model, 4)


def test_gpu_check_refuses_cpu_time_on_a_gpu():
    from jobs import gpu_check
    from jobs.cli import UsageError

    with pytest.raises(UsageError, match="--cpu-time"):
        gpu_check.main(["--cpu-time", "--device", "cuda"])
