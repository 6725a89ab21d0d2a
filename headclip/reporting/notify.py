"""Telling people about an audit without anyone reading logs: a webhook POST of the summary.

The URL is treated as a secret (chat webhooks carry their token in it): it is
never logged or written anywhere; messages name its scheme and host only.
"""

from __future__ import annotations

import json
import logging
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

log = logging.getLogger(__name__)


def redacted(url: str) -> str:
    """``scheme://host[:port]`` of ``url``, without path, query or credentials."""
    parts = urllib.parse.urlsplit(url)
    host = parts.hostname or "?"
    return f"{parts.scheme}://{host}" + (f":{parts.port}" if parts.port else "")


def post_json(url: str, document: dict[str, Any], attempts: int = 3, timeout: float = 10.0,
              backoff: float = 1.0) -> tuple[bool, str]:
    """POST ``document`` as JSON to ``url``; retries connection errors and 5xx answers.

    Returns (delivered, one-line outcome). Never raises for network problems.
    """
    body = json.dumps(document).encode()
    outcome = ""
    for attempt in range(1, attempts + 1):
        request = urllib.request.Request(url, data=body, method="POST",
                                         headers={"Content-Type": "application/json",
                                                  "User-Agent": "headclip-audit"})
        try:
            with urllib.request.urlopen(request, timeout=timeout) as answer:  # noqa: S310 - user's URL
                return True, f"delivered to {redacted(url)} (HTTP {answer.status})"
        except urllib.error.HTTPError as err:
            outcome = f"HTTP {err.code}"
            if err.code < 500:
                break
        except (urllib.error.URLError, OSError) as err:
            reason = getattr(err, "reason", err)
            outcome = f"{type(reason).__name__}: {reason}"
        if attempt < attempts:
            time.sleep(backoff * attempt)
    message = f"not delivered to {redacted(url)}: {outcome}"
    log.warning("webhook %s", message)
    return False, message
