"""Helpers for the scoring-job tests: generated images and reference scores."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import headclip
from headclip.data.decode import decode_image
from headclip.scoring.runner import JobConfig, execute, prepare
from headclip.scoring.scorer import ScoringOptions
from headclip.data.synthetic import make_sample


def write_images(folder: Path, count: int, start: int = 0) -> list[Path]:
    """``count`` generated PNG/JPEG images of varied sizes in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(start, start + count):
        sample = make_sample(i, size=48 + 8 * (i % 5), defect="random" if i % 2 else None)
        image = Image.fromarray(sample.image)
        if i % 3 == 0:
            image = image.resize((image.width + 10, image.height))
        suffix = ".jpg" if i % 4 == 0 else ".png"
        path = folder / f"img{i:04d}{suffix}"
        image.save(path)
        paths.append(path)
    return paths


def reference_scores(checkpoint: str, data: list[bytes]) -> tuple[np.ndarray, np.ndarray]:
    """(joint, global) scores of the in-process model, one image at a time."""
    model = headclip.create_model(checkpoint=checkpoint)
    joint, global_ = [], []
    for blob in data:
        image = decode_image(blob)
        out = model.score(headclip.preprocess([image], model.image_size))
        joint.append(float(out.joint_score[0]))
        global_.append(float(out.global_score[0]))
    return np.array(joint), np.array(global_)


def job(input_uri: str, output_uri: str, checkpoint: str, **changes) -> JobConfig:
    scoring = changes.pop("scoring", ScoringOptions(batch_size=4, io_threads=4))
    base = dict(input=input_uri, output=output_uri, checkpoint=checkpoint, shard_size=5, actors=1,
                progress_interval=1.0, scoring=scoring)
    return JobConfig(**{**base, **changes})


def run_job(config: JobConfig, images=None, **kwargs):
    plan = prepare(config, images)
    return plan, execute(plan, config, **kwargs)


def jpeg_bytes(image: Image.Image, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", **kwargs)
    return buffer.getvalue()


def torch_seed(seed: int = 0) -> None:
    torch.manual_seed(seed)


def slow_checkpoint(folder: Path, image_size: int = 224) -> str:
    """A tiny model at 224 px (or ``image_size``), saved in ``folder``: slow enough on a CPU to interrupt a
    run mid-way."""
    model = headclip.create_model(backbone="HeadCLIP-Tiny", pretrained=None, image_size=image_size)
    checkpoint = str(folder / f"m{image_size}.safetensors")
    headclip.save_checkpoint(model, checkpoint)
    return checkpoint
