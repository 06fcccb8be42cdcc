"""The spill file: messages the memory bus still held at stop, replayed at the next start.

One JSON object per line, `{"agent_id": ..., "message": {...}}`, in mailbox order. Durable
buses keep their own pending deliveries, so only a guild on the memory bus spills.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from rustic.guild import Guild
from rustic.message import Message
from rustic.messaging import MemoryBus

logger = logging.getLogger(__name__)


def spill_pending(guild: Guild, path: Path) -> int:
    """Move what the agents' memory mailboxes still hold to `path`; return how many messages.

    Lines already in the file (kept for agents that did not run) stay, ahead of the new ones.
    """
    if not isinstance(guild.bus, MemoryBus):
        return 0
    lines = [
        json.dumps({"agent_id": agent_id, "message": message.to_dict()})
        for agent_id in guild.agent_ids()
        for message in guild.wrapper(agent_id).mailbox.drain()
    ]
    if lines:
        _write_lines(path, _read_lines(path) + lines)
        logger.info("pending messages spilled count=%d path=%s", len(lines), path)
    return len(lines)


def replay_spilled(guild: Guild, path: Path) -> int:
    """Put the spilled messages back into the mailboxes of the running agents; return how many.

    Lines for agents that do not run now (see `--only`) stay in the file for a later start;
    unreadable lines are logged and dropped.
    """
    if not isinstance(guild.bus, MemoryBus) or not path.exists():
        return 0
    running = set(guild.agent_ids())
    kept: list[str] = []
    replayed: list[tuple[str, Message]] = []
    for number, line in enumerate(_read_lines(path), start=1):
        try:
            record = json.loads(line)
            agent_id, message = str(record["agent_id"]), Message.from_dict(record["message"])
        except (ValueError, KeyError, TypeError) as exc:
            logger.warning("spilled line dropped path=%s line=%d error=%s", path, number, exc)
            continue
        if agent_id in running:
            replayed.append((agent_id, message))
        else:
            kept.append(line)

    # Rewrite the file before delivering, so that a crash meanwhile cannot replay twice.
    _write_lines(path, kept)
    for agent_id, message in replayed:
        guild.wrapper(agent_id).mailbox.put(message)
    if replayed:
        logger.info("spilled messages replayed count=%d path=%s", len(replayed), path)
    return len(replayed)


def _read_lines(path: Path) -> list[str]:
    """The non-blank lines of `path`, or none when it does not exist."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return []
    return [line for line in text.splitlines() if line.strip()]


def _write_lines(path: Path, lines: list[str]) -> None:
    """Replace `path` with `lines` in one rename, or remove it when there are none."""
    if not lines:
        path.unlink(missing_ok=True)
        return
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    temporary.write_text("".join(f"{line}\n" for line in lines), encoding="utf-8")
    temporary.replace(path)
