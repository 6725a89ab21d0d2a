"""``make demo`` run once: its printed figures against the ones the docs state, and every ``--help``
example that names the demo's files run on its output.

The demo (``python -m jobs.demo``, what ``make demo`` runs) takes about a minute on two idle cores;
this module runs it once, in a folder of its own, and shares the run between its tests.

Figures are compared exactly as printed (the docs round as the demo prints) when the demo scores on
the CPU, where the model runs in fp32 and gives the same scores on every run. On a GPU it scores
under bf16 autocast, so there each count may differ by one image and each AUROC by 0.01.
"""

from __future__ import annotations

import importlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

# the demo and the examples each take one to two minutes on two idle cores, more on a busy machine
pytestmark = [pytest.mark.timeout(1200), pytest.mark.demo]  # make test-demo runs it, and CI
REPO = Path(__file__).resolve().parents[1]
ON_GPU = torch.cuda.is_available()
COUNT_TOL = 1 if ON_GPU else 0                 # images
PERCENT_TOL = 100 / 30 + 0.05 if ON_GPU else 0.0  # one image of 30, in %
AUROC_TOL = 0.01 if ON_GPU else 0.0
# The reference section's table comes from jobs.benchmark_reference, which computes pixel AUROC
# exactly; the demo computes it from 1000-bin histograms (docs/anomalyclip.md), within 0.005 of it.
HISTOGRAM_TOL = 0.005
TEXTURES = ("concrete", "fabric", "tiles", "wood")


# ----------------------------------------------------------------------------------------- the run


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> tuple[Path, str]:
    """(the folder ``python -m jobs.demo`` ran in, its stdout); the entry points found as from a
    checkout, a private local Ray."""
    folder = tmp_path_factory.mktemp("demo")
    (folder / "jobs").symlink_to(REPO / "jobs")
    env = {**os.environ, "RAY_ADDRESS": ""}
    done = subprocess.run([sys.executable, "-m", "jobs.demo"], cwd=folder, env=env, capture_output=True,
                          text=True, timeout=1200)
    assert done.returncode == 0, done.stderr[-3000:]
    return folder, done.stdout


# ----------------------------------------------------------------------------- what the demo prints


def printed_figures(stdout: str) -> dict:
    """The demo's figures, parsed from its stdout.

    ``textures``: per texture, threshold (str), good, flagged_good (calibrated), range (low, high),
    flagged_good_at_0_5, detected (calibrated) and detected_at_0_5 (fractions as printed), auroc and
    auroc_reference ((image, pixel) as printed); ``all``: the mean AUROCs; ``flagged``/``images``.
    """
    textures: dict[str, dict] = {}
    for m in re.finditer(r"^(\w+): threshold ([\d.]+) from \d+ known-good images; false alarms on the archive's "
                         r"(\d+) good images: (\d+) \(95% range for this many: (\d+) to (\d+)\), at 0\.5: (\d+)$",
                         stdout, re.M):
        textures[m.group(1)] = {"threshold": m.group(2), "good": int(m.group(3)), "flagged_good": int(m.group(4)),
                                "range": (int(m.group(5)), int(m.group(6))), "flagged_good_at_0_5": int(m.group(7))}
    # the DuckDB table printed after "fixed threshold 0.5 against ...": detection rates per texture
    table = stdout.split("fixed threshold 0.5 against", 1)[1]
    rows = [[c.strip() for c in line.strip().strip("│").split("│")] for line in table.splitlines()
            if line.startswith("│")]
    header = rows[0]
    for cells in rows[1:]:
        if cells[0] in textures:
            record = dict(zip(header, cells))
            textures[cells[0]]["detected"] = record["detected_calibrated"]
            textures[cells[0]]["detected_at_0_5"] = record["detected_at_0_5"]
    side = stdout.split("zero-shot against a reference bank", 1)[1]
    aurocs = {m.group(1): ((m.group(2), m.group(3)), (m.group(4), m.group(5)))
              for m in re.finditer(r"^  (\w+)\s+([\d.]+) / ([\d.]+)\s+([\d.]+) / ([\d.]+)$", side, re.M)}
    for name, record in textures.items():
        record["auroc"], record["auroc_reference"] = aurocs[name]
    quality = re.search(r"detection quality on the demo images .*: image AUROC ([\d.]+), pixel AUROC ([\d.]+)", stdout)
    summary = re.search(r"^run \w+: (\d+) images in .*, (\d+) anomalous$", stdout, re.M)
    assert set(textures) == set(TEXTURES) and quality and summary, stdout[-3000:]
    return {"textures": textures, "all": ((quality.group(1), quality.group(2)), aurocs["mean"][1]),
            "all_zero_shot_mean": aurocs["mean"][0], "images": int(summary.group(1)),
            "flagged": int(summary.group(2))}


