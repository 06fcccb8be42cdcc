"""Control socket server: answers the CLI's requests to a running daemon, one thread each."""

from __future__ import annotations

import contextlib
import contextvars
import errno
import io
import logging
import os
import selectors
import socket
import stat
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from rustic.daemon.client import ControlClient, DaemonNotRunning
from rustic.daemon.protocol import (
    MAX_REQUEST_BYTES,
    PROTOCOL_VERSION,
    ControlError,
    decode_request,
    encode,
    encode_error,
    json_type,
)

logger = logging.getLogger(__name__)

Handler = Callable[[dict[str, Any]], Any]
"""Answers one op: takes the request's `args` and returns a JSON-serialisable result."""

_PROBE_TIMEOUT_S = 2.0


class DaemonAlreadyRunning(Exception):
    """A live daemon answers at the control socket a new daemon wants; `pid` if it said."""

    def __init__(self, path: Path, pid: int | None) -> None:
        owner = f"pid {pid}" if pid is not None else "unknown pid"
        super().__init__(f"a daemon ({owner}) is already listening on {path}")
        self.path = path
        self.pid = pid


def claim_socket(path: Path) -> None:
    """Free `path` for a new control socket, removing a socket left there by a crashed daemon.

    Raises `DaemonAlreadyRunning` when something answers at `path`, and `FileExistsError`
    when the path holds something other than a socket.
    """
    try:
        info = path.lstat()
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(info.st_mode):
        raise FileExistsError(f"control socket path {path} exists and is not a socket; remove it")

    # Only a connect tells a live daemon from a dead one's leftover; the ping names the pid.
    try:
        with ControlClient(path, timeout=_PROBE_TIMEOUT_S) as client:
            reply = client.request("ping")
    except DaemonNotRunning:
        path.unlink(missing_ok=True)
        logger.warning("removed stale control socket path=%s", path)
        return
    except (ControlError, OSError):
        # Something listens but does not answer our ping: it is alive, so leave it alone.
        reply = None
    pid = reply.get("pid") if isinstance(reply, dict) else None
    raise DaemonAlreadyRunning(path, pid if isinstance(pid, int) else None)


@dataclass(frozen=True)
class _Listening:
    """What a started server holds until it stops."""

    listener: socket.socket
    wake_reader: socket.socket
    wake_writer: socket.socket
    thread: threading.Thread
    identity: tuple[int, int]  # (st_dev, st_ino) of the socket file we bound


