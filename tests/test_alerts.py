"""Alerts a scheduler and people can act on: the last log line, summary.json and a webhook POST.

The webhook receiver is a local HTTP server on 127.0.0.1; its URL carries a
token in its path, which must never be printed or stored.
"""

from __future__ import annotations

import contextlib
import io
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from PIL import Image

from headclip.data.synthetic import make_sample
from headclip.reporting.notify import post_json, redacted
from jobs import audit as audit_job

SECRET = "T0KEN-s3cr3t-4f9a"


class Receiver:
    """An HTTP server on 127.0.0.1 that records POSTs and answers with the given status codes in turn."""

    def __init__(self, statuses=(200,)):
        self.posts: list[dict] = []
        self.statuses = list(statuses)
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 - http.server API
                body = self.rfile.read(int(self.headers["Content-Length"]))
                receiver.posts.append({"path": self.path, "type": self.headers["Content-Type"], "body": body})
                status = receiver.statuses.pop(0) if len(receiver.statuses) > 1 else receiver.statuses[0]
                self.send_response(status)
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hooks/{SECRET}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> "Receiver":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()


def _day(folder: Path, good: int, broken: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(good):
        Image.fromarray(make_sample(900 + i, 64, defect=None).image).save(folder / f"ok-{i}.png")
    for i in range(broken):
        (folder / f"broken-{i}.png").write_bytes(b"\x89PNG\r\n\x1a\n not an image")


DAY = "2026-11-23"


def _audit(root: Path, checkpoint: str, *extra: str) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of jobs.audit over the archive's day."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = audit_job.main(["--date", DAY, "--prefix-template", f"{root}/archive/date={{date}}/",
                               "--history", str(root / "history"), "--checkpoint", checkpoint,
                               "--shard-size", "4", *extra])
    return code, out.getvalue(), err.getvalue()


def _last_line(text: str) -> str:
    return text.strip().splitlines()[-1]


@pytest.fixture(scope="module")
def alerted(ray_cluster, tiny_checkpoint, tmp_path_factory):
    """A day audited with a webhook: 3 images and 1 broken file (an error rate of 0.25 alerts).

    Returns (root, exit code, stdout, stderr, the receiver's posts, summary.json's text,
    report.html's text). Later audits of the same day score nothing new; they recompute
    the verdict from the history.
    """
    root = tmp_path_factory.mktemp("alerts")
    _day(root / "archive" / f"date={DAY}", good=3, broken=1)
    with Receiver() as receiver:
        code, out, err = _audit(root, tiny_checkpoint, "--webhook", receiver.url)
    reports = root / "history" / "reports" / f"date={DAY}"
    return (root, code, out, err, receiver.posts, (reports / "summary.json").read_text(),
            (reports / "report.html").read_text())


def test_alert_posts_the_summary_and_ends_with_an_alert_line(alerted):
    root, code, out, err, posts, summary_text, report_text = alerted
    assert code == audit_job.EXIT_ALERT
    summary = json.loads(summary_text)
    assert summary["alert"] and any("error rate" in r for r in summary["reasons"])
    assert _last_line(out) == summary["message"] and summary["message"].startswith(f"AUDIT ALERT {DAY}: ")
    assert len(posts) == 1
    assert posts[0]["path"] == f"/hooks/{SECRET}" and posts[0]["type"] == "application/json"
    assert json.loads(posts[0]["body"]) == summary
    assert "webhook delivered to http://127.0.0.1:" in out
    for text in (out, err, summary_text, report_text):
        assert SECRET not in text


def test_failed_delivery_is_one_line_and_keeps_the_alert(alerted, tiny_checkpoint):
    root = alerted[0]
    with Receiver(statuses=(503,)) as failing:
        code, out, err = _audit(root, tiny_checkpoint, "--webhook", failing.url, "--alert-exit-code", "0")
    assert code == 0  # --alert-exit-code 0: the alert is told by the summary, the last line and the webhook
    assert len(failing.posts) == 3 and "not delivered to http://127.0.0.1:" in err and "HTTP 503" in err
    assert _last_line(out).startswith(f"AUDIT ALERT {DAY}: ")
    assert SECRET not in out + err


def test_quiet_audit_posts_only_when_asked(alerted, tiny_checkpoint, monkeypatch):
    root = alerted[0]
    # the day's error rate of 0.25 no longer alerts; its broken image is not scored again on these reruns
    quiet = ["--alert-error-rate", "0.5", "--no-rescore-errors"]
    with Receiver() as receiver:
        code, out, _ = _audit(root, tiny_checkpoint, "--webhook", receiver.url, *quiet)
        assert code == 0 and receiver.posts == []  # no alert, no post
        monkeypatch.setenv(audit_job.WEBHOOK_ENV, receiver.url)  # the URL from the environment this time
        code, out, _ = _audit(root, tiny_checkpoint, "--webhook-on", "always", *quiet)
    assert code == 0 and _last_line(out).startswith(f"AUDIT OK {DAY}: 4 images (0 new), 1 errors")
    assert len(receiver.posts) == 1 and json.loads(receiver.posts[0]["body"])["alert"] is False


def test_bad_webhook_url_is_one_line_without_the_url(capsys):
    with pytest.raises(SystemExit) as stop:
        audit_job.build_parser().parse_args(["--history", "h", "--webhook", f"ftp://host/{SECRET}"])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and len(err.strip().splitlines()) == 1 and SECRET not in err


def test_post_retries_server_errors_then_delivers():
    with Receiver(statuses=(500, 502, 200)) as receiver:
        delivered, outcome = post_json(receiver.url, {"alert": True}, attempts=3, backoff=0.01)
    assert delivered and [json.loads(p["body"]) for p in receiver.posts] == [{"alert": True}] * 3
    assert outcome == f"delivered to {redacted(receiver.url)} (HTTP 200)" and SECRET not in outcome
    with Receiver(statuses=(404,)) as receiver:  # a client error is not retried
        delivered, outcome = post_json(receiver.url, {}, attempts=3, backoff=0.01)
    assert not delivered and len(receiver.posts) == 1 and "HTTP 404" in outcome
