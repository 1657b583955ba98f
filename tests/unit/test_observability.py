"""Logs, redaction and trace-context helpers, without servers (adr/0011)."""

from __future__ import annotations

import contextlib
import io
import json
import logging
import subprocess
import sys
import uuid
from collections.abc import Iterator

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.trace import SpanContext, TraceFlags

from topology_store.cli.main import _configured_secrets, build_parser
from topology_store.projector.observe import bounded_event_type
from topology_store.runtime.logs import (
    REDACTED,
    REDACTED_EMAIL,
    choose_format,
    configure_logging,
    redact,
    register_secrets,
)
from topology_store.runtime.settings import Settings
from topology_store.runtime.tracing import (
    MAX_LINKS,
    TRACEPARENT,
    apply_span_arguments,
    batch_contexts,
    configure_tracing,
    context_from_headers,
)


@contextlib.contextmanager
def root_logger_restored() -> Iterator[None]:
    """Whatever a test does to the root logger is undone afterwards."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    try:
        yield
    finally:
        for handler in list(root.handlers):
            root.removeHandler(handler)
        for handler in handlers:
            root.addHandler(handler)
        root.setLevel(level)


@pytest.fixture
def captured() -> Iterator[io.StringIO]:
    """The root logger writing JSON into a buffer; restored afterwards."""
    with root_logger_restored():
        stream = io.StringIO()
        configure_logging("json", logging.DEBUG, stream)
        yield stream


def lines(stream: io.StringIO) -> list[dict[str, object]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("GET /v1/claims/EMAIL/Ada.Lovelace@Example.COM HTTP/1.1", f"GET /v1/claims/EMAIL/{REDACTED_EMAIL} HTTP/1.1"),
        ("value=ada%40example.com&x=1", f"value={REDACTED_EMAIL}&x=1"),
        ("record key b'EMAIL:ada@example.com'", f"record key b'EMAIL:{REDACTED_EMAIL}'"),
        ("Authorization: Bearer abc.def-123", f"Authorization: Bearer {REDACTED}"),
        ("GET /v1/snapshot?access_token=abc123&since=4", f"GET /v1/snapshot?access_token={REDACTED}&since=4"),
        ('{"api_token": "s3cr3t"}', f'{{"api_token": "{REDACTED}"}}'),
        ("postgresql://app:hunter2@db.internal/topology", f"postgresql://app:{REDACTED}@db.internal/topology"),
        # Not personal data: kept as they are.
        ("postgresql://postgres@127.0.0.1:5432/topology", "postgresql://postgres@127.0.0.1:5432/topology"),
        ("EMAIL hmac-sha256:0a1b2c", "EMAIL hmac-sha256:0a1b2c"),
        ("TOPOLOGY_API_TOKENS: not JSON (line 1, column 2)", "TOPOLOGY_API_TOKENS: not JSON (line 1, column 2)"),
    ],
)
def test_redact(text: str, expected: str) -> None:
    assert redact(text) == expected


def test_json_lines_carry_extra_fields_and_trace_ids_and_redact_everything(captured: io.StringIO) -> None:
    secret = f"configured-{uuid.uuid4().hex}"
    register_secrets([secret])
    provider = TracerProvider()
    log = logging.getLogger("topology_store.projector.consumer")
    with provider.get_tracer("test").start_as_current_span("apply") as span:
        log.error("dead letter %s: %s", "t[0]@5", "key b'EMAIL:eve@example.net'",
                  extra={"topic": "t", "partition": 0, "offset": 5, "event_id": uuid.UUID(int=1),
                         "detail": {"who": "eve@example.net", "tokens": [secret]}})
    try:
        raise ValueError(f"bad value mallory@example.org with {secret}")
    except ValueError:
        log.exception("failed")
    first, second = lines(captured)
    assert first["level"] == "error" and first["logger"] == "topology_store.projector.consumer"
    assert first["message"] == f"dead letter t[0]@5: key b'EMAIL:{REDACTED_EMAIL}'"
    assert (first["topic"], first["partition"], first["offset"]) == ("t", 0, 5)
    assert first["event_id"] == str(uuid.UUID(int=1))
    assert first["detail"] == {"who": REDACTED_EMAIL, "tokens": [REDACTED]}
    assert first["trace_id"] == format(span.get_span_context().trace_id, "032x")
    assert first["span_id"] == format(span.get_span_context().span_id, "016x")
    assert "trace_id" not in second
    assert "ValueError" in str(second["exception"])
    output = captured.getvalue()
    assert "@example" not in output and secret not in output


def test_text_format_is_redacted_too() -> None:
    stream = io.StringIO()
    with root_logger_restored():
        configure_logging("text", logging.INFO, stream)
        logging.getLogger("x").info("hello eve@example.net", extra={"offset": 3})
    line = stream.getvalue().strip()
    assert line.endswith(f"INFO x hello {REDACTED_EMAIL} offset=3")


def test_services_log_json_and_interactive_commands_text() -> None:
    commands = {name for name in build_parser()._subparsers._group_actions[0].choices}  # type: ignore[union-attr]
    for name in ("project", "serve", "relay", "router"):
        assert name in commands and choose_format("auto", name) == "json"
    for name in ("emit", "migrate", "topics", "up"):
        assert name in commands and choose_format("auto", name) == "text"
    assert choose_format("text", "serve") == "text" and choose_format("json", "emit") == "json"
    assert Settings(log_format="JSON", log_level="debug").log_level == "DEBUG"


def test_every_configured_token_and_the_hmac_key_are_secrets() -> None:
    settings = Settings(api_tokens='{"router-token-123": ["snapshot:read"]}', router_token="edge-token-456",
                        claim_hmac_secret="hmac-key-789")
    assert set(_configured_secrets(settings)) >= {"router-token-123", "edge-token-456", "hmac-key-789"}


def _context(trace_id: int, span_id: int) -> SpanContext:
    return SpanContext(trace_id, span_id, is_remote=True, trace_flags=TraceFlags(TraceFlags.SAMPLED))


def _header(context: SpanContext) -> tuple[str, bytes]:
    return TRACEPARENT, f"00-{context.trace_id:032x}-{context.span_id:016x}-01".encode()


def test_a_batch_of_many_traces_links_them_all_and_continues_none() -> None:
    one, two = _context(1, 11), _context(2, 22)
    contexts, dropped = batch_contexts([[("event_type", b"X"), _header(one)], [_header(two)], [_header(one)], []])
    assert [(c.trace_id, c.span_id) for c in contexts] == [(1, 11), (2, 22)] and dropped == 0
    parent, links = apply_span_arguments(contexts)
    assert parent is None and [link.context.span_id for link in links] == [11, 22]


def test_a_batch_of_one_trace_continues_it() -> None:
    contexts, _ = batch_contexts([[_header(_context(1, 11))], [_header(_context(1, 12))]])
    parent, links = apply_span_arguments(contexts)
    assert parent is not None and len(links) == 2
    from opentelemetry import trace

    assert trace.get_current_span(parent).get_span_context().span_id == 11


def test_links_are_capped_and_bad_headers_ignored() -> None:
    headers = [[_header(_context(n, n))] for n in range(1, MAX_LINKS + 11)]
    contexts, dropped = batch_contexts(headers)
    assert (len(contexts), dropped) == (MAX_LINKS, 10)
    assert context_from_headers([(TRACEPARENT, b"00-garbage")]) is None
    assert context_from_headers([("event_type", b"ClaimCreated")]) is None


def test_event_type_labels_are_bounded() -> None:
    assert bounded_event_type("ClaimCreated") == "ClaimCreated"
    assert bounded_event_type("LeaseExpiryTick") == "LeaseExpiryTick"
    assert bounded_event_type("x" * 60) == "unknown"


def test_tracing_is_off_unless_an_exporter_is_named() -> None:
    assert configure_tracing("topology-test", {}) is False
    assert configure_tracing("topology-test", {"OTEL_TRACES_EXPORTER": "none"}) is False
    # The console exporter (SDK installed): a child process, since a tracer provider is process-global.
    code = (
        "from opentelemetry import trace\n"
        "from topology_store.runtime.tracing import configure_tracing, tracer\n"
        "assert configure_tracing('topology-test', {'OTEL_TRACES_EXPORTER': 'console'})\n"
        "tracer().start_span('probe span').end()\n"
        "trace.get_tracer_provider().shutdown()\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    assert '"name": "probe span"' in result.stderr and '"service.name": "topology-test"' in result.stderr
    assert result.stdout == ""  # stdout is for command output (topology emit's result lines)


def test_the_default_handler_follows_sys_stderr_when_it_is_swapped(monkeypatch: pytest.MonkeyPatch) -> None:
    # In-process CLI runs under a capturing harness: the stderr seen at configure time
    # may be closed later; records must go to the stderr of the moment instead.
    first, second = io.StringIO(), io.StringIO()
    with root_logger_restored():
        monkeypatch.setattr(sys, "stderr", first)
        configure_logging("text", logging.INFO)
        first.close()
        monkeypatch.setattr(sys, "stderr", second)
        logging.getLogger("x").info("after the swap")
    assert "after the swap" in second.getvalue()