class ControlServer:
    """Serve the control protocol on a Unix socket, each connection on its own thread.

    A request's `args` go to the handler registered for its `op`, and the handler's return
    value, which must be JSON-serialisable, becomes the reply's `result`. `ping` is built
    in and answers `{"pid": ..., "guild": ...}`. Because every connection has a thread, a
    slow handler (a `stop` waiting for a drain) never delays `status` on another
    connection. There is no cap on connections: only the socket's owner can connect.
    """

    def __init__(
        self,
        path: Path,
        handlers: Mapping[str, Handler],
        *,
        guild_id: str | None = None,
        always_allowed: frozenset[str] = frozenset({"status", "ping"}),
    ) -> None:
        if "ping" in handlers:
            raise ValueError("handlers must not include 'ping': the control server answers it")
        self.path = path
        self.guild_id = guild_id
        self.always_allowed = always_allowed
        self._handlers: dict[str, Handler] = {**handlers, "ping": self._ping}
        # Written once by close_intake and read by connection threads; a plain attribute
        # store is atomic, so a request sees either the open or the closed intake.
        self._intake_closed_reason: str | None = None
        self._lock = threading.Lock()
        self._listening: _Listening | None = None  # guarded by _lock
        self._connections: set[socket.socket] = set()  # guarded by _lock
        self._connection_threads: set[threading.Thread] = set()  # guarded by _lock
        self._stopping = False  # guarded by _lock

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def start(self) -> None:
        """Claim the socket path, bind it with mode 0600 and serve on a daemon thread.

        Raises `DaemonAlreadyRunning` when a live daemon holds the path.
        """
        if self._listening is not None:
            raise RuntimeError(f"control server on {self.path} can be started only once")

        # A crashed daemon's socket is removed here; a live daemon's makes us raise.
        claim_socket(self.path)

        # Bind before any thread exists, so a failure leaves nothing behind to clean up.
        listener = self._bind()
        info = self.path.stat()

        # The accept loop sleeps on the listener and on a wake-up pair that stop() writes to.
        # It runs in a copy of our context so that ids kept in contextvars reach its logs.
        wake_reader, wake_writer = socket.socketpair()
        thread = threading.Thread(
            target=contextvars.copy_context().run,
            args=(self._accept_loop, listener, wake_reader),
            name="rustic-control-accept",
            daemon=True,
        )
        with self._lock:
            self._listening = _Listening(
                listener, wake_reader, wake_writer, thread, (info.st_dev, info.st_ino)
            )
        thread.start()
        logger.info("control socket listening path=%s", self.path)

    def close_intake(self, reason: str) -> None:
        """Refuse every op outside `always_allowed` with `shutting_down` from now on."""
        self._intake_closed_reason = reason
        logger.info("control intake closed reason=%s", reason)

    def stop(self, timeout: float = 5.0) -> None:
        """Stop listening, remove the socket file if it is still ours and join the accept thread.

        A request already being handled still gets its reply: open connections only stop
        reading, and their threads are given what is left of `timeout` to send it. Calling
        it again, or before `start`, does nothing.
        """
        deadline = time.monotonic() + timeout
        with self._lock:
            listening = self._listening
            if listening is None or self._stopping:
                return
            self._stopping = True
            connections = list(self._connections)
            threads = list(self._connection_threads)

        # Wake the accept loop and wait for it, so nothing is accepted on a closing socket.
        listening.wake_writer.send(b"\0")
        listening.thread.join(timeout)
        if listening.thread.is_alive():
            logger.warning("control accept thread did not exit timeout_s=%.1f", timeout)

        # Close before unlinking: once closed, a new daemon may find the path stale and take
        # it, and the identity check keeps us from removing that daemon's socket.
        for sock in (listening.listener, listening.wake_reader, listening.wake_writer):
            sock.close()
        self._unlink_if_ours(listening.identity)

        # Each connection thread ends after answering the request it holds, if any.
        for conn in connections:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RD)
        for thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        logger.info("control socket closed path=%s", self.path)

    def _bind(self) -> socket.socket:
        """Bind and listen on the path, the socket file being 0600 from its first moment."""
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)

        # A chmod after bind would leave a window in which anyone could connect. The umask
        # is process-wide: a file another thread creates meanwhile only comes out stricter.
        previous_umask = os.umask(0o177)
        try:
            listener.bind(os.fspath(self.path))
        except OSError as exc:
            listener.close()
            if exc.errno == errno.EADDRINUSE:
                # Another daemon bound the path between our claim and our bind.
                raise DaemonAlreadyRunning(self.path, None) from exc
            raise
        finally:
            os.umask(previous_umask)

        listener.listen()
        listener.setblocking(False)
        return listener

    def _unlink_if_ours(self, identity: tuple[int, int]) -> None:
        """Remove the socket file unless another daemon has replaced it since we bound it."""
        try:
            info = self.path.lstat()
        except FileNotFoundError:
            return
        if (info.st_dev, info.st_ino) != identity:
            logger.debug("control socket replaced, left in place path=%s", self.path)
            return
        self.path.unlink(missing_ok=True)

    def _accept_loop(self, listener: socket.socket, wake_reader: socket.socket) -> None:
        """Accept connections until stop() writes to the wake-up pair."""
        with selectors.DefaultSelector() as selector:
            selector.register(listener, selectors.EVENT_READ)
            selector.register(wake_reader, selectors.EVENT_READ)
            while True:
                ready = {key.fileobj for key, _ in selector.select()}
                if wake_reader in ready:
                    return
                self._accept_one(listener)

    def _accept_one(self, listener: socket.socket) -> None:
        """Accept one pending connection and start the thread that answers it."""
        try:
            conn, _ = listener.accept()
        except BlockingIOError:
            return
        except OSError as exc:
            logger.warning("control connection not accepted error=%s", exc)
            return
        conn.setblocking(True)

        thread = threading.Thread(
            target=contextvars.copy_context().run,
            args=(self._serve_connection, conn),
            name="rustic-control-conn",
            daemon=True,
        )
        with self._lock:
            if self._stopping:
                conn.close()
                return
            self._connections.add(conn)
            self._connection_threads.add(thread)
        thread.start()

    def _serve_connection(self, conn: socket.socket) -> None:
        """Answer the requests of one connection until the client hangs up; never raises."""
        try:
            with conn, conn.makefile("rb") as reader:
                self._answer_lines(conn, reader)
        except OSError as exc:
            logger.debug("control connection ended error=%s", exc)
        except Exception:
            logger.exception("control connection failed")
        finally:
            with self._lock:
                self._connections.discard(conn)
                self._connection_threads.discard(threading.current_thread())

    def _answer_lines(self, conn: socket.socket, reader: io.BufferedReader) -> None:
        """Reply to each request line in order; a blank line is skipped."""
        while line := reader.readline(MAX_REQUEST_BYTES + 1):
            if len(line) > MAX_REQUEST_BYTES and not line.endswith(b"\n"):
                # The rest of the line stays unread, so the connection cannot carry on.
                message = f"request line exceeds {MAX_REQUEST_BYTES} bytes"
                conn.sendall(encode_error(None, ControlError("too_large", message)))
                return
            if line.strip():
                conn.sendall(self._respond(line))

    def _respond(self, line: bytes) -> bytes:
        """Turn one request line into one reply line, whatever the line or the handler does."""
        try:
            request = decode_request(line)
        except ControlError as exc:
            return encode_error(None, exc)
        request_id = request.get("id")
        op = request.get("op")

        try:
            result = self._dispatch(request)
        except ControlError as exc:
            return encode_error(request_id, exc)
        except Exception as exc:
            logger.exception("control handler failed op=%s", op)
            return encode_error(request_id, ControlError("failed", f"{type(exc).__name__}: {exc}"))

        reply = {"v": PROTOCOL_VERSION, "ok": True, "result": result, "id": request_id}
        try:
            return encode(reply)
        except (TypeError, ValueError) as exc:
            logger.error("control handler result is not json op=%s error=%s", op, exc)
            message = f"result of op {op!r} is not JSON-serialisable: {exc}"
            return encode_error(request_id, ControlError("failed", message))

    def _dispatch(self, request: dict[str, Any]) -> Any:
        """Check a decoded request and run its handler; raise `ControlError` to refuse it."""
        version = request.get("v")
        if version != PROTOCOL_VERSION or isinstance(version, bool):
            message = f"v must be {PROTOCOL_VERSION}; got {version!r}"
            raise ControlError("bad_version", message)
        op = request.get("op")
        if not isinstance(op, str):
            raise ControlError("bad_request", f"op must be a string; got {op!r}")
        args = request.get("args", {})
        if not isinstance(args, dict):
            raise ControlError("bad_request", f"args must be an object; got {json_type(args)}")

        handler = self._handlers.get(op)
        if handler is None:
            known = ", ".join(sorted(self._handlers))
            raise ControlError("unknown_op", f"unknown op {op!r}; known ops: {known}")
        reason = self._intake_closed_reason
        if reason is not None and op not in self.always_allowed:
            message = f"op {op!r} refused: the daemon is shutting down ({reason})"
            raise ControlError("shutting_down", message)

        logger.debug("control request op=%s", op)
        return handler(args)

    def _ping(self, args: dict[str, Any]) -> dict[str, Any]:
        """Say who serves this socket: the built-in `ping` op."""
        return {"pid": os.getpid(), "guild": self.guild_id}
