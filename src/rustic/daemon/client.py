"""Control client: sends requests to a running daemon's control socket and reads its replies."""

from __future__ import annotations

import contextlib
import io
import itertools
import os
import socket
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from rustic.daemon.protocol import (
    CONNECTION_ENDING_CODES,
    MAX_REQUEST_BYTES,
    PROTOCOL_VERSION,
    ControlError,
    encode,
    result_of,
)


class DaemonNotRunning(Exception):
    """No daemon listens at the control socket: the file is missing or refuses connections."""

    def __init__(self, path: Path) -> None:
        super().__init__(f"no daemon is listening on {path}")
        self.path = path


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
        line = encode({"v": PROTOCOL_VERSION, "op": op, "args": args, "id": request_id})
        if len(line) > MAX_REQUEST_BYTES + 1:
            message = f"request for op {op!r} is {len(line)} bytes; at most {MAX_REQUEST_BYTES}"
            raise ControlError("too_large", message)

        self.connect()
        try:
            reply = self._exchange(line, self.timeout if timeout is None else timeout)
            return result_of(reply, request_id)
        except ControlError as exc:
            if exc.code in CONNECTION_ENDING_CODES:
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
