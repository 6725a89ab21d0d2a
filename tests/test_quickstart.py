"""README's quick start, run as written: score a folder, read it with pandas, write the report."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def quick_start_lines() -> list[str]:
    """The commands of README's "Quick start" block, in order."""
    text = (REPO / "README.md").read_text()
    section = text.split("### Quick start", 1)[1]
    block = re.search(r"```bash\n(.*?)```", section, flags=re.S).group(1)
    return [line for line in block.splitlines() if line.strip() and not line.lstrip().startswith("#")]


@pytest.mark.own_ray  # the job starts a local Ray of its own, as on a laptop
def test_readme_quick_start_runs_as_written(tmp_path):
    """Each line in a shell, in a folder of its own (the entry points found as from the checkout, the
    environment's python first on PATH, as after activating it). Catches: a quick start whose flags,
    paths or output layout have drifted from the code."""
    lines = quick_start_lines()
    assert len(lines) == 4 and lines[1].startswith("python -m jobs.score")
    (tmp_path / "jobs").symlink_to(REPO / "jobs")
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
           "RAY_ADDRESS": ""}
    outputs = []
    for line in lines:
        done = subprocess.run(["bash", "-c", line], cwd=tmp_path, env=env, capture_output=True, text=True,
                              timeout=600)
        assert done.returncode == 0, f"{line}\n{done.stderr[-3000:]}"
        outputs.append(done.stdout)
    assert "image_uri" in outputs[2] and "score" in outputs[2] and len(outputs[2].splitlines()) == 6
    (run,) = (tmp_path / "out" / "quickstart").glob("run_id=*")
    import pandas as pd

    assert len(pd.read_parquet(tmp_path / "out" / "quickstart")) == 8  # README's "8 generated images"
    assert "<html" in (run / "_report.html").read_text().lower()
