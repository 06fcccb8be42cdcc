"""``RayExecutionEngine``: each agent a named Ray actor, on a local or a multi-node Ray cluster.

Needs the ``ray`` extra (``pip install 'rustic[ray]'``). Each agent becomes one actor named
``<guild_id>.<agent_id>`` in the namespace ``rustic-<guild_id>`` (or the one given), not
detached: actors end with the guild's process at the latest. The actor builds the agent
from its spec and runs its hooks; the guild's process keeps the mailbox and ships batches
of messages, one call in flight per actor, so each agent's order holds.

Running on a multi-node cluster:

1. On the head host: ``ray start --head --port=6379 --ray-client-server-port=10001``; on each
   other host: ``ray start --address=<head-host>:6379``. Every host needs the same Python
   and ``rustic[ray]`` installed.
2. Point the guild at the cluster: ``execution: {engine: ray, address: "ray://<head-host>:10001"}``
   (Ray Client, from any machine), or ``address: auto`` when the daemon runs on a cluster
   node. Per agent, ``execution: {engine: ray, num_cpus: 2}`` reserves CPUs for its actor.
3. Agent code must import on every node: pass a runtime environment that ships the guild's
   folder, ``options: {runtime_env: {working_dir: "."}}`` (paths relative to where the
   daemon starts), or install the agents' package on every node.

With no address the engine reuses the Ray already initialised in this process, or starts a
local one (and stops it again at shutdown).
"""

from __future__ import annotations

import functools
import itertools
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from queue import SimpleQueue
from typing import Any

from rustic.engines.actor import import_ray, remote_actor_class
from rustic.engines.hosted import HOOK_MARGIN, Hosted, HostedEngine, HostGone
from rustic.engines.remote import HostError, HostOrder, Outcome, describe_failure
from rustic.message import Message
from rustic.spec import EngineSpec
from rustic.wrapper import AgentWrapper

logger = logging.getLogger(__name__)

START_TIMEOUT = 60.0  # an actor's process start, imports, build and on_startup
CLOSE_TIMEOUT = 2.0
GONE_TIMEOUT = 5.0  # how long shutdown waits for killed actors to leave the cluster's list
BACKOFF = 0.05  # the first re-creation's delay after an actor died; doubles per death in a row
MAX_BACKOFF = 2.0


@dataclass(eq=False)
class _Actor:
    """One actor the engine made."""

    handle: Any
    name: str
    namespace: str
    where: str = ""
    alive: bool = True


