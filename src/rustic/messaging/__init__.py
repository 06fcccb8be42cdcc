"""Message buses: ``memory`` (default), ``sqlite`` and ``redis`` backends behind one contract."""

from __future__ import annotations

from rustic.messaging.base import BusError, DeadLetter, Mailbox, MessageBus
from rustic.messaging.durable import DurableBus, Retention, retention_from, split_url
from rustic.messaging.memory import MemoryBus

__all__ = [
    "BusError",
    "DeadLetter",
    "DurableBus",
    "Mailbox",
    "MemoryBus",
    "MessageBus",
    "Retention",
    "open_bus",
]

_RETENTION_KEYS = ("retention", "max_age")
_FORMS = (
    "memory, sqlite:///relative/path.db, sqlite:////absolute/path.db or redis://host:port/db, "
    "optionally followed by ?retention=COUNT&max_age=SECONDS"
)


def open_bus(url: str, guild_id: str = "default") -> MessageBus:
    """Open the bus named by ``url``: ``memory``, ``sqlite:///path.db`` or ``redis://host/db``.

    Durable buses take ``retention`` (handled messages kept) and ``max_age`` (seconds)
    query parameters. A Redis bus keeps its keys under ``guild_id``, so that guilds may
    share a database; a Redis URL also takes ``consumer`` (this process's consumer name).
    """
    scheme, sep, rest = url.partition("://")
    if url == "memory" or (scheme == "memory" and sep and not rest):
        return MemoryBus()
    if scheme == "sqlite" and rest.startswith("/") and rest.partition("?")[0] != "/":
        from rustic.messaging.sqlite import SqliteBus

        base, options = split_url(url, _RETENTION_KEYS)
        _refuse_unknown(base, url)
        # `sqlite:///a.db` leaves `/a.db` (relative), `sqlite:////a.db` leaves `//a.db`
        return SqliteBus(base[len("sqlite:///") :], retention_from(options, url))
    if scheme in ("redis", "rediss") and rest:
        from rustic.messaging.redis import DEFAULT_WINDOW, RedisBus

        base, options = split_url(url, (*_RETENTION_KEYS, "consumer", "window"))
        return RedisBus(
            base,
            guild_id=guild_id,
            retention=retention_from(options, url),
            consumer=options.get("consumer"),
            window=_whole_number(options, "window", url, default=DEFAULT_WINDOW),
        )
    raise ValueError(f"messaging: unsupported backend {url!r} (expected {_FORMS})")


def _whole_number(options: dict[str, str], key: str, url: str, default: int) -> int:
    """An integer query parameter, refused with the URL named when it is not one."""
    try:
        return int(options.get(key, default))
    except ValueError:
        raise ValueError(
            f"messaging: {url!r}: {key} must be a whole number (got {options[key]!r})"
        ) from None


def _refuse_unknown(base: str, url: str) -> None:
    """Refuse query parameters a sqlite bus does not know."""
    if "?" in base:
        unknown = base.partition("?")[2]
        raise ValueError(
            f"messaging: {url!r}: unknown parameter(s) {unknown!r} "
            f"(a sqlite bus takes {' and '.join(_RETENTION_KEYS)})"
        )
