"""Credentials never leave the process in a message.

Errors, log lines, Kubernetes Events, status messages and termination
messages are read by people who must not see the S3 keys a Job runs with.
Storage errors quote endpoint URLs (which may carry ``user:password@``),
presigned URLs carry signatures in their query string, and a traceback can
quote anything. :func:`redact` is applied where a message is built or leaves
the process: storage error construction, the CLI's error printer, the
operator's status and Event writers, and the logging filter below.

What is masked (each replaced by ``***``, the rest of the text kept so the
message still says what went wrong):

* userinfo in any ``scheme://user:password@host`` URL;
* query-string credentials: ``X-Amz-Signature``, ``X-Amz-Credential``,
  ``X-Amz-Security-Token``, ``Signature``, ``AWSAccessKeyId``, ``sig``,
  ``token``, ``password``, ``secret`` and similar ``name=value`` pairs;
* ``key: value`` / ``key=value`` text naming a secret (``aws_secret_access_key``,
  ``session_token``, ``password``, ``secret``);
* the literal values of secret-holding environment variables of this process
  (``AWS_SECRET_ACCESS_KEY``, ``AWS_SESSION_TOKEN``, ...) and of credentials
  handed over explicitly (:func:`remember`, used by
  :func:`edgeslim.storage.credentials` for a model's Secret).
"""

from __future__ import annotations

import logging
import os
import re
import threading
from typing import Any

MASK = "***"

#: Environment variables whose values are secrets wherever they show up.
SECRET_ENV = (
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_SECURITY_TOKEN",
    "AWS_WEB_IDENTITY_TOKEN",
)
# Shorter values are not masked literally: "abc" would mangle unrelated text,
# and real secrets (40-char AWS keys, tokens) are far longer.
_MIN_LITERAL = 8

_USERINFO = re.compile(r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.-]*://)[^/\s@'\"<>]+@")
_QUERY = re.compile(
    r"(?<![A-Za-z0-9_])(?P<key>(?i:x-amz-signature|x-amz-credential|x-amz-security-token|signature"
    r"|awsaccesskeyid|sig|token|access_token|password|passwd|secret|api_key|apikey))"
    r"=(?P<value>[^&\s'\"<>]+)"
)
_KEY_VALUE = re.compile(
    r"(?<![A-Za-z0-9_])(?P<key>(?i:aws_secret_access_key|secret_access_key|secretaccesskey|aws_session_token"
    r"|session_token|sessiontoken|password|passwd|secret))"
    r"(?P<sep>['\"]?\s*[:=]\s*['\"]?)(?P<value>[^\s'\",}&]+)"
)

_remembered: set[str] = set()
_lock = threading.Lock()


def remember(*values: str | None) -> None:
    """Masks these literal values from now on (e.g. keys read from a model's Secret)."""
    with _lock:
        _remembered.update(v for v in values if v and len(v) >= _MIN_LITERAL)


def _literals() -> list[str]:
    env = [os.environ.get(name) or "" for name in SECRET_ENV]
    with _lock:
        values = {v for v in env if len(v) >= _MIN_LITERAL} | _remembered
    # Longest first, so a secret that contains another is masked whole.
    return sorted(values, key=len, reverse=True)


def redact(text: str) -> str:
    """``text`` with every credential this module recognises replaced by ``***``."""
    if not text:
        return text
    for value in _literals():
        text = text.replace(value, MASK)
    text = _USERINFO.sub(lambda m: f"{m['scheme']}{MASK}@", text)
    text = _QUERY.sub(lambda m: f"{m['key']}={MASK}", text)
    return _KEY_VALUE.sub(lambda m: f"{m['key']}{m['sep']}{MASK}", text)


def redact_messages(obj: Any) -> Any:
    """A copy of a JSON-like object (a status, an Event) with every ``message`` redacted."""
    if isinstance(obj, dict):
        return {
            k: redact(v) if k == "message" and isinstance(v, str) else redact_messages(v)
            for k, v in obj.items()
        }
    if isinstance(obj, list):
        return [redact_messages(v) for v in obj]
    return obj


class RedactingFilter(logging.Filter):
    """A logging filter that redacts each record's final message (args included)."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        clean = redact(message)
        if clean != message:
            record.msg, record.args = clean, None
        if record.exc_text:
            record.exc_text = redact(record.exc_text)
        return True