class RayExecutionEngine(HostedEngine):
    """Runs each agent as a named Ray actor (see the module docstring for clusters).

    ``address`` is None (reuse this process's Ray, or start a local one), ``"auto"`` or
    ``"ray://host:10001"``; ``namespace`` defaults to ``rustic-<guild_id>``; ``num_cpus``
    is what each actor reserves unless the agent's own ``execution`` spec says otherwise
    (Ray's default: none while running). ``runtime_env`` is passed to ``ray.init`` when
    this engine connects. An actor that dies is re-created with backoff and its lost
    batch replayed, as the multiprocess engine does with children. The guild-scoped
    dependencies of an agent are built in its actor: each actor has its own.
    """

    name = "ray"

    def __init__(  # noqa: PLR0917 - the first three are the documented positional knobs
        self,
        address: str | None = None,
        namespace: str | None = None,
        num_cpus: float | None = None,
        batch_size: int = 256,
        max_crashes: int = 3,
        max_restarts: int = 5,
        runtime_env: dict[str, Any] | None = None,
    ) -> None:
        self._ray_module = import_ray()  # refuse at once, naming the extra, when Ray is missing
        super().__init__(batch_size, max_crashes, max_restarts)
        self.address = address
        self.namespace = namespace
        self.num_cpus = num_cpus
        self.runtime_env = runtime_env
        self._events: SimpleQueue[AgentWrapper | Callable[[], None] | None] = SimpleQueue()
        self._lock = threading.Lock()
        self._dispatcher: threading.Thread | None = None  # guarded by `_lock`
        self._inited_ray = False  # this engine called ray.init: it calls ray.shutdown; `_lock`
        self._actors: list[_Actor] = []  # made and not killed yet; guarded by `_lock`
        self._generations: dict[str, itertools.count[int]] = {}  # guarded by `_lock`

    @classmethod
    def from_spec(cls, spec: EngineSpec) -> RayExecutionEngine:
        """Build the engine from ``address``, ``namespace``, ``num_cpus`` and ``options``."""
        knobs: dict[str, Any] = dict(spec.options)
        for knob in ("address", "namespace", "num_cpus"):
            if getattr(spec, knob) is not None:
                knobs[knob] = getattr(spec, knob)
        return cls(**knobs)

    # -- Ray and actors ---------------------------------------------------------------------

    def _connect(self) -> None:
        """Join (or start) Ray and start the dispatcher, once."""
        ray = self._ray_module
        with self._lock:
            if self._dispatcher is not None:
                return
            if not ray.is_initialized():
                ray.init(
                    address=self.address, include_dashboard=False, runtime_env=self.runtime_env
                )
                self._inited_ray = True
                logger.info("ray connected address=%s", self.address or "local")
            self._dispatcher = threading.Thread(
                target=self._dispatch, name=f"rustic-{self.name}-dispatcher", daemon=True
            )
            self._dispatcher.start()

    def _new_actor(self, hosted: Hosted, order: HostOrder) -> _Actor:
        """Create the agent's actor; later generations (restart, reload) get a suffix."""
        with self._lock:
            generation = next(self._generations.setdefault(hosted.agent_id, itertools.count(1)))
        name = f"{order.guild_id}.{hosted.agent_id}"
        if generation > 1:
            name = f"{name}#{generation}"
        namespace = self.namespace or f"rustic-{order.guild_id}"
        options: dict[str, Any] = {
            "name": name,
            "namespace": namespace,
            "max_restarts": 0,  # the engine re-creates it, with the state as it is then
            "max_concurrency": 2,  # a stop's on_shutdown may run beside a stuck handler
        }
        execution = order.spec.execution
        cpus = execution.num_cpus if execution and execution.num_cpus is not None else None
        if (cpus := self.num_cpus if cpus is None else cpus) is not None:
            options["num_cpus"] = cpus
        try:
            handle = remote_actor_class().options(**options).remote()
        except ValueError as exc:  # the name is taken, by another guild process say
            raise HostError(f"cannot create actor {namespace}/{name}: {exc}") from exc
        actor = _Actor(handle, name, namespace)
        with self._lock:
            self._actors.append(actor)
        return actor

    def _built(self, hosted: Hosted, order: HostOrder) -> tuple[_Actor, Outcome]:
        """A new actor with the agent built in it; the actor is killed if the build fails."""
        actor = self._new_actor(hosted, order)
        try:
            return actor, self._build(actor, order)
        except BaseException:
            self._kill(actor)
            raise

    def _build(self, actor: _Actor, order: HostOrder) -> Outcome:
        """Build the agent in ``actor``; raises HostGone if it died, HostError if refused."""
        ray = self._ray_module
        payload = ray.cloudpickle.dumps(order)  # by value for classes no node can import
        built: tuple[Outcome, str] = self._get(
            actor.handle.build.remote(order.sys_path, payload), START_TIMEOUT, actor
        )
        outcome, actor.where = built
        return outcome

    def _get(self, ref: Any, timeout: float, actor: _Actor) -> Any:
        exceptions = self._ray_module.exceptions
        try:
            return self._ray_module.get(ref, timeout=timeout)
        except exceptions.RayActorError as exc:
            raise HostGone(f"actor {actor.name} died: {exc}") from exc
        except exceptions.GetTimeoutError:
            raise HostError(f"actor {actor.name} did not answer within {timeout:.1f}s") from None
        except exceptions.RayTaskError as exc:
            raise HostError(str(exc)) from exc

    def _kill(self, actor: _Actor) -> None:
        actor.alive = False
        with self._lock:
            if actor in self._actors:
                self._actors.remove(actor)
        try:
            self._ray_module.kill(actor.handle, no_restart=True)
        except Exception:
            logger.debug("actor already gone actor=%s", actor.name, exc_info=True)

    # -- placing agents ---------------------------------------------------------------------

    def _place(self, hosted: Hosted, order: HostOrder) -> Outcome:
        self._connect()
        actor, outcome = self._built(hosted, order)
        hosted.home = actor
        return outcome

    def _unplace(self, hosted: Hosted) -> None:
        self._retire(hosted.home)

    def _retire(self, actor: _Actor) -> None:
        """Close the agent's dependencies in ``actor``, then kill it."""
        if actor.alive:
            try:
                self._get(actor.handle.close.remote(), CLOSE_TIMEOUT, actor)
            except HostError as exc:
                logger.warning("actor did not close actor=%s reason=%s", actor.name, exc)
        self._kill(actor)

    def _hook(self, hosted: Hosted, kind: str, timeout: float) -> Outcome:
        actor: _Actor = hosted.home
        ref = actor.handle.hook.remote(kind, timeout)
        outcome: Outcome = self._get(ref, timeout + HOOK_MARGIN, actor)
        return outcome

    def _accepts(self, hosted: Hosted) -> bool:
        actor: _Actor | None = hosted.home
        return actor is not None and actor.alive

    def _label(self, hosted: Hosted) -> str:
        actor: _Actor = hosted.home
        return f"actor {actor.namespace}/{actor.name} {actor.where}".rstrip()

    # -- hot swap ---------------------------------------------------------------------------

    def _new_host(self, hosted: Hosted, order: HostOrder) -> tuple[_Actor, Outcome]:
        """A new actor, named with the agent's next generation (``<guild>.<agent>#2``...)."""
        actor, outcome = self._built(hosted, order)
        if not outcome.ok:
            self._kill(actor)
            raise HostError("an on_reload hook raised in the new actor (logged there)")
        return actor, outcome

    def _release(self, hosted: Hosted, home: Any) -> None:
        self._retire(home)

    # -- the dispatcher thread --------------------------------------------------------------

    def _enqueue(self, wrapper: AgentWrapper) -> None:
        self._events.put(wrapper)

    def _call_soon(self, func: Callable[[], None]) -> None:
        self._events.put(func)

    def _dispatch(self) -> None:
        """Ship batches of agents with mail and apply what actors answer, until stopped."""
        while (event := self._events.get()) is not None:
            try:
                if isinstance(event, AgentWrapper):
                    self._start_turn(event)
                else:
                    event()
            except Exception:
                logger.exception("dispatcher error engine=%s", self.name)

    def _ship(self, hosted: Hosted, batch: list[Message]) -> None:
        actor: _Actor = hosted.home
        self._shipped(hosted, batch)
        future: Future[Outcome] = actor.handle.handle.remote(batch).future()
        future.add_done_callback(
            lambda done: self._call_soon(lambda: self._answered(hosted, actor, done))
        )

    def _answered(self, hosted: Hosted, actor: _Actor, done: Future[Outcome]) -> None:
        try:
            outcome = done.result()
        except self._ray_module.exceptions.RayActorError:
            self._actor_died(hosted, actor)
            return
        except Exception as exc:
            self._refused(hosted, describe_failure(exc))
        else:
            self._finished(hosted, outcome)
        self._next_after(hosted)

    def _next_after(self, hosted: Hosted) -> None:
        """After a batch: the next lost message if a replay is on, else the turn ends."""
        if hosted.replay and not hosted.wrapper.failed:
            self._ship(hosted, [hosted.replay[0]])
        else:
            self._turn_over(hosted)

    # -- crashes ----------------------------------------------------------------------------

    def _actor_died(self, hosted: Hosted, actor: _Actor) -> None:
        """Keep the lost batch for a replay and re-create the actor, unless the agent failed."""
        logger.warning("actor died agent_id=%s actor=%s", hosted.agent_id, actor.name)
        self._kill(actor)
        self._lost(hosted)
        if not hosted.replay:
            self._turn_over(hosted)
        if hosted.wrapper.failed or self._closing.is_set():
            return
        restarter = threading.Thread(
            target=self._recreate, args=(hosted,), name=f"rustic-restart-{hosted.agent_id}"
        )
        restarter.daemon = True
        restarter.start()

    def _recreate(self, hosted: Hosted) -> None:
        """Make the agent a new actor after a backoff, until one holds or the agent fails."""
        while not self._closing.wait(min(MAX_BACKOFF, BACKOFF * 2 ** (hosted.streak - 1))):
            try:
                actor, outcome = self._rebuild(hosted)
            except HostGone:
                hosted.streak += 1
                if hosted.streak < self.max_restarts:
                    continue
                self._give_up_soon(hosted, "its build killed the actor")
                return
            except HostError as exc:
                self._give_up_soon(hosted, f"it could not be rebuilt: {exc}")
                return
            self._call_soon(functools.partial(self._back, hosted, actor, outcome))
            return
        self._give_up_soon(hosted, "the engine is shutting down", fail=False)

    def _rebuild(self, hosted: Hosted) -> tuple[_Actor, Outcome]:
        """A new actor for the agent, built with its state as it is now."""
        return self._built(hosted, self.order(hosted.wrapper))

    def _give_up_soon(self, hosted: Hosted, why: str, fail: bool = True) -> None:
        self._call_soon(lambda: self._give_up_on(hosted, why, fail))

    def _back(self, hosted: Hosted, actor: _Actor, outcome: Outcome) -> None:
        hosted.home = actor
        self._apply(hosted, outcome, [])
        hosted.wrapper.where = self._label(hosted)
        logger.info("actor re-created agent_id=%s actor=%s", hosted.agent_id, actor.name)
        if hosted.replay:
            self._ship(hosted, [hosted.replay[0]])  # its turn is still open
        else:
            self._notify(hosted.wrapper)

    def _give_up_on(self, hosted: Hosted, why: str, fail: bool = True) -> None:
        """No actor for the agent: mark it failed and end the turn a replay held open."""
        held_open = bool(hosted.replay)
        if fail:
            self._fail(hosted, why)
        if held_open:
            self._turn_over(hosted)

    # -- teardown ---------------------------------------------------------------------------

    def _join(self, timeout: float) -> list[str]:
        """Kill every actor this engine made and wait until the cluster lists none of them."""
        with self._lock:
            actors = list(self._actors)
        for actor in actors:
            self._kill(actor)
        left = self._wait_gone(actors, max(timeout, GONE_TIMEOUT))
        self._events.put(None)
        with self._lock:
            dispatcher, inited = self._dispatcher, self._inited_ray
        if dispatcher is not None:
            dispatcher.join(1.0)
        if inited:
            self._ray_module.shutdown()
        return left

    def _wait_gone(self, actors: list[_Actor], timeout: float) -> list[str]:
        if not actors or not self._ray_module.is_initialized():
            return []
        ours = {(actor.namespace, actor.name) for actor in actors}
        deadline = time.monotonic() + timeout
        pause = threading.Event()
        while True:
            listed = self._ray_module.util.list_named_actors(all_namespaces=True)
            left = sorted(
                f"{a['namespace']}/{a['name']}"
                for a in listed
                if (a["namespace"], a["name"]) in ours
            )
            if not left or time.monotonic() >= deadline:
                return left
            pause.wait(0.05)

    def _home(self, wrapper: AgentWrapper) -> str:
        return "ray actor"
