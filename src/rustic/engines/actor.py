"""``AgentActor``: the Ray actor that hosts one agent for the Ray engine."""

from __future__ import annotations

import os
from typing import Any

from rustic.engines.remote import AgentHost, Outcome, close_host_guilds, extend_sys_path
from rustic.message import Message


def import_ray() -> Any:
    """The ``ray`` module, or an EngineError that names the extra to install."""
    from rustic.engines import EngineError  # the package imports this module: import late

    try:
        import ray
    except ImportError as exc:
        raise EngineError(
            "the ray engine needs Ray, which is not installed: pip install 'rustic[ray]'"
        ) from exc
    return ray


class AgentActor:
    """The Ray actor hosting one agent: the engine calls these methods, one batch at a time."""

    def __init__(self) -> None:
        self.host: AgentHost | None = None

    def build(self, sys_path: list[str], order: bytes) -> tuple[Outcome, str]:
        """Build the agent from a pickled :class:`HostOrder`; returns the outcome and where."""
        import ray

        extend_sys_path(sys_path)  # first: unpickling the order imports the agent's class
        self.host = AgentHost(ray.cloudpickle.loads(order))
        node = ray.get_runtime_context().get_node_id()[:12]
        where = f"pid={os.getpid()} node={node}"
        return self.host.collect(self.host.hooks_ok), where

    def handle(self, batch: list[Message]) -> Outcome:
        """Run a batch through the agent."""
        assert self.host is not None
        return self.host.handle(batch)

    def hook(self, kind: str, timeout: float) -> Outcome:
        """Run the agent's ``kind`` hooks."""
        assert self.host is not None
        return self.host.run_hook(kind, timeout)

    def close(self) -> None:
        """Close the agent's dependencies before the actor is killed."""
        if self.host is not None:
            self.host.close()
        close_host_guilds()


_actor_class: Any = None


def remote_actor_class() -> Any:
    """``AgentActor`` as a Ray actor class (made on first use: Ray imports lazily)."""
    global _actor_class
    if _actor_class is None:
        _actor_class = import_ray().remote(AgentActor)
    return _actor_class