# ------------------------------------------------------------------------------- what the docs state


def readme_figures() -> dict:
    """README's table between the ``demo-figures`` markers and its "The run flags N of the M images"."""
    text = (REPO / "README.md").read_text()
    block = text.split("<!-- demo-figures:start -->", 1)[1].split("<!-- demo-figures:end -->", 1)[0]
    rows = [[c.strip() for c in line.strip().strip("|").split("|")] for line in block.splitlines()
            if line.startswith("|") and not line.startswith("| ---")]
    header, body = rows[0], {cells[0]: dict(zip(rows[0], cells)) for cells in rows[1:]}
    flagged = re.search(r"The run flags (\d+) of the (\d+) images\.", block)
    assert "texture" in header and set(TEXTURES) <= set(body) and flagged, block
    return {"rows": body, "flagged": int(flagged.group(1)), "images": int(flagged.group(2))}


def reference_section_aurocs() -> dict[str, dict[str, float]]:
    """The AUROC table of README's reference section ("Known-good images as a reference"), per row."""
    text = (REPO / "README.md").read_text()
    section = text.split("## Known-good images as a reference", 1)[1].split("\n## ", 1)[0]
    table = section.split("\n| texture |", 1)[1].split("\n\n", 1)[0]  # the first table after its header
    rows = [[c.strip() for c in line.strip().strip("|").split("|")] for line in ("| texture |" + table).splitlines()
            if line.startswith("| ") and "---" not in line]
    header = rows[0]
    assert header[:1] == ["texture"] and "pixel combined" in header, header
    return {cells[0].split(" (")[0]: {name: float(v) for name, v in zip(header[1:], cells[1:])} for cells in rows[1:]}


def of(cell: str) -> tuple[int, int]:
    m = re.fullmatch(r"(\d+) of (\d+)", cell)
    assert m, cell
    return int(m.group(1)), int(m.group(2))


def percent(cell: str) -> float:
    m = re.fullmatch(r"([\d.]+) %", cell)
    assert m, cell
    return float(m.group(1))


def pair(cell: str) -> tuple[float, float]:
    m = re.fullmatch(r"([\d.]+) / ([\d.]+)", cell)
    assert m, cell
    return float(m.group(1)), float(m.group(2))


def close(a: float, b: float, tol: float) -> bool:
    return abs(a - b) <= tol + 1e-9


# --------------------------------------------------------------------------------------- the tests


