"""Keeping secrets out of everything recorded or printed: commands, configs, URIs, messages.

A value is a secret when its name looks like one (contains key, secret, token,
password, passwd, credential, auth, signature or session): in storage options
and other mappings, in ``--flag value`` and ``NAME=value`` command-line
arguments, and in URI query parameters. The password part of a URI's
``user:password@`` is a secret too, and so is the user part. Names other than
those (an endpoint URL, a region) stay readable. Checkpoint provenance, run
plans, Parquet metadata, summaries and printed errors all pass through here.

Free text is redacted by shape and by value. By shape: every URI's user-info
and secret query values, and scheme-less ``user:password@host`` (as botocore
repeats an ``s3://KEY:SECRET@bucket`` input in its own messages). By value:
the secrets of a command line, once :func:`remember_secrets` has seen it, are
hidden wherever they reappear, in any message of any library.
"""

from __future__ import annotations

import json
import logging
import re
import shlex
import sys
import traceback
from typing import Any, Sequence
from urllib.parse import parse_qsl, quote, unquote, urlencode, urlsplit, urlunsplit

REDACTED = "***"
SECRET_WORDS = ("key", "secret", "token", "password", "passwd", "credential", "auth", "signature", "session")
# flags whose whole value is a JSON mapping of options
OPTION_FLAGS = ("--storage-options",)
_URI = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^\s'\"]+")
# user:password@host without a scheme (the user-info of a URI that a message repeats in part)
_USERINFO = re.compile(r"(?<![\w/:@.%+-])[^\s'\"/@:<>()\[\]{}]+:[^\s'\"/@<>()\[\]{}]+@(?=[\w.-])")
MIN_SECRET_CHARS = 4  # shorter values are not hidden by value (they would hide ordinary text)
_known: set[str] = set()


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
    """Free text with every URI's credentials, every ``user:password@`` and every remembered secret removed."""
    text = _URI.sub(lambda match: redact_uri(match.group(0)), str(text))
    text = _USERINFO.sub(f"{REDACTED}@", text)
    for secret in sorted(_known, key=len, reverse=True):
        if secret in text:
            text = text.replace(secret, REDACTED)
    return text


def _uri_secrets(uri: str) -> list[str]:
    """The user-info parts and secret query values of ``uri``, as written and decoded."""
    try:
        parts = urlsplit(uri)
    except ValueError:
        return []
    found = []
    if "@" in parts.netloc:
        info = parts.netloc.rsplit("@", 1)[0]
        found += [info, *info.split(":", 1)]
    found += [v for k, v in parse_qsl(parts.query, keep_blank_values=True) if is_secret_name(k)]
    return found


def _option_secrets(value: Any) -> list[str]:
    if isinstance(value, dict):
        return [s for k, v in value.items()
                for s in ([str(v)] if is_secret_name(k) and isinstance(v, (str, int)) else _option_secrets(v))]
    if isinstance(value, (list, tuple)):
        return [s for v in value for s in _option_secrets(v)]
    return []


def command_secrets(argv: Sequence[str]) -> set[str]:
    """The secret values a command line holds (see the module doc), as written, quoted and unquoted."""
    found: list[str] = []
    pending = None
    for arg in map(str, argv):
        if pending == "options":
            try:
                found += _option_secrets(json.loads(arg))
            except ValueError:
                pass
        elif pending == "secret":
            found.append(arg)
        elif arg.startswith("--") and "=" in arg:
            flag, value = arg.split("=", 1)
            if flag in OPTION_FLAGS:
                found += command_secrets([flag, value])
            elif is_secret_name(flag):
                found.append(value)
        elif re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", arg, re.S) and is_secret_name(arg.split("=", 1)[0]):
            found.append(arg.split("=", 1)[1])
        for match in _URI.finditer(arg):
            found += _uri_secrets(match.group(0))
        is_flag = pending is None and arg.startswith("--") and "=" not in arg
        pending = None
        if is_flag:
            pending = "options" if arg in OPTION_FLAGS else "secret" if is_secret_name(arg) else None
    variants = {v for s in found for v in (s, unquote(s), quote(s, safe=""))}
    return {v for v in variants if len(v) >= MIN_SECRET_CHARS}


def remember_secrets(argv: Sequence[str]) -> None:
    """Hide the secrets of ``argv`` in all free text redacted from now on (printed errors, log lines)."""
    _known.update(command_secrets(argv))


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


class RedactingFilter(logging.Filter):
    """A logging filter that passes every record's message through :func:`redact_text`."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # noqa: BLE001 - a record that cannot format is left to logging's own report
            return True
        record.msg, record.args = redact_text(message), None
        if record.exc_info and not record.exc_text:
            record.exc_text = redact_text("".join(traceback.format_exception(*record.exc_info)).rstrip())
        return True


def redacting_excepthook(kind, value, tb) -> None:
    """``sys.excepthook`` that prints the traceback with its secrets removed."""
    sys.stderr.write(redact_text("".join(traceback.format_exception(kind, value, tb))))
