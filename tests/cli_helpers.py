"""Helpers for tests that run a job's entry point in the test's own process."""

from __future__ import annotations

import importlib
import logging
import sys

import pytest

from jobs.cli import run


def job_in_process(name: str, argv: list, capsys) -> tuple[int, str, str]:
    """Run ``python -m jobs.<name> argv`` in this process: (exit code, stdout, stderr)."""
    module = importlib.import_module(f"jobs.{name}")
    _rebind_closed_streams()
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


def _rebind_closed_streams() -> None:
    """Log handlers bound to a stream an earlier test's capture has closed (Ray's console handler binds
    sys.stderr when Ray is first imported) write to the process's stderr instead of failing on every record."""
    loggers = [logging.getLogger()] + [logger for logger in logging.root.manager.loggerDict.values()
                                       if isinstance(logger, logging.Logger)]
    for logger in loggers:
        for handler in logger.handlers:
            stream = getattr(handler, "stream", None)
            if isinstance(handler, logging.StreamHandler) and getattr(stream, "closed", False):
                with handler.lock:  # not setStream: it flushes the closed stream first
                    handler.stream = sys.__stderr__
