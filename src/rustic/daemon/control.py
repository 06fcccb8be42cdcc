"""Control socket: one JSON request per line from the CLI to a running daemon, one reply back."""

from __future__ import annotations

import contextlib
import contextvars
import errno
import io
import itertools
import json
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

logger = logging.getLogger(__name__)

PROTOCOL_VERSION = 1
MAX_REQUEST_BYTES = 64 * 1024

Handler = Callable[[dict[str, Any]], Any]
"""Answers one op: takes the request's `args` and returns a JSON-serialisable result."""

_PROBE_TIMEOUT_S = 2.0
_JSON_TYPES = {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null"}
# After these the two ends of a connection no longer agree on where a line starts.
_CONNECTION_ENDING_CODES = frozenset({"too_large", "bad_reply"})


class ControlError(Exception):
    """An error reply of the control protocol, with its `code` and `message`.

    The client raises it for an error reply; a handler raises it to choose the code of its
    own reply (any other exception from a handler becomes `failed`).
    """

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


class DaemonNotRunning(Exception):
    """No daemon listens at the control socket: the file is missing or refuses connections."""

    def __init__(self, path: Path) -> None:
        super().__init__(f"no daemon is listening on {path}")
        self.path = path


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
                conn.sendall(_encode_error(None, ControlError("too_large", message)))
                return
            if line.strip():
                conn.sendall(self._respond(line))

    def _respond(self, line: bytes) -> bytes:
        """Turn one request line into one reply line, whatever the line or the handler does."""
        try:
            request = _decode_request(line)
        except ControlError as exc:
            return _encode_error(None, exc)
        request_id = request.get("id")
        op = request.get("op")

        try:
            result = self._dispatch(request)
        except ControlError as exc:
            return _encode_error(request_id, exc)
        except Exception as exc:
            logger.exception("control handler failed op=%s", op)
            return _encode_error(request_id, ControlError("failed", f"{type(exc).__name__}: {exc}"))

        reply = {"v": PROTOCOL_VERSION, "ok": True, "result": result, "id": request_id}
        try:
            return _encode(reply)
        except (TypeError, ValueError) as exc:
            logger.error("control handler result is not json op=%s error=%s", op, exc)
            message = f"result of op {op!r} is not JSON-serialisable: {exc}"
            return _encode_error(request_id, ControlError("failed", message))

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
            raise ControlError("bad_request", f"args must be an object; got {_json_type(args)}")

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


class ControlClient:
    """Send requests to a daemon's control socket over one connection, opened on first use.

    Not thread-safe: give each thread its own client. The keywords `op` and `timeout` belong
    to `request`, so an op cannot take arguments with those names.
    """

    def __init__(self, path: Path, timeout: float = 5.0) -> None:
        self.path = path
        self.timeout = timeout
        self._sock: socket.socket | None = None
        self._reader: io.BufferedReader | None = None
        self._ids = itertools.count(1)

    def __enter__(self) -> Self:
        self.connect()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def connect(self) -> None:
        """Open the connection unless it is open; raise `DaemonNotRunning` if nobody listens."""
        if self._sock is not None:
            return
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(os.fspath(self.path))
        except (FileNotFoundError, ConnectionRefusedError) as exc:
            sock.close()
            raise DaemonNotRunning(self.path) from exc
        except TimeoutError as exc:
            sock.close()
            raise ControlError("timeout", f"connect to {self.path} timed out") from exc
        self._sock = sock
        self._reader = sock.makefile("rb")

    def request(self, op: str, timeout: float | None = None, **args: Any) -> Any:
        """Send `op` with `args` and return the reply's result; raise `ControlError` on error.

        Besides the server's codes, `ControlError` carries `too_large` for a request over
        `MAX_REQUEST_BYTES` (not sent), and `timeout`, `closed` or `bad_reply` when no whole
        reply came back within `timeout` (default: the client's); the connection is then
        closed and the next request opens a new one.
        """
        request_id = next(self._ids)
        line = _encode({"v": PROTOCOL_VERSION, "op": op, "args": args, "id": request_id})
        if len(line) > MAX_REQUEST_BYTES + 1:
            message = f"request for op {op!r} is {len(line)} bytes; at most {MAX_REQUEST_BYTES}"
            raise ControlError("too_large", message)

        self.connect()
        try:
            reply = self._exchange(line, self.timeout if timeout is None else timeout)
            return _result_of(reply, request_id)
        except ControlError as exc:
            if exc.code in _CONNECTION_ENDING_CODES:
                self.close()
            raise
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Close the connection; the next request opens a new one."""
        if self._reader is not None:
            self._reader.close()
        if self._sock is not None:
            self._sock.close()
        self._sock = self._reader = None

    def _exchange(self, line: bytes, timeout: float) -> bytes:
        """Write one request line and read one reply line on the open connection."""
        if self._sock is None or self._reader is None:
            raise RuntimeError("control client is not connected")
        self._sock.settimeout(timeout)
        try:
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                # If the daemon closed on us, it may have replied first: read that below.
                self._sock.sendall(line)
            reply = self._reader.readline()
        except TimeoutError as exc:
            self.close()
            raise ControlError("timeout", f"no reply from {self.path} in {timeout}s") from exc
        except ConnectionResetError:
            reply = b""
        if not reply.endswith(b"\n"):
            self.close()
            raise ControlError("closed", f"daemon at {self.path} hung up without a reply")
        return reply


def _decode_request(line: bytes) -> dict[str, Any]:
    """Parse a request line into a JSON object, or raise a `bad_request` `ControlError`."""
    try:
        request = json.loads(line)
    except (ValueError, RecursionError) as exc:
        raise ControlError("bad_request", f"request is not valid JSON: {exc}") from None
    if not isinstance(request, dict):
        message = f"request must be a JSON object; got {_json_type(request)}"
        raise ControlError("bad_request", message)
    return request


def _result_of(line: bytes, request_id: int) -> Any:
    """Return the result of a reply line to request `request_id`, or raise its error."""
    try:
        reply = json.loads(line)
    except ValueError as exc:
        raise ControlError("bad_reply", f"reply is not valid JSON: {exc}") from None
    if not isinstance(reply, dict) or not isinstance(reply.get("ok"), bool):
        raise ControlError("bad_reply", f"reply is not a protocol reply: {line[:200]!r}")
    if reply.get("id") not in (request_id, None):
        raise ControlError("bad_reply", f"reply id {reply.get('id')!r} is not {request_id}")
    if reply["ok"]:
        return reply.get("result")
    error = reply.get("error")
    if not isinstance(error, dict):
        raise ControlError("bad_reply", f"error reply without an error object: {line[:200]!r}")
    raise ControlError(str(error.get("code", "failed")), str(error.get("message", "")))


def _encode(message: dict[str, Any]) -> bytes:
    """Serialise one protocol message as a compact JSON line."""
    return json.dumps(message, separators=(",", ":")).encode() + b"\n"


def _encode_error(request_id: Any, error: ControlError) -> bytes:
    """Serialise the error reply that carries `error`."""
    body = {"code": error.code, "message": error.message}
    return _encode({"v": PROTOCOL_VERSION, "ok": False, "error": body, "id": request_id})


def _json_type(value: Any) -> str:
    """Name the JSON type of a decoded value, for error messages."""
    return _JSON_TYPES.get(type(value), "number")
