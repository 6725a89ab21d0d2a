"""Alerts a scheduler and people can act on: the last log line, summary.json and a webhook POST.

The webhook receiver is a local HTTP server on 127.0.0.1; its URL carries a
token in its path, which must never be printed or stored.
"""

from __future__ import annotations

import base64
import contextlib
import io
import json
import logging
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from PIL import Image

from headclip.data.synthetic import make_sample
from headclip.reporting.notify import body_format, post_json, redacted
from jobs import audit as audit_job

SECRET = "T0KEN-s3cr3t-4f9a"


class Receiver:
    """An HTTP server on 127.0.0.1 that records POSTs and answers with the given status codes in turn."""

    def __init__(self, statuses=(200,), path: str = "hooks"):
        self.posts: list[dict] = []
        self.statuses = list(statuses)
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 - http.server API
                body = self.rfile.read(int(self.headers["Content-Length"]))
                receiver.posts.append({"path": self.path, "type": self.headers["Content-Type"], "body": body,
                                       "authorization": self.headers.get("Authorization")})
                status = receiver.statuses.pop(0) if len(receiver.statuses) > 1 else receiver.statuses[0]
                self.send_response(status)
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}/{path}/{SECRET}"  # /hooks/...: a Slack-style target
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
    reports = root / "history" / "_reports" / f"date={DAY}"
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
    body = json.loads(posts[0]["body"])  # Slack-style: one "text" field, what Slack, Mattermost and Teams show
    assert list(body) == ["text"]
    lines = body["text"].splitlines()
    assert lines[0] == f"HeadCLIP audit {DAY}: ALERT"
    assert [f"- {r}" for r in summary["reasons"]] == lines[1:1 + len(summary["reasons"])]
    assert f"Day: 4 images (4 new), 1 errors, {summary['figures']['anomalous']} flagged" in body["text"]
    assert lines[-1] == f"Report: {summary['report']}"
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
    assert len(receiver.posts) == 1
    assert json.loads(receiver.posts[0]["body"])["text"].startswith(f"HeadCLIP audit {DAY}: no alert\nDay: 4 images")


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


def test_generic_json_target_gets_the_summary_and_the_message(alerted, tiny_checkpoint):
    root, summary_text = alerted[0], alerted[5]
    with Receiver(path="notify") as receiver:
        code, out, err = _audit(root, tiny_checkpoint, "--webhook", receiver.url)
    assert code == audit_job.EXIT_ALERT and len(receiver.posts) == 1
    body = json.loads(receiver.posts[0]["body"])
    summary = json.loads((root / "history" / "_reports" / f"date={DAY}" / "summary.json").read_text())
    assert {k: v for k, v in body.items() if k != "text"} == summary  # the JSON, and the message beside it
    assert body["text"].startswith(f"HeadCLIP audit {DAY}: ALERT\n- error rate") and summary["report"] in body["text"]
    assert SECRET not in out + err


def test_body_format_by_service():
    assert body_format("https://hooks.slack.com/services/T/B/X") == "slack"
    assert body_format("https://acme.webhook.office.com/webhookb2/x") == "slack"
    assert body_format("https://chat.example.com/hooks/abc") == "slack"  # Mattermost
    assert body_format("https://example.com/alerts") == "json"
    assert body_format("https://hooks.slack.com/services/T/B/X", "json") == "json"


PASSWORD = "pa55-W0rd-91c2"


def test_userinfo_goes_as_a_header_and_is_never_printed(alerted, tiny_checkpoint):
    root = alerted[0]
    with Receiver(path="notify") as receiver:
        url = f"http://alerts:{PASSWORD}@127.0.0.1:{receiver.port}/notify/{SECRET}"
        code, out, err = _audit(root, tiny_checkpoint, "--webhook", url)
    assert code == audit_job.EXIT_ALERT and len(receiver.posts) == 1
    assert receiver.posts[0]["authorization"] == "Basic " + base64.b64encode(f"alerts:{PASSWORD}".encode()).decode()
    assert "webhook delivered to http://127.0.0.1:" in out
    for bad in (f"http://alerts:{PASSWORD}@nowhere.invalid/hook",  # no port, a host that does not resolve
                f"http://alerts:{PASSWORD}@127.0.0.1:1/hook"):  # nothing listens
        code, out, err = _audit(root, tiny_checkpoint, "--webhook", bad, "--webhook-timeout", "5")
        assert code == audit_job.EXIT_ALERT, err  # the documented alert code, not a crash's 1
        assert "webhook not delivered to http://" in err and "Traceback" not in err
        assert PASSWORD not in out + err and "alerts:" not in out + err


class Trickler:
    """A server on 127.0.0.1 that reads a request, then answers one byte every 0.2 s for a minute."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(4)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}/slow/{SECRET}"
        self.stop = threading.Event()
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self):
        while not self.stop.is_set():
            try:
                client, _ = self.sock.accept()
            except OSError:
                return
            with client:
                client.recv(65536)
                answer = b"HTTP/1.1 200 OK\r\nContent-Length: 400\r\n\r\n" + b"x" * 400
                for byte in answer:
                    if self.stop.wait(0.2):
                        return
                    try:
                        client.sendall(bytes([byte]))
                    except OSError:
                        break

    def close(self):
        self.stop.set()
        self.sock.close()


def test_trickling_webhook_ends_at_the_deadline(alerted, tiny_checkpoint):
    root = alerted[0]
    trickler = Trickler()
    try:
        started = time.monotonic()
        delivered, outcome = post_json(trickler.url, {"alert": True}, timeout=2.0, backoff=0.01)
        took = time.monotonic() - started
        assert not delivered and "within the deadline" in outcome and took < 4, (outcome, took)
        started = time.monotonic()
        code, out, err = _audit(root, tiny_checkpoint, "--webhook", trickler.url, "--webhook-timeout", "3")
        took = time.monotonic() - started
    finally:
        trickler.close()
    assert code == audit_job.EXIT_ALERT and "no answer within the deadline" in err and SECRET not in out + err
    assert took < 60, took  # the server would trickle for 80 s a request


def test_scored_count_is_logged_once_the_images_are_scored(ray_cluster, tiny_checkpoint, tmp_path, caplog):
    _day(tmp_path / "archive" / f"date={DAY}", good=2, broken=0)
    with caplog.at_level(logging.INFO, logger="jobs.audit"):
        _audit(tmp_path, tiny_checkpoint)
    lines = [(r.created, r.getMessage()) for r in caplog.records if r.name == "jobs.audit"]
    scored = [at for at, message in lines if message.startswith("scored 2 new")]
    shards = list((tmp_path / "history" / "scores").glob("date=*/run_id=*/shard-*.parquet"))
    assert len(scored) == 1 and shards, lines
    assert scored[0] >= max(p.stat().st_mtime for p in shards), lines  # after the rows exist, not before
    assert any(message.startswith("scoring 2 images: 2 new") for _, message in lines), lines
