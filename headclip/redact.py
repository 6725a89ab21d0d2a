"""Keeping secrets out of everything recorded or printed: commands, configs, URIs, messages.

A value is a secret when its name looks like one (contains key, secret, token,
password, passwd, credential, auth, signature or session): in storage options
and other mappings, in ``--flag value`` and ``NAME=value`` command-line
arguments, and in URI query parameters. The password part of a URI's
``user:password@`` is a secret too, and so is the user part. Names other than
those (an endpoint URL, a region) stay readable. Checkpoint provenance, run
plans, Parquet metadata, summaries and printed errors all pass through here.
"""

from __future__ import annotations

import json
import re
import shlex
from typing import Any, Sequence
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

REDACTED = "***"
SECRET_WORDS = ("key", "secret", "token", "password", "passwd", "credential", "auth", "signature", "session")
# flags whose whole value is a JSON mapping of options
OPTION_FLAGS = ("--storage-options",)
_URI = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^\s'\"]+")


def is_secret_name(name: str) -> bool:
    """Whether a key, flag or parameter called ``name`` holds a secret."""
    lowered = str(name).lower().lstrip("-")
    return any(word in lowered for word in SECRET_WORDS)


def redact_uri(uri: str) -> str:
    """``uri`` without credentials in its user-info or query; other strings unchanged."""
    if "://" not in uri:
        return uri
    try:
        parts = urlsplit(uri)
    except ValueError:
        return REDACTED
    netloc = parts.netloc
    if "@" in netloc:
        netloc = f"{REDACTED}@{netloc.rsplit('@', 1)[1]}"
    query = parts.query
    if query:
        pairs = parse_qsl(query, keep_blank_values=True)
        if any(is_secret_name(k) for k, _ in pairs):
            query = urlencode([(k, REDACTED if is_secret_name(k) else v) for k, v in pairs], safe="*")
    if netloc == parts.netloc and query == parts.query:
        return uri
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def redact_text(text: str) -> str:
    """Every URI inside free text with its credentials removed."""
    return _URI.sub(lambda match: redact_uri(match.group(0)), text)


def redact_options(value: Any) -> Any:
    """A copy of a (nested) mapping with secret-named entries replaced by ``***``."""
    if isinstance(value, dict):
        return {k: (REDACTED if is_secret_name(k) and v not in (None, "") else redact_options(v))
                for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [redact_options(v) for v in value]
    if isinstance(value, str):
        return redact_text(value)
    return value


def _redact_option_json(text: str) -> str:
    try:
        value = json.loads(text)
    except ValueError:
        return REDACTED
    return json.dumps(redact_options(value), sort_keys=True)


def redact_command(argv: Sequence[str]) -> list[str]:
    """Command-line arguments with every secret replaced by ``***`` (see the module doc)."""
    out: list[str] = []
    pending = None  # how the next argument is redacted: "options", "secret" or None
    for arg in map(str, argv):
        if pending == "options":
            out.append(_redact_option_json(arg))
        elif pending == "secret":
            out.append(REDACTED)
        elif arg.startswith("--") and "=" in arg:
            flag, value = arg.split("=", 1)
            if flag in OPTION_FLAGS:
                value = _redact_option_json(value)
            else:
                value = REDACTED if is_secret_name(flag) else redact_text(value)
            out.append(f"{flag}={value}")
        elif re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", arg, re.S) and is_secret_name(arg.split("=", 1)[0]):
            out.append(f"{arg.split('=', 1)[0]}={REDACTED}")
        else:
            out.append(redact_text(arg))
        is_flag = pending is None and arg.startswith("--") and "=" not in arg
        pending = None
        if is_flag:
            pending = "options" if arg in OPTION_FLAGS else "secret" if is_secret_name(arg) else None
    return out


def redact_command_line(text: str) -> str:
    """A recorded shell command line with its secrets removed (see :func:`redact_command`)."""
    try:
        return shlex.join(redact_command(shlex.split(text)))
    except ValueError:
        return redact_text(text)


COMMAND_KEYS = ("provenance", "command")


def redact_config(config: dict) -> dict:
    """A recorded config with its secrets removed; ``provenance``/``command`` strings as command lines."""
    out = redact_options(config)
    for key in COMMAND_KEYS:
        if isinstance(config.get(key), str):
            out[key] = redact_command_line(config[key])
    return out
