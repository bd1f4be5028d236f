"""structlog setup: JSON lines (or a console view) with secrets redacted, cheap when filtered."""

from __future__ import annotations

import asyncio
import errno
import logging
import re
import sys
import time
from collections.abc import Callable, Mapping
from typing import Any, Literal, TextIO, cast

import structlog
from structlog.typing import EventDict, FilteringBoundLogger, Processor, WrappedLogger

from dripd.redaction import urls_for_log

REDACTED = "[REDACTED]"

_SECRET_KEY = re.compile(r"password|secret|token|api_key|authorization|credentials", re.IGNORECASE)

_LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}

# Marks the one stdlib handler we install, so configuring again replaces it.
_HANDLER_NAME = "dripd"

# The HTTP client libraries hooks (and HTTP providers) use: their records are cut down.
_HTTP_CLIENT_LOGGERS = ("httpx", "httpcore")


def http_client_records(record: logging.LogRecord) -> bool:
    """A stdlib logging filter for the HTTP client libraries' records (always kept, changed).

    httpx logs every request at INFO with its whole URL (`HTTP Request: POST
    https://…?email=… "HTTP/1.1 200 OK"`): a hook's rendered URL can carry subscriber data
    in its path and query, and an HTTP API's its key. Its URLs are cut to scheme and host
    (`url_for_log`). httpcore's DEBUG traces (`receive_response_headers.complete
    return_value=(…headers…)`) keep their step name only.
    """
    name = record.name
    if not any(name == n or name.startswith(f"{n}.") for n in _HTTP_CLIENT_LOGGERS):
        return True
    message = record.getMessage()
    if name == "httpcore" or name.startswith("httpcore."):
        message = message.split(" ", 1)[0]
    record.msg, record.args = urls_for_log(message), None
    return True


def _redact_value(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {
            key: REDACTED if isinstance(key, str) and _SECRET_KEY.search(key) else _redact_value(v)
            for key, v in value.items()
        }
    return value


def redact(_logger: WrappedLogger, _method: str, event_dict: EventDict) -> EventDict:
    """Replace the values of secret-looking keys (also inside nested mappings)."""
    for key, value in event_dict.items():
        if _SECRET_KEY.search(key):
            event_dict[key] = REDACTED
        elif isinstance(value, Mapping):
            event_dict[key] = _redact_value(value)
    return event_dict


class _CurrentStderr:
    """Whatever `sys.stderr` is when a line is written (loggers are cached; streams change)."""

    def write(self, text: str) -> int:
        return sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()

    def isatty(self) -> bool:
        return sys.stderr.isatty()


class _NamedWriteLogger(structlog.WriteLogger):
    def __init__(self, file: TextIO, name: str) -> None:
        super().__init__(file)
        self.name = name


class _NamedWriteLoggerFactory:
    """Like structlog.WriteLoggerFactory, but keeps the name passed to `get_logger(name)`."""

    def __init__(self, file: TextIO) -> None:
        self._file = file

    def __call__(self, *args: Any) -> _NamedWriteLogger:
        return _NamedWriteLogger(self._file, str(args[0]) if args else "")


def _add_logger_name(logger: WrappedLogger, _method: str, event_dict: EventDict) -> EventDict:
    name = getattr(logger, "name", None)
    if name:
        event_dict["logger"] = name
    return event_dict


CACHE_LOGGERS = True
"""Whether `configure` caches loggers on first use (fast; a daemon configures once). The test
suite turns it off: it configures many times in one process, and a logger cached under an
earlier configuration would keep writing where that one did."""


def configure(
    level: str,
    fmt: Literal["json", "console"] = "json",
    stream: TextIO | None = None,
) -> None:
    """Configure structlog (and route stdlib logging, e.g. uvicorn's, to the same output).

    `level` is one of debug, info, warning, error. Loggers are cached on first use, so
    call this once at startup, before anything logs.
    """
    try:
        numeric = _LEVELS[level.lower()]
    except KeyError:
        raise ValueError(f"unknown log level {level!r}") from None
    out: TextIO = stream if stream is not None else cast(TextIO, _CurrentStderr())

    shared: list[Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        redact,
    ]
    renderer: Processor
    if fmt == "console":
        # plain_traceback: the rich formatter would print local variables, secrets included.
        renderer = structlog.dev.ConsoleRenderer(
            colors=out.isatty(), exception_formatter=structlog.dev.plain_traceback
        )
        tail: list[Processor] = [structlog.processors.StackInfoRenderer()]
    else:
        renderer = structlog.processors.JSONRenderer()
        tail = [structlog.processors.StackInfoRenderer(), structlog.processors.format_exc_info]

    structlog.configure(
        processors=[_add_logger_name, *shared, *tail, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=_NamedWriteLoggerFactory(out),
        cache_logger_on_first_use=CACHE_LOGGERS,
    )
    _route_stdlib(numeric, out, shared, [*tail, renderer])


def _route_stdlib(
    level: int, out: TextIO, shared: list[Processor], rendering: list[Processor]
) -> None:
    # `rendering` formats a record's `exc_info` as the traceback text (for JSON), as it does
    # for structlog's own events: without it, a 500's line held the repr of a traceback object.
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[structlog.stdlib.add_logger_name, *shared],
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, *rendering],
    )
    handler = logging.StreamHandler(out)
    handler.set_name(_HANDLER_NAME)
    handler.setFormatter(formatter)
    handler.addFilter(http_client_records)
    root = logging.getLogger()
    for old in [h for h in root.handlers if h.get_name() == _HANDLER_NAME]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)


