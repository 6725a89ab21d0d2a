"""Unusable checkpoints are refused on the driver in seconds, with one line: values, structure, malformed files."""

from __future__ import annotations

import json
import math
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save as save_safetensors

from headclip.errors import CheckpointError
from headclip.model.checkpoint import read_checkpoint
from headclip.scoring.runner import JobConfig, prepare

from .scoring_helpers import write_images

REPO = Path(__file__).resolve().parents[1]


def _parts(checkpoint: str) -> tuple[dict, dict]:
    """(payload, tensors) of a checkpoint file, read without the library's checks."""
    from safetensors import safe_open

    with safe_open(checkpoint, "pt") as handle:
        payload = json.loads(handle.metadata()["headclip"])
        tensors = {name: handle.get_tensor(name) for name in handle.keys()}
    return payload, tensors


def _craft(path: Path, checkpoint: str, config: dict | None = None, tensors: dict | None = None,
           drop: tuple[str, ...] = ()) -> str:
    payload, learned = _parts(checkpoint)
    payload["config"].update(config or {})
    learned.update(tensors or {})
    for name in drop:
        learned.pop(name)
    path.write_bytes(save_safetensors(learned, metadata={"headclip": json.dumps(payload)}))
    return str(path)


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> str:
    folder = tmp_path_factory.mktemp("imgs")
    write_images(folder, 2)
    return str(folder)


def _prepare(checkpoint: str, images: str, output: Path):
    return prepare(JobConfig(input=images, output=str(output), checkpoint=checkpoint))


@pytest.mark.parametrize("name,value", [("nan", math.nan), ("inf", math.inf), ("-inf", -math.inf)])
def test_non_finite_learned_tensors_are_refused_when_read(tiny_checkpoint, tmp_path, name, value):
    _, tensors = _parts(tiny_checkpoint)
    weights = tensors["vision.head_weights"].clone()
    weights[0, 1] = value
    path = _craft(tmp_path / f"{name}.safetensors", tiny_checkpoint, tensors={"vision.head_weights": weights})
    with pytest.raises(CheckpointError, match="vision.head_weights holds 1 NaN or infinite"):
        read_checkpoint(path)


def _cases(tiny_checkpoint: str, tmp_path: Path) -> list[tuple[str, str]]:
    """(checkpoint, expected message) for checkpoints that do not fit their backbone or hold bad values."""
    _, tensors = _parts(tiny_checkpoint)
    (tmp_path / "folder").mkdir()
    (tmp_path / "notes.txt").write_text("not weights\n")
    craft = lambda name, **kw: _craft(tmp_path / f"{name}.safetensors", tiny_checkpoint, **kw)  # noqa: E731
    return [
        (craft("backbone", config={"backbone": "ViT-Nope-99"}), "unknown backbone 'ViT-Nope-99'"),
        (craft("size17", config={"image_size": 17}), "not a multiple of the patch size 16"),
        (craft("huge", config={"image_size": 10 ** 6}), "exceeds the largest accepted"),
        (craft("maplayer", config={"map_layers": [99]}), "map layer"),
        (craft("vvstart", config={"vv_start_layer": 99}), "vv_start_layer 99 is outside 1..6"),
        (craft("deep", config={"deep_prompt_end": 40}), "12 text layers"),
        (craft("missing", drop=("prompt.deep",)), "missing ['prompt.deep']"),
        (craft("shape", tensors={"vision.head_weights": torch.ones(3, 4)}), "head weights cover 3 layers"),
        (craft("sigma-nan", config={"sigma": math.nan}), "sigma must be a finite number"),
        (craft("sigma-neg", config={"sigma": -1.0}), "sigma must be"),
        (craft("alpha", config={"alpha": 7}), "alpha must be in [0, 1]"),
        (craft("weights-missing", config={"pretrained": str(tmp_path / "gone.pt")}), "nor a readable file"),
        (craft("weights-dir", config={"pretrained": str(tmp_path / "folder")}), "are not a file"),
        (craft("weights-text", config={"pretrained": str(tmp_path / "notes.txt")}), "not a weight file"),
        (craft("weights-protocol", config={"pretrained": "nope://x/weights.pt"}), "nor a readable file"),
        (craft("weights-empty", config={"pretrained": ""}), "empty backbone weights"),
    ]


def test_checkpoints_that_do_not_fit_are_refused_before_any_work(tiny_checkpoint, tmp_path, images):
    for checkpoint, message in _cases(tiny_checkpoint, tmp_path):
        output = tmp_path / ("out-" + Path(checkpoint).stem)
        start = time.perf_counter()
        with pytest.raises(CheckpointError) as caught:
            _prepare(checkpoint, images, output)
        assert message in str(caught.value), (checkpoint, str(caught.value))
        assert "\n" not in str(caught.value)
        assert time.perf_counter() - start < 20, checkpoint
        assert not output.exists(), "a plan was written for an unusable checkpoint"


def test_a_fitting_checkpoint_still_plans(tiny_checkpoint, tmp_path, images):
    plan = _prepare(tiny_checkpoint, images, tmp_path / "out")
    assert plan.num_images == 2


def _header_bytes(header) -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw


@pytest.fixture()
def malformed(tiny_checkpoint, tmp_path) -> list[tuple[str, str]]:
    good = Path(tiny_checkpoint).read_bytes()
    payload, _ = _parts(tiny_checkpoint)
    files = {
        "list-header": (_header_bytes([1, 2, 3]), "header is a JSON list"),
        "list-metadata": (_header_bytes({"__metadata__": ["headclip"]}), "without a HeadCLIP config"),
        "list-payload": (_header_bytes({"__metadata__": {"headclip": json.dumps([1, 2])}}), "is a JSON list"),
        "bad-json-payload": (_header_bytes({"__metadata__": {"headclip": "{not json"}}), "is not valid JSON"),
        "string-payload": (_header_bytes({"__metadata__": {"headclip": json.dumps("text")}}), "is a JSON str"),
        "no-config": (_header_bytes({"__metadata__": {"headclip": json.dumps({"format": payload["format"]})}}),
                      "without a config"),
        "truncated": (good[: len(good) - 100], "malformed tensor data"),
    }
    out = []
    for name, (data, message) in files.items():
        path = tmp_path / f"{name}.safetensors"
        path.write_bytes(data)
        out.append((str(path), message))
    return out


def test_malformed_safetensors_are_one_checkpoint_error(malformed, tmp_path, images):
    from jobs.cli import prepare_or_exit

    for path, message in malformed:
        with pytest.raises(CheckpointError) as caught:
            read_checkpoint(path)
        assert message in str(caught.value), (path, str(caught.value))
        # the job's planning step reports it as the checkpoint's fault, not the output's
        with pytest.raises(CheckpointError, match="safetensors|HeadCLIP config|config|tensor data"):
            prepare_or_exit(JobConfig(input=images, output=str(tmp_path / "o"), checkpoint=path))


def test_cli_refuses_a_checkpoint_that_does_not_fit_in_seconds(tiny_checkpoint, tmp_path, images):
    bad = _craft(tmp_path / "shape.safetensors", tiny_checkpoint, tensors={"prompt.deep": torch.zeros(8, 4, 32)})
    start = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "jobs.score", "--input", images, "--output",
                             str(tmp_path / "out"), "--checkpoint", bad], cwd=REPO, capture_output=True, text=True,
                            timeout=180)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert "does not match backbone HeadCLIP-Tiny" in last and "deep prompts" in last, result.stderr[-2000:]
    assert "Started a local Ray instance" not in result.stderr
    assert time.perf_counter() - start < 120
