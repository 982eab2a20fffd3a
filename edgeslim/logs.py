"""How the operator and the edge server write their logs: text or JSON lines.

`EDGESLIM_LOG_FORMAT=json` (the chart's `logFormat: json`) turns every log record
into one JSON object per line on stderr, for log pipelines (Loki, Elasticsearch,
Cloud Logging) that index fields instead of parsing text. The keys:

* ``time`` (RFC 3339, UTC, milliseconds), ``level`` (INFO, WARNING, ...),
  ``logger`` and ``message``;
* ``object``: the Kubernetes object a kopf per-object record is about
  (``apiVersion``, ``kind``, ``namespace``, ``name``, ``uid``);
* ``exception``: the traceback, when the record carries one.

Either way credentials are masked (:mod:`edgeslim.redact`) before a line is
written. Standard library only: the serving image has neither kopf nor
python-json-logger.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import sys
from collections.abc import Mapping
from typing import Any

from edgeslim.errors import BadInput
from edgeslim.redact import RedactingFilter, redact

LOG_FORMAT_ENV = "EDGESLIM_LOG_FORMAT"
TEXT, JSON = "text", "json"
FORMATS = (TEXT, JSON)
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def log_format(environ: Mapping[str, str] | None = None) -> str:
    """The format EDGESLIM_LOG_FORMAT asks for (default text); anything else is BadInput."""
    raw = (os.environ if environ is None else environ).get(LOG_FORMAT_ENV, "")
    value = raw.strip().lower() or TEXT
    if value not in FORMATS:
        raise BadInput(f"{LOG_FORMAT_ENV}={raw!r}: expected one of {', '.join(FORMATS)}")
    return value


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line (newlines inside values are escaped)."""

    def format(self, record: logging.LogRecord) -> str:
        at = datetime.datetime.fromtimestamp(record.created, datetime.UTC)
        line: dict[str, Any] = {
            "time": at.strftime("%Y-%m-%dT%H:%M:%S.") + f"{at.microsecond // 1000:03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": redact(record.getMessage()),
        }
        # kopf's per-object loggers carry the object's reference (see kopf's ObjectLogger).
        ref = getattr(record, "k8s_ref", None)
        if isinstance(ref, dict):
            line["object"] = {k: v for k, v in ref.items() if v is not None}
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            line["exception"] = redact(record.exc_text)
        if record.stack_info:
            line["stack"] = redact(self.formatStack(record.stack_info))
        return json.dumps(line, ensure_ascii=False, default=str)


def formatter(fmt: str, text_format: str = TEXT_FORMAT) -> logging.Formatter:
    return JsonFormatter() if fmt == JSON else logging.Formatter(text_format)


def install(fmt: str, logger: logging.Logger | None = None) -> None:
    """Redact on every handler of `logger` (default: root) and, for json, format
    with JsonFormatter; text keeps each handler's own formatter (kopf's object prefix)."""
    target = logger or logging.getLogger()
    redacting = RedactingFilter()
    for handler in target.handlers:
        if not any(isinstance(f, RedactingFilter) for f in handler.filters):
            handler.addFilter(redacting)
        if fmt == JSON:
            handler.setFormatter(JsonFormatter())


def configure(level: str | int = "INFO", fmt: str | None = None) -> None:
    """Root logging for a process of ours (`edgeslim serve`): one stderr handler,
    which is what `kubectl logs` shows, in the format EDGESLIM_LOG_FORMAT names."""
    fmt = fmt or log_format()
    root = logging.getLogger()
    if root.handlers:
        return  # like logging.basicConfig: a host that set up logging (pytest) keeps it
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(formatter(fmt))
    root.addHandler(handler)
    root.setLevel(level.upper() if isinstance(level, str) else level)
    install(fmt, root)
