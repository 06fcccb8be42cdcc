"""Logging setup: ids carried in contextvars, text or JSON-lines output."""

from __future__ import annotations

import contextlib
import contextvars
import json
import logging
import sys
import time
from collections.abc import Iterator, Mapping
from types import MappingProxyType
from typing import Any

_FIELDS = ("guild_id", "agent_id", "message_id")
_EMPTY: Mapping[str, Any] = MappingProxyType({})
_context: contextvars.ContextVar[Mapping[str, Any]] = contextvars.ContextVar(
    "rustic_log", default=_EMPTY
)


@contextlib.contextmanager
def log_context(**ids: Any) -> Iterator[None]:
    """Attach ``ids`` (guild_id, agent_id, message_id) to every record logged inside."""
    token = _context.set({**_context.get(), **ids})
    try:
        yield
    finally:
        _context.reset(token)


def bind_guild(guild_id: str) -> None:
    """Attach ``guild_id`` to every record logged from this context on."""
    _context.set({**_context.get(), "guild_id": guild_id})


class ContextFilter(logging.Filter):
    """Copies the ids of the current context onto each record."""

    def filter(self, record: logging.LogRecord) -> bool:
        ids = _context.get()
        for name in _FIELDS:
            setattr(record, name, ids.get(name, getattr(record, name, None)))
        return True


class TextFormatter(logging.Formatter):
    """``time level logger: message key=value`` with the context ids appended."""

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        ids = " ".join(
            f"{name}={value}"
            for name in _FIELDS
            if (value := getattr(record, name, None)) is not None and f"{name}=" not in line
        )
        return f"{line} {ids}" if ids else line


class JsonFormatter(logging.Formatter):
    """One JSON object per record, with the ids as fields."""

    def format(self, record: logging.LogRecord) -> str:
        data: dict[str, Any] = {
            "ts": round(record.created, 6),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for name in _FIELDS:
            value = getattr(record, name, None)
            if value is not None:
                data[name] = value
        if record.exc_info:
            data["exc"] = self.formatException(record.exc_info)
        return json.dumps(data, default=str)


def configure_logging(level: str = "info", fmt: str = "text") -> None:
    """Send rustic's records to stderr as text lines or JSON lines."""
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(ContextFilter())
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        formatter = TextFormatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s")
        formatter.converter = time.localtime
        handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