def get(name: str) -> FilteringBoundLogger:
    """A logger whose events carry `logger=name`; safe to create at import time (it is lazy)."""
    return cast(FilteringBoundLogger, structlog.get_logger(name))


class Throttle:
    """Lets a recurring event be logged at most once per `every` seconds, and counts the
    occurrences it holds back. `clock` gives monotonic seconds (tests pass a fake one)."""

    def __init__(self, every: float, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.every = every
        self.suppressed = 0  # occurrences since the last one logged
        self._clock = clock
        self._last: float | None = None

    def due(self) -> int | None:
        """Call once per occurrence: None when this one is held back (and counted), else the
        number held back since the last one logged (then the count starts again)."""
        now = self._clock()
        if self._last is not None and now - self._last < self.every:
            self.suppressed += 1
            return None
        self._last = now
        held, self.suppressed = self.suppressed, 0
        return held


# What asyncio's selector loop reports when accept() fails for lack of descriptors or
# memory (EMFILE, ENFILE, ENOBUFS, ENOMEM); it then retries that listener a second later.
ACCEPT_FAILED = "socket.accept() out of system resource"


class AcceptErrors:
    """An event loop exception handler that logs asyncio's accept failures at most once per
    `every` seconds, with the count held back since the last line, and hands every other
    error to the handler it replaced. Python 3.11 reports such a failure once per pending
    connection, up to the listener's backlog, each second: under a flood of connections
    that was 162 831 lines in 12 s.

    `install(loop)` puts it in place; `uninstall(loop)` restores the previous handler and
    logs the count still held back, if any."""

    def __init__(self, every: float = 10.0, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.throttle = Throttle(every, clock=clock)
        self._previous: Callable[[asyncio.AbstractEventLoop, dict[str, Any]], object] | None
        self._previous = None
        self._log = get("dripd.accept")

    def install(self, loop: asyncio.AbstractEventLoop) -> None:
        self._previous = loop.get_exception_handler()
        loop.set_exception_handler(self)

    def uninstall(self, loop: asyncio.AbstractEventLoop) -> None:
        loop.set_exception_handler(self._previous)
        if self.throttle.suppressed:
            self._log.warning(
                "connections not accepted since the last report",
                suppressed=self.throttle.suppressed,
            )
            self.throttle.suppressed = 0

    def __call__(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        if context.get("message") != ACCEPT_FAILED:
            if self._previous is not None:
                self._previous(loop, context)
            else:
                loop.default_exception_handler(context)
            return
        held = self.throttle.due()
        if held is None:
            return
        exc = context.get("exception")
        code = exc.errno if isinstance(exc, OSError) and exc.errno is not None else 0
        self._log.error(
            "connections not accepted: out of file descriptors or memory (each listener "
            "retries a second later)",
            error=errno.errorcode.get(code, str(exc)),
            reason=exc.strerror if isinstance(exc, OSError) else None,
            listener=_sockname(context.get("socket")),
            suppressed=held,
            every_s=self.throttle.every,
        )


def _sockname(sock: Any) -> str | None:
    try:
        name = sock.getsockname()
    except (AttributeError, OSError):
        return None
    if isinstance(name, tuple):
        return f"{name[0]}:{name[1]}" if ":" not in str(name[0]) else f"[{name[0]}]:{name[1]}"
    return str(name)