def test_readme_states_the_figures_make_demo_prints(demo):
    """Every figure of README's demo table (and its flagged count) against the demo's own output:
    per texture the calibrated threshold, the good images flagged at 0.5 and calibrated, the
    detection rates at both, the image and pixel AUROC without and with the reference bank; the
    calibrated false alarms inside the range the calibration states (README says they are).
    Catches: a README figure left behind when the model, the data or the calibration changes."""
    printed, stated = printed_figures(demo[1]), readme_figures()
    assert close(stated["flagged"], printed["flagged"], COUNT_TOL) and stated["images"] == printed["images"]
    for name in TEXTURES:
        got, row = printed["textures"][name], stated["rows"][name]
        assert close(float(row["threshold"]), float(got["threshold"]), AUROC_TOL), (name, row, got)
        flagged_at_0_5, good = of(row["good images flagged at 0.5"])
        assert good == got["good"] and close(flagged_at_0_5, got["flagged_good_at_0_5"], COUNT_TOL), (name, got)
        flagged, good = of(row["good images flagged, calibrated"])
        assert good == got["good"] and close(flagged, got["flagged_good"], COUNT_TOL), (name, got)
        assert got["range"][0] <= got["flagged_good"] <= got["range"][1], (name, got)
        assert close(percent(row["defects detected at 0.5"]), 100 * float(got["detected_at_0_5"]), PERCENT_TOL)
        assert close(percent(row["defects detected, calibrated"]), 100 * float(got["detected"]), PERCENT_TOL), name
        for column, key in (("image / pixel AUROC", "auroc"), ("with the reference bank", "auroc_reference")):
            for a, b in zip(pair(row[column]), map(float, got[key])):
                assert close(a, b, AUROC_TOL), (name, column, row[column], got[key])
    every = stated["rows"]["all 240"]
    for column, printed_pair in zip(("image / pixel AUROC", "with the reference bank"), printed["all"]):
        for a, b in zip(pair(every[column]), map(float, printed_pair)):
            assert close(a, b, AUROC_TOL), (column, every[column], printed_pair)


def test_other_pages_state_the_demos_aurocs(demo):
    """docs/demo-model.md's "image AUROC x and pixel AUROC y" and the AUROC table of README's
    reference section against the demo's run (the table's pixel figures are exact, the demo's
    from histograms: within HISTOGRAM_TOL). Catches: those pages left behind by a refit model."""
    printed = printed_figures(demo[1])
    page = (REPO / "docs" / "demo-model.md").read_text()
    stated = re.search(r"image AUROC ([\d.]+) and pixel AUROC ([\d.]+)", page)
    assert stated, "docs/demo-model.md states no AUROC"
    for a, b in zip(map(float, stated.groups()), map(float, printed["all"][0])):
        assert close(a, b, AUROC_TOL), (stated.groups(), printed["all"][0])
    table = reference_section_aurocs()
    rows = {**printed["textures"], "mean": {"auroc": printed["all"][0], "auroc_reference": printed["all"][1]}}
    for name, got in rows.items():
        row = table[name]
        assert close(row["zero-shot"], float(got["auroc"][0]), AUROC_TOL), (name, row, got)
        assert close(row["combined"], float(got["auroc_reference"][0]), AUROC_TOL), (name, row, got)
        assert close(row["pixel zero-shot"], float(got["auroc"][1]), AUROC_TOL + HISTOGRAM_TOL), (name, row, got)
        assert close(row["pixel combined"], float(got["auroc_reference"][1]), AUROC_TOL + HISTOGRAM_TOL), (name, row)


# ---------------------------------------------------------------------------- the --help examples

JOBS = sorted(p.stem for p in (REPO / "jobs").glob("*.py") if p.stem not in ("__init__", "cli", "flags"))
NAMES_DEMO_FILES = re.compile(r"(?<![\w/.-])(out/demo|demo-data)\b")
# Examples that name the demo's files but are not run here, and why:
NOT_RUN = {
    # the module fixture runs `python -m jobs.demo` itself; `--images 400` regenerates the demo's
    # data with 400 images and scores it three times (minutes)
    "demo": "runs the demo again",
    # scores the archive, then times a 100k-patch bank over it and 10k to 1M-patch banks (minutes
    # on a CPU, where a 100k-patch bank makes scoring 18 times slower)
    "benchmark_reference": "minutes of scoring and timing banks",
}


def help_examples() -> list[tuple[str, str]]:
    """(job, command) for every example line of every job's --help that names the demo's files
    (continuations joined)."""
    found = []
    for job in JOBS:
        module = importlib.import_module(f"jobs.{job}")
        parser = module.build_parser() if hasattr(module, "build_parser") else None
        epilog = getattr(parser, "epilog", None) or getattr(module, "EXAMPLE", "")
        for line in epilog.replace("\\\n", " ").splitlines():
            command = line.strip()
            if command.startswith("python -m jobs.") and NAMES_DEMO_FILES.search(command):
                found.append((job, re.sub(r"\s+", " ", command)))
    return found


