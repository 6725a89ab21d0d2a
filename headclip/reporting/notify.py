"""Telling people about an audit without anyone reading logs: a webhook POST of a message and the summary.

Two body formats, in the services' own terms (no notification library: each is one JSON POST):

- ``slack``: ``{"text": message}``, which Slack and Mattermost incoming webhooks and Microsoft
  Teams' connector webhooks show as a chat message;
- ``json``: the summary document with the same message added as ``text``, for a program.

``auto`` picks ``slack`` for ``hooks.slack.com``, ``*.webhook.office.com`` and ``/hooks/...``
paths (Mattermost), ``json`` otherwise.

The URL is treated as a secret (chat webhooks carry their token in it): it is never logged
or written anywhere; messages name its scheme, host and port only. Credentials in its userinfo
(``https://user:password@host/...``) are sent as an ``Authorization: Basic`` header. Delivery,
retries included, ends by a total deadline, however slowly a server answers.
"""

from __future__ import annotations

import base64
import http.client
import json
import logging
import socket
import ssl
import threading
import time
import urllib.parse
from typing import Any

log = logging.getLogger(__name__)

FORMATS = ("auto", "slack", "json")
SLACK_STYLE_HOSTS = ("hooks.slack.com",)
SLACK_STYLE_SUFFIXES = (".webhook.office.com",)


class _Failed(Exception):
    """One attempt that did not deliver: ``outcome`` is safe to print; ``retry`` whether another may help."""

    def __init__(self, outcome: str, retry: bool):
        super().__init__(outcome)
        self.outcome, self.retry = outcome, retry


def redacted(url: str) -> str:
    """``scheme://host[:port]`` of ``url``, without credentials, path or query."""
    parts = urllib.parse.urlsplit(url)
    try:
        port = parts.port
    except ValueError:
        port = None
    return f"{parts.scheme}://{parts.hostname or '?'}" + (f":{port}" if port else "")


def body_format(url: str, fmt: str = "auto") -> str:
    """``slack`` or ``json``: ``fmt`` itself, or for ``auto`` what the URL's service takes."""
    if fmt != "auto":
        return fmt
    parts = urllib.parse.urlsplit(url)
    host = (parts.hostname or "").lower()
    if host in SLACK_STYLE_HOSTS or host.endswith(SLACK_STYLE_SUFFIXES) or parts.path.startswith("/hooks/"):
        return "slack"
    return "json"


def alert_body(url: str, text: str, document: dict[str, Any], fmt: str = "auto") -> dict[str, Any]:
    """The JSON body for the URL's format: ``{"text": text}`` or the document with ``text``."""
    return {"text": text} if body_format(url, fmt) == "slack" else {**document, "text": text}


def _describe(err: BaseException) -> str:
    """A reason that never repeats the URL (some exceptions quote it, with its credentials)."""
    if isinstance(err, (socket.timeout, TimeoutError)):
        return "timed out"
    if isinstance(err, ssl.SSLError):
        return f"TLS error ({type(err).__name__})"
    if isinstance(err, OSError) and err.strerror:
        return f"{type(err).__name__}: {err.strerror}"
    return type(err).__name__


def _attempt(parts: urllib.parse.SplitResult, body: bytes, headers: dict[str, str], deadline: float) -> int:
    """POST once; the HTTP status. Ends by ``deadline`` (time.monotonic()) whatever the server does."""
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        raise _Failed("no time left", retry=False)
    try:
        port = parts.port
    except ValueError:
        raise _Failed("the URL's port is not a number", retry=False) from None
    cls = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
    connection = cls(parts.hostname, port, timeout=remaining)
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    result: dict[str, Any] = {}

    def post() -> None:
        try:
            connection.request("POST", target, body=body, headers=headers)
            answer = connection.getresponse()
            answer.read()
            result["status"] = answer.status
        except BaseException as err:  # noqa: BLE001 - told to the caller, never raised in this thread
            result["error"] = err

    worker = threading.Thread(target=post, name="webhook", daemon=True)
    worker.start()
    worker.join(max(0.0, deadline - time.monotonic()))
    if worker.is_alive():  # a server that trickles its answer: cut the connection at the deadline
        sock = connection.sock
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        connection.close()
        worker.join(1.0)
        raise _Failed("no answer within the deadline", retry=False)
    connection.close()
    if "error" in result:
        raise _Failed(_describe(result["error"]), retry=True)
    return result["status"]


def post_json(url: str, document: dict[str, Any], attempts: int = 3, timeout: float = 30.0,
              backoff: float = 1.0) -> tuple[bool, str]:
    """POST ``document`` as JSON to ``url``; retries connection errors and 5xx answers.

    ``timeout``: seconds for the whole delivery, retries and waits included. Returns
    (delivered, one-line outcome without the URL's path, query or credentials). Never raises.
    """
    deadline = time.monotonic() + timeout
    parts = urllib.parse.urlsplit(url)
    headers = {"Content-Type": "application/json", "User-Agent": "headclip-audit", "Connection": "close"}
    if parts.username is not None:
        user = urllib.parse.unquote(parts.username)
        password = urllib.parse.unquote(parts.password or "")
        headers["Authorization"] = "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()
    body = json.dumps(document).encode()
    outcome = ""
    for attempt in range(1, attempts + 1):
        try:
            status = _attempt(parts, body, headers, deadline)
            if status < 300:
                return True, f"delivered to {redacted(url)} (HTTP {status})"
            outcome = f"HTTP {status}"
            if status < 500:
                break
        except _Failed as failed:
            outcome = failed.outcome
            if not failed.retry:
                break
        wait = backoff * attempt
        if attempt == attempts or time.monotonic() + wait >= deadline:
            break
        time.sleep(wait)
    message = f"not delivered to {redacted(url)}: {outcome}"
    log.warning("webhook %s", message)
    return False, message


def post_alert(url: str, text: str, document: dict[str, Any], fmt: str = "auto", timeout: float = 30.0,
               attempts: int = 3, backoff: float = 1.0) -> tuple[bool, str]:
    """POST ``text`` (and, in the ``json`` format, ``document``) to ``url``; see :func:`post_json`."""
    return post_json(url, alert_body(url, text, document, fmt), attempts, timeout, backoff)

