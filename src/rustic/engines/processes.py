"""``MultiprocessExecutionEngine``: agents hosted in spawned child processes.

The guild's process keeps the mailboxes; one dispatcher thread ships each agent's mail in
batches over a pipe to the child hosting it and applies what comes back (see
:mod:`rustic.engines.hosted`). A child that dies, even by SIGKILL, is restarted with
backoff, its agents are rebuilt (on_startup runs again) and their in-flight messages are
replayed one at a time, alone in the child, so that a crash is pinned on its message.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import multiprocessing
import os
import selectors
import threading
from collections import deque
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import Any

from rustic.engines.child import BUILD, DROP, HANDLE, HOOK, Child, retire
from rustic.engines.hosted import HOOK_MARGIN, Hosted, HostedEngine, HostGone
from rustic.engines.remote import HostError, HostOrder, Outcome
from rustic.message import Message
from rustic.spec import EngineSpec
from rustic.wrapper import AgentWrapper

logger = logging.getLogger(__name__)

START_TIMEOUT = 30.0  # a child's start, imports and the agent's build and on_startup
DROP_TIMEOUT = 2.0  # closing a stopped agent's host
BACKOFF = 0.05  # the first restart's delay; it doubles per restart in a row
MAX_BACKOFF = 2.0


class MultiprocessExecutionEngine(HostedEngine):
    """Runs agents in ``max_workers`` spawned child processes, spread evenly at launch.

    Each agent is built in its child from its spec (the class is imported there: keep it
    at module level in an importable module; the guild's ``sys.path`` is passed on) and
    handles batches of up to ``batch_size`` messages per round trip, one batch at a time.
    Agents of one child each have a thread of their own there. A child that dies is
    restarted after a backoff (50 ms doubling to 2 s); a message in flight for
    ``max_crashes`` deaths is dead-lettered, and an agent whose host died
    ``max_restarts`` times in a row without handling a message is marked failed.

    The pool starts whole at the first launch. Children are daemonic: an agent cannot
    start ``multiprocessing`` children of its own (``subprocess`` works), and children end
    with the guild's process. A hot reload starts the new version in a fresh child,
    outside the pool, which ends when its agent does.
    """

    name = "multiprocess"

    def __init__(
        self,
        max_workers: int | None = None,
        batch_size: int = 256,
        max_crashes: int = 3,
        max_restarts: int = 5,
    ) -> None:
        workers = max_workers if max_workers is not None else os.cpu_count() or 1
        if workers < 1:
            raise ValueError(f"max_workers must be at least 1, got {workers}")
        super().__init__(batch_size, max_crashes, max_restarts)
        self.max_workers = workers
        self._context = multiprocessing.get_context("spawn")
        self._children_lock = threading.Lock()
        self._pool: list[Child] = []  # guarded by `_children_lock`
        self._children: list[Child] = []  # every child started, pooled or not; same lock
        self._seqs = itertools.count(1)
        self._labels = itertools.count()

        # The dispatcher: other threads add work, then wake it through a pipe if it sleeps.
        self._selector: selectors.BaseSelector | None = None  # made with the dispatcher
        self._wake_r, self._wake_w = -1, -1
        self._ready: deque[AgentWrapper] = deque()
        self._control: deque[Callable[[], None]] = deque()
        self._sleeping = False
        self._stop_dispatch = False
        self._dispatcher: threading.Thread | None = None

    @classmethod
    def from_spec(cls, spec: EngineSpec) -> MultiprocessExecutionEngine:
        """Build the engine from ``max_workers`` and ``options`` (batch_size, max_crashes...)."""
        knobs: dict[str, Any] = dict(spec.options)
        if spec.max_workers is not None:
            knobs["max_workers"] = spec.max_workers
        return cls(**knobs)

    def pids(self) -> dict[str, int]:
        """The process id of each live child, by its label."""
        with self._children_lock:
            children = list(self._children)
        return {c.label: c.pid for c in children if c.pid and c.alive and not c.retiring}

    # -- placing agents ---------------------------------------------------------------------

    def _place(self, hosted: Hosted, order: HostOrder) -> Outcome:
        child = self._choose_child()
        with self._cond:
            child.agents[hosted.agent_id] = hosted
            hosted.home = child
        try:
            outcome: Outcome = self._call(child, BUILD, hosted.agent_id, order, START_TIMEOUT)
        except BaseException:
            with self._cond:
                child.agents.pop(hosted.agent_id, None)
                hosted.home = None
            raise
        return outcome

    def _choose_child(self) -> Child:
        """The pooled child with the fewest agents; the pool starts whole at first use."""
        with self._children_lock:
            if not self._pool:
                self._start_dispatcher()
                self._pool = [self._new_child(pooled=True) for _ in range(self.max_workers)]
            with self._cond:
                return min(self._pool, key=lambda c: (not c.alive, len(c.agents)))

    def _new_child(self, pooled: bool) -> Child:
        # Caller holds `_children_lock`.
        child = Child(f"{self.name}-{next(self._labels)}", pooled)
        self._children.append(child)
        self._start(child)
        child.ready = True
        return child

    def _start(self, child: Child) -> None:
        """Spawn ``child`` and have the dispatcher watch its pipe."""
        conn = child.start(self._context)
        self._call_soon(lambda: self._watch(conn, child))

    def _watch(self, conn: Connection, child: Child) -> None:
        assert self._selector is not None
        self._selector.register(conn, selectors.EVENT_READ, child)

    def _unplace(self, hosted: Hosted) -> None:
        self._let_go(hosted.home, hosted.agent_id)

    def _let_go(self, child: Child, agent_id: str) -> None:
        """Close an agent's host in ``child``; a child outside the pool ends with its agent."""
        with self._cond:
            child.agents.pop(agent_id, None)
        with contextlib.suppress(HostError):
            self._call(child, DROP, agent_id, None, DROP_TIMEOUT)
        if not child.pooled and not child.agents:
            self._retire([child], DROP_TIMEOUT)

    def _hook(self, hosted: Hosted, kind: str, timeout: float) -> Outcome:
        outcome: Outcome = self._call(
            hosted.home, HOOK, hosted.agent_id, (kind, timeout), timeout + HOOK_MARGIN
        )
        return outcome

    def _accepts(self, hosted: Hosted) -> bool:
        child: Child = hosted.home
        return child.ready and not child.replaying

    def _label(self, hosted: Hosted) -> str:
        child: Child = hosted.home
        return f"{child.label} pid={child.pid}"

    def _call(self, child: Child, op: str, agent_id: str, arg: Any, timeout: float) -> Any:
        seq = next(self._seqs)
        return child.call((seq, op, agent_id, arg), timeout)

    # -- hot swap ---------------------------------------------------------------------------

    def _new_host(self, hosted: Hosted, order: HostOrder) -> tuple[Child, Outcome]:
        """A fresh child outside the pool, which ends when this agent does."""
        with self._children_lock:
            child = self._new_child(pooled=False)
        try:
            outcome: Outcome = self._call(child, BUILD, hosted.agent_id, order, START_TIMEOUT)
            if not outcome.ok:
                raise HostError("an on_reload hook raised in the new child (logged there)")
        except HostError:
            self._retire([child], DROP_TIMEOUT)
            raise
        with self._cond:
            child.agents[hosted.agent_id] = hosted
        return child, outcome

    def _release(self, hosted: Hosted, home: Any) -> None:
        self._let_go(home, hosted.agent_id)

    # -- the dispatcher thread --------------------------------------------------------------

    def _start_dispatcher(self) -> None:
        self._selector = selectors.DefaultSelector()
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._selector.register(self._wake_r, selectors.EVENT_READ, None)
        self._dispatcher = threading.Thread(
            target=self._dispatch, name=f"rustic-{self.name}-dispatcher", daemon=True
        )
        self._dispatcher.start()

    def _enqueue(self, wrapper: AgentWrapper) -> None:
        self._ready.append(wrapper)
        if self._sleeping:
            self._wake()

    def _call_soon(self, func: Callable[[], None]) -> None:
        """Run ``func`` on the dispatcher thread."""
        self._control.append(func)
        self._wake()

    def _wake(self) -> None:
        with contextlib.suppress(BlockingIOError, OSError):
            os.write(self._wake_w, b"\0")

    def _dispatch(self) -> None:
        """Ship batches of agents with mail, read what children answer, until stopped."""
        assert self._selector is not None
        select = self._selector.select
        while not self._stop_dispatch:
            try:
                while self._control:
                    self._control.popleft()()
                while self._ready:
                    self._start_turn(self._ready.popleft())

                # Sleep only if nothing was added since the checks above.
                self._sleeping = True
                events = select(0 if self._ready or self._control else None)
                self._sleeping = False
                for key, _ in events:
                    if key.data is None:
                        with contextlib.suppress(BlockingIOError):
                            os.read(self._wake_r, 4096)
                    else:
                        self._read(key.data)
            except Exception:
                logger.exception("dispatcher error engine=%s", self.name)

    def _ship(self, hosted: Hosted, batch: list[Message]) -> None:
        child: Child = hosted.home
        seq = next(self._seqs)
        self._shipped(hosted, batch)
        child.batches[seq] = hosted
        try:
            child.send((seq, HANDLE, hosted.agent_id, batch))
        except HostGone:
            pass  # the dispatcher reads the child's EOF next and replays the batch
        except HostError as exc:
            del child.batches[seq]
            self._refused(hosted, str(exc))
            self._after_batch(child, hosted)

    def _read(self, child: Child) -> None:
        """Take every answer the child has written so far."""
        conn = child.conn
        assert conn is not None
        try:
            while True:
                seq, ok, value = conn.recv()
                self._answered(child, seq, ok, value)
                if not conn.poll():
                    return
        except (EOFError, OSError):
            self._child_died(child)

    def _answered(self, child: Child, seq: int, ok: bool, value: Any) -> None:
        hosted = child.batches.pop(seq, None)
        if hosted is None:
            with child.lock:
                future = child.calls.pop(seq, None)
            if future is not None:
                future.set_result((ok, value))
            return
        child.restarts = 0
        if ok:
            self._finished(hosted, value)
        else:
            self._refused(hosted, value)
        self._after_batch(child, hosted)

    def _after_batch(self, child: Child, hosted: Hosted) -> None:
        if child.replaying:
            self._replay_next(child)
        else:
            self._turn_over(hosted)

    # -- crashes ----------------------------------------------------------------------------

    def _child_died(self, child: Child) -> None:
        """Stop using a dead child, keep its agents' lost mail, and restart it."""
        assert self._selector is not None
        assert child.conn is not None
        self._selector.unregister(child.conn)
        child.conn.close()
        for future in child.gone():
            future.set_exception(HostGone(f"{child.label} died"))
        child.ready = False
        lost = [child.batches[seq] for seq in sorted(child.batches)]
        child.batches.clear()
        if child.retiring:
            return
        logger.warning("child died child=%s pid=%s lost=%d", child.label, child.pid, len(lost))

        # Lost mail is replayed one message at a time, alone in the child, before new mail.
        # An agent already replaying keeps its place: its turn ends when its replay does.
        for hosted in lost:
            self._lost(hosted)
            if hosted in child.replaying:
                continue
            if hosted.replay:
                child.replaying.append(hosted)
            else:
                self._turn_over(hosted)
        if self._closing.is_set() or child.restarting:
            return
        child.restarting = True
        restarter = threading.Thread(
            target=self._restart, args=(child,), name=f"rustic-restart-{child.label}"
        )
        restarter.daemon = True
        restarter.start()

    def _restart(self, child: Child) -> None:
        """Start the child again after a backoff and rebuild its agents, until it holds."""
        while not self._closing.is_set():
            if child.process is not None:
                child.process.join(1.0)
                exitcode = child.process.exitcode
                logger.warning("restarting child child=%s exitcode=%s", child.label, exitcode)
            delay = min(MAX_BACKOFF, BACKOFF * 2**child.restarts)
            child.restarts += 1
            if self._closing.wait(delay):
                break
            self._start(child)
            if self._rebuild(child):
                return
        self._call_soon(lambda: self._abandon(child))

    def _rebuild(self, child: Child) -> bool:
        """Build the child's agents again, one at a time; False if the child died meanwhile."""
        with self._cond:
            agents = [h for h in child.agents.values() if not h.wrapper.failed]
        for hosted in agents:
            order = self.order(hosted.wrapper)
            try:
                outcome = self._call(child, BUILD, hosted.agent_id, order, START_TIMEOUT)
            except HostGone:
                hosted.streak += 1
                if hosted.streak >= self.max_restarts:
                    self._fail_soon(hosted, "its build crashed the child")
                return False
            except HostError as exc:
                self._fail_soon(hosted, f"it could not be rebuilt: {exc}")
                continue
            self._apply(hosted, outcome, [])
            hosted.wrapper.where = self._label(hosted)
        self._call_soon(lambda: self._back(child))
        return True

    def _fail_soon(self, hosted: Hosted, why: str) -> None:
        self._call_soon(lambda: self._fail(hosted, why))

    def _back(self, child: Child) -> None:
        """The child is rebuilt: replay its agents' lost mail, then release them all."""
        child.restarting = False
        child.ready = True
        logger.info("child restarted child=%s pid=%s", child.label, child.pid)
        self._replay_next(child)

    def _replay_next(self, child: Child) -> None:
        """Ship the next replayed message alone; once none is left, release every agent."""
        while child.replaying:
            hosted = child.replaying[0]
            if hosted.batch:
                return
            placed = child.agents.get(hosted.agent_id) is hosted
            if placed and hosted.replay and not hosted.wrapper.failed:
                self._ship(hosted, [hosted.replay[0]])
                return
            child.replaying.popleft()
            self._turn_over(hosted)
        with self._cond:
            agents = list(child.agents.values())
        for hosted in agents:
            self._notify(hosted.wrapper)

    def _abandon(self, child: Child) -> None:
        """The engine is closing while the child was down: end the turns it held open."""
        while child.replaying:
            self._turn_over(child.replaying.popleft())

    # -- teardown ---------------------------------------------------------------------------

    def _join(self, timeout: float) -> list[str]:
        with self._children_lock:
            children = list(self._children)
        not_joined = self._retire(children, max(timeout, 0.5))
        self._stop_dispatch = True
        self._wake()
        if self._dispatcher is not None:
            self._dispatcher.join(1.0)

        # The dispatcher is gone: release the pipes it may not have seen close.
        for child in children:
            if child.conn is not None:
                child.gone()
                child.conn.close()
        if self._selector is not None:
            self._selector.close()
            for fd in (self._wake_r, self._wake_w):
                os.close(fd)
        return not_joined

    def _retire(self, children: list[Child], timeout: float) -> list[str]:
        not_joined = retire(children, timeout)
        with self._children_lock:
            self._children = [c for c in self._children if c not in children]
        return not_joined

    def _home(self, wrapper: AgentWrapper) -> str:
        return f"{self.name} pool of {self.max_workers}"
