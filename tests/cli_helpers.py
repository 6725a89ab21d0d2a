"""Helpers for tests that run a job's entry point in the test's own process."""

from __future__ import annotations

import importlib

import pytest

from jobs.cli import run


def job_in_process(name: str, argv: list, capsys) -> tuple[int, str, str]:
    """Run ``python -m jobs.<name> argv`` in this process: (exit code, stdout, stderr)."""
    module = importlib.import_module(f"jobs.{name}")
    capsys.readouterr()
    with pytest.raises(SystemExit) as stopped:
        run(module.main, f"jobs.{name}", [str(a) for a in argv])
    out = capsys.readouterr()
    return stopped.value.code, out.out, out.err


def one_line_refusal(code: int, err: str, *words: str) -> str:
    """The single stderr line of a refusal (exit 2, no traceback) that holds every one of ``words``."""
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err[-3000:]
    for word in words:
        assert word in lines[0], lines[0]
    return lines[0]
