"""A multiprocess engine's child process: the guild's handle on it, and the loop inside it.

Requests and replies cross one duplex pipe as pickled tuples. A request is ``(seq, op,
agent_id, arg)``; the reply is ``(seq, ok, value)``, where ``value`` is the result or,
when ``ok`` is False, the remote traceback as text. Inside the child the main thread only
reads and routes: each agent has a thread of its own that handles its batches in order,
and builds, hooks and drops run on short-lived helper threads, so that a stuck handler
neither blocks the other agents of the child nor keeps ``on_shutdown`` from running.
"""

from __future__ import annotations

import contextlib
import logging
import pickle
import sys
import threading
import time
from collections import deque
from concurrent.futures import Future
from multiprocessing.connection import Connection
from multiprocessing.context import SpawnContext
from multiprocessing.process import BaseProcess
from queue import SimpleQueue
from typing import Any

from rustic.engines.hosted import Hosted, HostGone
from rustic.engines.remote import AgentHost, HostError, HostOrder, Outcome, close_host_guilds
from rustic.engines.remote import describe_failure as describe
from rustic.logs import JsonFormatter, configure_logging
from rustic.message import Message

logger = logging.getLogger(__name__)

BUILD = "build"  # arg: HostOrder; answers the build's Outcome
HANDLE = "handle"  # arg: list[Message]; answers the batch's Outcome
HOOK = "hook"  # arg: (kind, timeout); answers the hooks' Outcome
DROP = "drop"  # arg: None; the agent stopped: close its host
EXIT = "exit"  # no answer: close every host and exit

Request = tuple[int, str, str, Any]
_Batch = tuple[int, list[Message]]


class Child:
    """One child process hosting agents, as the guild's process sees it."""

    def __init__(self, label: str, pooled: bool) -> None:
        self.label = label
        self.pooled = pooled  # new agents go to pooled children; a reload's child is not
        self.process: BaseProcess | None = None
        self.conn: Connection | None = None
        self.lock = threading.Lock()  # serialises sends
        self.alive = False  # guarded by `lock`
        self.calls: dict[int, Future[tuple[bool, Any]]] = {}  # guarded by `lock`
        self.agents: dict[str, Hosted] = {}  # guarded by the engine's `_cond`

        # The engine's dispatcher thread owns these.
        self.batches: dict[int, Hosted] = {}  # batches in flight, by request seq
        self.replaying: deque[Hosted] = deque()  # agents whose lost mail is replayed first
        self.ready = False  # batches may go: the child's agents are built
        self.restarting = False
        self.retiring = False
        self.restarts = 0  # restarts in a row; a handled batch resets it

    @property
    def pid(self) -> int | None:
        """The child's process id."""
        return self.process.pid if self.process is not None else None

    def start(self, context: SpawnContext) -> Connection:
        """Spawn the child process; returns the guild's end of its pipe."""
        parent_end, child_end = context.Pipe(duplex=True)
        process = context.Process(
            target=serve, args=(child_end, log_setup()), name=f"rustic-{self.label}", daemon=True
        )
        process.start()
        child_end.close()  # so that the child's death reads as EOF here
        with self.lock:
            self.process, self.conn, self.alive = process, parent_end, True
        logger.debug("child started child=%s pid=%s", self.label, process.pid)
        return parent_end

    def send(self, request: Request) -> None:
        """Pickle and send ``request``; raises HostGone when the child is gone."""
        data = _pickled(request)
        with self.lock:
            if not self.alive or self.conn is None:
                raise HostGone(f"{self.label} is not running")
            try:
                self.conn.send_bytes(data)
            except OSError as exc:
                raise HostGone(f"{self.label} is gone: {exc}") from exc

    def call(self, request: Request, timeout: float) -> Any:
        """Send ``request`` and wait for its answer (which the dispatcher thread reads)."""
        seq, op = request[0], request[1]
        future: Future[tuple[bool, Any]] = Future()
        with self.lock:
            self.calls[seq] = future
        try:
            self.send(request)
            ok, value = future.result(timeout)
        except TimeoutError:
            raise HostError(f"{self.label} did not answer {op} within {timeout:.1f}s") from None
        finally:
            with self.lock:
                self.calls.pop(seq, None)
        if not ok:
            raise HostError(value)
        return value

    def gone(self) -> list[Future[tuple[bool, Any]]]:
        """Mark the child gone; returns the calls still waiting on it."""
        with self.lock:
            self.alive = False
            calls, self.calls = list(self.calls.values()), {}
        return calls


def retire(children: list[Child], timeout: float) -> list[str]:
    """Tell children to exit and wait; kill those that do not. Returns who survived that."""
    deadline = time.monotonic() + timeout
    for child in children:
        child.retiring = True
        with contextlib.suppress(HostError):
            child.send((0, EXIT, "", None))
    for child in children:
        if child.process is not None:
            child.process.join(max(0.0, deadline - time.monotonic()))

    # What did not exit in time is killed: no child outlives its engine.
    for child in children:
        if child.process is not None and child.process.is_alive():
            logger.warning("child did not exit, killing child=%s pid=%s", child.label, child.pid)
            child.process.kill()
            child.process.join(1.0)
    return [c.label for c in children if c.process is not None and c.process.is_alive()]


