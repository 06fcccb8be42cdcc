"""The daemon's ops `dead_letters` and `retry_dead_letters`, and how the CLI shows their replies."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

from rich import box
from rich.console import Console
from rich.table import Table

from rustic.daemon.control import Handler
from rustic.daemon.protocol import ControlError
from rustic.deadletters import list_dead_letters, retry_dead_letters
from rustic.guild import Guild

REASON_WIDTH = 60  # characters of a reason shown in the table


def dead_letter_handlers(running_guild: Callable[[], Guild]) -> dict[str, Handler]:
    """The two ops, answered from the guild that ``running_guild`` returns."""

    def list_op(args: dict[str, Any]) -> dict[str, Any]:
        agent = args.get("agent")
        if agent is not None and (not isinstance(agent, str) or not agent):
            raise ControlError("bad_request", f"agent must be an agent id; got {agent!r}")
        letters = list_dead_letters(running_guild().bus, agent)
        return {"dead_letters": [dead.to_dict() for dead in letters]}

    def retry_op(args: dict[str, Any]) -> dict[str, Any]:
        ids, everything = args.get("ids"), bool(args.get("all", False))
        if everything == bool(ids):
            raise ControlError("bad_request", "name dead letter ids to retry, or ask for all")
        if ids is not None and not (isinstance(ids, list) and all(map(_is_int, ids))):
            raise ControlError("bad_request", f"ids must be a list of integers; got {ids!r}")
        return retry_dead_letters(running_guild().bus, None if everything else ids).to_dict()

    return {"dead_letters": list_op, "retry_dead_letters": retry_op}


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def dead_letters_table(console: Console, letters: Sequence[dict[str, Any]]) -> Table:
    """Dead letters as the CLI prints them, one row each, oldest first."""
    table = Table(box=box.ROUNDED if console.is_terminal else None, pad_edge=console.is_terminal)
    for column, justify in (
        ("id", "right"),
        ("agent", "left"),
        ("at", "left"),
        ("topic", "left"),
        ("format", "left"),
        ("message id", "right"),
        ("reason", "left"),
    ):
        table.add_column(column, justify=justify)  # type: ignore[arg-type]
    for dead in letters:
        message = dead["message"]
        reason = dead["reason"]
        if len(reason) > REASON_WIDTH:
            reason = reason[: REASON_WIDTH - 1] + "…"
        table.add_row(
            str(dead["id"]),
            dead["agent_id"],
            time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(dead["at"])),
            message["topic"],
            message["format"],
            str(message["id"]),
            reason,
        )
    return table
