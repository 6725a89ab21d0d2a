"""A scoring actor killed by Ray's memory monitor for real: the job ends in one line that says memory and what
to do, with no traceback.

The job runs in a subprocess with its own local Ray whose memory monitor kills a worker once the node uses
more than its usage now plus 2.5 GiB (``RAY_memory_usage_threshold``). The scoring actor crosses that line by
itself: it loads a 3 GiB reference bank (``--reference``) with the model, as a user's over-large bank would
on a small node. Nothing in the job is told to fail.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
BANK_BYTES = 3 * 2**30
HEADROOM = 2.5 * 2**30  # room for the other tests' processes to grow meanwhile


def _node_memory() -> tuple[int, int]:
    """(total, used) bytes of this machine, used counted as total minus available (/proc/meminfo)."""
    fields = {}
    for line in Path("/proc/meminfo").read_text().splitlines():
        name, value = line.split(":", 1)
        fields[name] = int(value.split()[0]) * 1024
    return fields["MemTotal"], fields["MemTotal"] - fields["MemAvailable"]


def _big_bank(path: Path) -> None:
    """A valid bank of the demo checkpoint holding BANK_BYTES of (zero) features."""
    from headclip.model.assets import DEMO_CHECKPOINT_URI
    from headclip.model.checkpoint import read_checkpoint
    from headclip.reference.bank import ReferenceBank, write_bank

    checkpoint = read_checkpoint(DEMO_CHECKPOINT_URI)
    config = checkpoint.config
    layers, width = (2, 3, 5, 6), 64  # the demo backbone's map layers and embedding width
    rows = int(BANK_BYTES // (4 * len(layers) * width))
    bank = ReferenceBank(features={"*": torch.zeros(rows, len(layers) * width)}, scales={"*": 1.0},
                         checkpoint_id=checkpoint.checkpoint_id, backbone=config.backbone,
                         image_size=config.image_size, layers=layers, embed_dim=width)
    write_bank(bank, str(path))


@pytest.mark.own_ray
@pytest.mark.skipif(not Path("/proc/meminfo").exists(), reason="reads the node's memory from /proc/meminfo")
def test_a_scoring_actor_killed_for_memory_ends_the_job_in_one_line(tmp_path):
    total, used = _node_memory()
    if total - used < 12 * 2**30:
        pytest.skip("needs about 12 GiB of free memory")
    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i in range(4):
        Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(images / f"{i}.png")
    bank = tmp_path / "bank.safetensors"
    _big_bank(bank)
    threshold = (used + HEADROOM) / total
    env = {**os.environ, "RAY_ADDRESS": "", "RAY_memory_usage_threshold": f"{threshold:.4f}",
           "RAY_memory_monitor_refresh_ms": "50", "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-m", "jobs.score", "--input", str(images), "--output",
                           str(tmp_path / "out"), "--reference", str(bank), "--placement-timeout", "300"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=400)
    err = done.stderr
    assert done.returncode == 1, err[-3000:]
    assert "Traceback" not in err and "Full stack trace" not in err, err[-3000:]
    last = [line for line in err.splitlines() if line.strip()][-1]
    assert last.startswith("jobs.score: error: a scoring step ran out of memory and was killed by Ray"), err[-3000:]
    assert "--reference bank (3.00 GiB" in last and "lower --batch-size or --shard-size" in last, last
    assert "INFO root:" not in err  # open_clip's own log lines stay out of the job's log