def shell_arguments(command: str, cwd: Path) -> list[str]:
    """The arguments bash gives ``python`` in ``command`` (quotes, ``$(...)`` and globs expanded)."""
    script = 'python() { printf "%s\\0" "$@"; }\n' + command
    done = subprocess.run(["bash", "-c", script], cwd=cwd, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout.split("\0")[:-1]


EXAMPLES = help_examples()
# Runs each (job, arguments) of argv[1] (JSON) in one process in the demo's folder, as a shell there
# would (a private local Ray started in that folder, relative paths as the user's), and writes each
# exit code to argv[2]; stderr marks where each job's output starts.
RUNNER = """
import importlib, json, sys
from jobs.cli import run
codes = []
for job, arguments in json.loads(sys.argv[1]):
    print(f"=== jobs.{job} {arguments}", file=sys.stderr, flush=True)
    try:
        run(importlib.import_module(f"jobs.{job}").main, f"jobs.{job}", arguments)
    except SystemExit as stopped:
        codes.append(stopped.code)
    sys.stderr.flush()
json.dump(codes, open(sys.argv[2], "w"))
"""


@pytest.fixture(scope="module")
def examples_run(demo) -> dict[str, tuple[int, str]]:
    """command -> (exit code, its stderr) for each example not in NOT_RUN, run after the demo in its
    folder: arguments as bash expands them there, the jobs in one Python process (one import of
    PyTorch, one Ray start) rather than one each."""
    folder = demo[0]
    chosen = [(job, command) for job, command in EXAMPLES if job not in NOT_RUN]
    calls = []
    for job, command in chosen:
        arguments = shell_arguments(command, folder)
        assert arguments[:2] == ["-m", f"jobs.{job}"], (command, arguments)
        calls.append((job, arguments[2:]))
    codes_file = folder / "example-codes.json"
    done = subprocess.run([sys.executable, "-c", RUNNER, json.dumps(calls), str(codes_file)], cwd=folder,
                          env={**os.environ, "RAY_ADDRESS": ""}, capture_output=True, text=True, timeout=1200)
    assert codes_file.exists(), done.stderr[-3000:]
    codes = json.loads(codes_file.read_text())
    parts = done.stderr.split("=== jobs.")[1:]
    assert len(codes) == len(parts) == len(chosen), done.stderr[-3000:]
    return {command: (code, part) for (_, command), code, part in zip(chosen, codes, parts)}


def test_the_examples_that_name_the_demos_files_are_found():
    """The extraction finds what it should: each job whose --help shows the demo's files."""
    jobs = {job for job, _ in EXAMPLES}
    assert {"report", "show", "export", "evaluate", "calibrate", "audit", "reference", "score"} <= jobs, jobs


@pytest.mark.parametrize("job,command", EXAMPLES, ids=[f"{job}-{i}" for i, (job, _) in enumerate(EXAMPLES)])
def test_help_example_runs_on_make_demos_output(job, command, request):
    """The example as bash reads it in the demo's folder (its ``$(ls -d out/demo/run_id=* ...)``
    expanded there), run on the demo's output: exit code 0. Catches: an example with a placeholder
    run id, an image id the demo does not have, a flag that no longer exists, a path the demo does
    not write, an output that breaks the demo's Parquet root."""
    if job in NOT_RUN:
        pytest.skip(f"jobs.{job}: {NOT_RUN[job]}")
    code, err = request.getfixturevalue("examples_run")[command]
    assert code == 0, f"{command}\n{err[-3000:]}"


def test_the_demos_output_root_reads_whole_after_the_examples(demo, examples_run):
    """After every example, pandas still reads ``out/demo`` as one Parquet root of the demo's 240
    rows. Catches: an example that writes a file into the demo's output (a report.html there)."""
    import pandas as pd

    assert len(pd.read_parquet(demo[0] / "out" / "demo")) == 240
