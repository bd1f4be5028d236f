"""structlog setup: JSON lines (or a console view) with secrets redacted, cheap when filtered."""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import Mapping
from typing import Any, Literal, TextIO, cast

import structlog
from structlog.typing import EventDict, FilteringBoundLogger, Processor, WrappedLogger

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
        cache_logger_on_first_use=True,
    )
    _route_stdlib(numeric, out, shared, renderer)


def _route_stdlib(level: int, out: TextIO, shared: list[Processor], renderer: Processor) -> None:
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[structlog.stdlib.add_logger_name, *shared],
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
    )
    handler = logging.StreamHandler(out)
    handler.set_name(_HANDLER_NAME)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    for old in [h for h in root.handlers if h.get_name() == _HANDLER_NAME]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)


def get(name: str) -> FilteringBoundLogger:
    """A logger whose events carry `logger=name`; safe to create at import time (it is lazy)."""
    return cast(FilteringBoundLogger, structlog.get_logger(name))
