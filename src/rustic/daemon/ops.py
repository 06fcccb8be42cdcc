"""The control ops a running daemon answers besides `ping`: status, send, stop, reload."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from rustic.daemon.control import Handler
from rustic.daemon.dead_letters import dead_letter_handlers
from rustic.daemon.protocol import ControlError
from rustic.daemon.reloads import ReloadRequestError, reload_from_file
from rustic.guild import Guild, GuildStopping

if TYPE_CHECKING:
    from rustic.daemon.runner import Daemon

READY_WAIT = 60.0  # how long a request waits for the guild to finish launching


def control_handlers(daemon: Daemon) -> dict[str, Handler]:
    """Map each op to its handler."""
    ops = ControlOps(daemon)
    return {
        "status": ops.status,
        "send": ops.send,
        "stop": ops.stop,
        "reload": ops.reload,
        **dead_letter_handlers(ops.running_guild),
    }


class ControlOps:
    """Answers the control requests of one daemon, on the control server's threads."""

    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon

    def status(self, args: dict[str, Any]) -> dict[str, Any]:
        """`status`: the guild's agents and totals, and the daemon that runs them."""
        daemon = self.daemon
        status = self.running_guild().status()
        status["daemon"] = {
            "pid": os.getpid(),
            "socket": str(daemon.socket),
            "guild_file": str(daemon.spec.source or ""),
            "stopping": daemon.stop_event.is_set(),
        }
        return status

    def send(self, args: dict[str, Any]) -> dict[str, Any]:
        """`send`: publish `payload` (a JSON object) on `topic`, tagged with `format`."""
        topic, payload, fmt = args.get("topic"), args.get("payload"), args.get("format")
        if not isinstance(topic, str) or not topic:
            raise ControlError("bad_request", f"topic must be a non-empty string; got {topic!r}")
        if not isinstance(payload, dict):
            raise ControlError("bad_request", "payload must be a JSON object")
        if fmt is not None and (not isinstance(fmt, str) or not fmt):
            raise ControlError("bad_request", f"format must be a non-empty string; got {fmt!r}")
        try:
            message = self.running_guild().publish(topic, payload, format=fmt)
        except GuildStopping as exc:
            raise ControlError("shutting_down", str(exc)) from None
        return {"id": message.id, "topic": message.topic, "format": message.format}

    def stop(self, args: dict[str, Any]) -> dict[str, Any]:
        """`stop`: stop gracefully; with `wait` (the default), reply once the guild stopped.

        The reply then carries the shutdown report, the exit code and the accounting line.
        """
        timeout = positive_arg(args, "shutdown_timeout")
        daemon = self.daemon
        daemon.request_stop("socket", timeout)
        if args.get("wait", True):
            daemon.finished.wait()
            return {**daemon.result, "pid": os.getpid()}
        return {"stopping": True, "pid": os.getpid()}

    def reload(self, args: dict[str, Any]) -> dict[str, Any]:
        """`reload`: re-read the guild file and hot-swap `agents` (or every one, with `all`)."""
        agents, everything = args.get("agents"), bool(args.get("all", False))
        timeout = positive_arg(args, "reload_timeout") or 5.0
        if everything == bool(agents):
            raise ControlError("bad_request", "name agents to reload, or ask for all")
        if agents is not None and (
            not isinstance(agents, list) or not all(isinstance(a, str) and a for a in agents)
        ):
            raise ControlError("bad_request", f"agents must be a list of ids; got {agents!r}")
        guild, source = self.running_guild(), self.daemon.options.guild_file.resolve()
        try:
            results = reload_from_file(guild, source, None if everything else agents, timeout)
        except ReloadRequestError as exc:
            raise ControlError("bad_request", str(exc)) from None
        return {"results": results}

    def running_guild(self) -> Guild:
        """The launched guild; raise a `ControlError` while it starts or when it failed to."""
        daemon = self.daemon
        if not daemon.up.wait(READY_WAIT):
            raise ControlError("starting", f"guild {daemon.spec.id!r} is still starting")
        if daemon.guild is None:
            raise ControlError("failed", f"guild {daemon.spec.id!r} failed to start")
        return daemon.guild


def positive_arg(args: dict[str, Any], key: str) -> float | None:
    """``args[key]`` as a positive number, None when absent; a bad_request error otherwise."""
    value = args.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
        raise ControlError("bad_request", f"{key} must be a positive number; got {value!r}")
    return float(value)