def log_setup() -> tuple[str, str] | None:
    """How children should log: the root logger's level and format, if it is configured."""
    root = logging.getLogger()
    if not root.handlers:
        return None
    json_lines = any(isinstance(h.formatter, JsonFormatter) for h in root.handlers)
    return logging.getLevelName(root.level).lower(), "json" if json_lines else "text"


def _pickled(request: Request) -> bytes:
    try:
        return pickle.dumps(request, protocol=pickle.HIGHEST_PROTOCOL)
    except (pickle.PicklingError, TypeError, AttributeError) as exc:
        raise HostError(
            f"cannot send {request[1]} for agent {request[2]!r} to a child process: {exc} "
            "(agent classes, payloads and dependency specs must be picklable; classes "
            "must be defined at module level in an importable module)"
        ) from exc


# -- inside the child -----------------------------------------------------------------------


def serve(conn: Connection, logs: tuple[str, str] | None) -> None:
    """Run a child: host agents and answer on ``conn`` until told to exit or orphaned."""
    _adopt_main_classes()
    if logs is not None:
        configure_logging(*logs)
    _Loop(conn).run()


def _adopt_main_classes() -> None:
    """Give the classes of the guild's main script their ``__main__`` module name back.

    A spawned child runs the parent's main script as ``__mp_main__``; agents and payload
    models defined there must keep the name the guild's process knows them by, which is
    what message formats and pickles refer to.
    """
    main = sys.modules.get("__mp_main__")
    if main is None:
        return
    for value in list(vars(main).values()):
        if isinstance(value, type) and value.__module__ == "__mp_main__":
            value.__module__ = "__main__"


class _Loop:
    """The hosts of one child process and the threads that serve them."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self._send_lock = threading.Lock()
        self._hosts: dict[str, AgentHost] = {}
        self._queues: dict[str, SimpleQueue[_Batch | None]] = {}

    def run(self) -> None:
        """Route requests until EXIT, or until the guild's process is gone (EOF)."""
        while True:
            try:
                seq, op, agent_id, arg = self.conn.recv()
            except (EOFError, OSError):
                break
            if op == HANDLE and agent_id in self._queues:
                self._queues[agent_id].put((seq, arg))
            elif op == HANDLE:
                self._reply(seq, False, f"agent {agent_id!r} is not hosted here")
            elif op == EXIT:
                break
            else:
                name = f"rustic-{op}-{agent_id}"
                helper = threading.Thread(
                    target=self._control, args=(seq, op, agent_id, arg), name=name, daemon=True
                )
                helper.start()
        self._close()

    def _control(self, seq: int, op: str, agent_id: str, arg: Any) -> None:
        try:
            if op == BUILD:
                value: Any = self._build(arg)
            elif op == HOOK:
                value = self._hosts[agent_id].run_hook(*arg)
            elif op == DROP:
                value = self._drop(agent_id)
            else:
                raise ValueError(f"unknown request {op!r}")
        except BaseException as exc:
            self._reply(seq, False, describe(exc))
        else:
            self._reply(seq, True, value)

    def _build(self, order: HostOrder) -> Outcome:
        host = AgentHost(order)
        queue: SimpleQueue[_Batch | None] = SimpleQueue()
        self._hosts[host.agent_id] = host
        self._queues[host.agent_id] = queue
        thread = threading.Thread(
            target=self._serve_agent, args=(host, queue), name=f"rustic-{host.agent_id}"
        )
        thread.daemon = True
        thread.start()
        return host.collect(host.hooks_ok)

    def _drop(self, agent_id: str) -> bool:
        host = self._hosts.pop(agent_id)
        self._queues.pop(agent_id).put(None)
        host.close()
        return True

    def _serve_agent(self, host: AgentHost, queue: SimpleQueue[_Batch | None]) -> None:
        """One agent's thread: its batches, in the order they came."""
        while (item := queue.get()) is not None:
            seq, batch = item
            try:
                outcome = host.handle(batch)
            except BaseException as exc:
                self._reply(seq, False, describe(exc))
            else:
                self._reply(seq, True, outcome)

    def _reply(self, seq: int, ok: bool, value: Any) -> None:
        try:
            data = pickle.dumps((seq, ok, value), protocol=pickle.HIGHEST_PROTOCOL)
        except Exception as exc:
            data = pickle.dumps((seq, False, f"the reply cannot be pickled: {describe(exc)}"))

        # If the guild's process is gone, `run` sees EOF and the child exits.
        with self._send_lock, contextlib.suppress(OSError):
            self.conn.send_bytes(data)

    def _close(self) -> None:
        for agent_id in list(self._hosts):
            try:
                self._drop(agent_id)
            except Exception:
                logger.exception("host did not close agent_id=%s", agent_id)
        close_host_guilds()
