"""Control socket protocol, server lifecycle and runtime paths, over real Unix sockets."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import stat
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from rustic.daemon import paths
from rustic.daemon.client import ControlClient, DaemonNotRunning
from rustic.daemon.control import ControlServer, DaemonAlreadyRunning, Handler
from rustic.daemon.protocol import MAX_REQUEST_BYTES, ControlError
from waiting import wait_until

pytestmark = pytest.mark.timeout(15)

WAIT_S = 5.0

StartServer = Callable[..., ControlServer]


def _status(args: dict[str, Any]) -> dict[str, Any]:
    return {"state": "running"}


def _echo(args: dict[str, Any]) -> dict[str, Any]:
    return args


def _boom(args: dict[str, Any]) -> None:
    raise RuntimeError("the engine is on fire")


HANDLERS: dict[str, Handler] = {"status": _status, "echo": _echo, "boom": _boom}


@pytest.fixture
def sock_path(tmp_path: Path) -> Path:
    return tmp_path / "guild.sock"


@pytest.fixture
def serve(sock_path: Path) -> Iterator[StartServer]:
    """Start servers at `sock_path` and stop them all when the test ends."""
    started: list[ControlServer] = []

    def start(handlers: dict[str, Handler] | None = None, **kwargs: Any) -> ControlServer:
        server = ControlServer(sock_path, HANDLERS if handlers is None else handlers, **kwargs)
        server.start()
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


def raw_exchange(path: Path, payload: bytes) -> tuple[dict[str, Any], bytes]:
    """Send raw bytes and hang up writing; return the first reply and what follows it."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(WAIT_S)
        sock.connect(os.fspath(path))
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            sock.sendall(payload)
            sock.shutdown(socket.SHUT_WR)
        with sock.makefile("rb") as reader:
            reply = json.loads(reader.readline())
            try:
                rest = reader.readline()
            except ConnectionResetError:
                rest = b""
    return reply, rest


def request(path: Path, op: str, **args: Any) -> Any:
    with ControlClient(path, timeout=WAIT_S) as client:
        return client.request(op, **args)


# --- protocol ---------------------------------------------------------------------------------


def test_an_op_gets_its_args_and_the_client_gets_its_result(
    serve: StartServer, sock_path: Path
) -> None:
    serve()

    assert request(sock_path, "echo", name="Ada", n=3) == {"name": "Ada", "n": 3}


def test_one_connection_carries_several_requests(serve: StartServer, sock_path: Path) -> None:
    serve()

    with ControlClient(sock_path, timeout=WAIT_S) as client:
        results = [client.request("echo", i=i) for i in range(5)]
        status = client.request("status")

    assert results == [{"i": i} for i in range(5)]
    assert status == {"state": "running"}


def test_a_reply_carries_the_id_the_client_chose(serve: StartServer, sock_path: Path) -> None:
    serve()

    reply, _ = raw_exchange(sock_path, b'{"v": 1, "op": "status", "id": "abc-1"}\n')

    assert reply == {"v": 1, "ok": True, "result": {"state": "running"}, "id": "abc-1"}


def test_ping_names_the_pid_and_the_guild(serve: StartServer, sock_path: Path) -> None:
    serve(guild_id="demo")

    assert request(sock_path, "ping") == {"pid": os.getpid(), "guild": "demo"}


@pytest.mark.parametrize(
    ("line", "code"),
    [
        pytest.param(b"{not json\n", "bad_request", id="invalid-json"),
        pytest.param(b"\xff\xfe\n", "bad_request", id="not-utf8"),
        pytest.param(b"[1, 2]\n", "bad_request", id="array"),
        pytest.param(b'"status"\n', "bad_request", id="string"),
        pytest.param(b'{"v": 1}\n', "bad_request", id="missing-op"),
        pytest.param(b'{"v": 1, "op": 7}\n', "bad_request", id="op-not-string"),
        pytest.param(b'{"v": 1, "op": "echo", "args": [1]}\n', "bad_request", id="args-array"),
        pytest.param(b'{"v": 1, "op": "nope"}\n', "unknown_op", id="unknown-op"),
        pytest.param(b'{"v": 2, "op": "status"}\n', "bad_version", id="version-2"),
        pytest.param(b'{"op": "status"}\n', "bad_version", id="version-missing"),
        pytest.param(b'{"v": true, "op": "status"}\n', "bad_version", id="version-bool"),
        pytest.param(b"[" * 50_000 + b"\n", "bad_request", id="deeply-nested"),
    ],
)
def test_a_malformed_request_gets_an_error_reply_and_the_server_keeps_serving(
    serve: StartServer, sock_path: Path, line: bytes, code: str
) -> None:
    serve()

    reply, _ = raw_exchange(sock_path, line)

    assert reply["v"] == 1
    assert reply["ok"] is False
    assert reply["error"]["code"] == code
    assert reply["error"]["message"]
    assert request(sock_path, "status") == {"state": "running"}


def test_an_unknown_op_error_lists_the_known_ops(serve: StartServer, sock_path: Path) -> None:
    serve()

    with pytest.raises(ControlError) as caught:
        request(sock_path, "frobnicate")

    assert caught.value.code == "unknown_op"
    assert "'frobnicate'" in caught.value.message
    assert "boom, echo, ping, status" in caught.value.message


def test_an_error_reply_keeps_the_connection_usable(serve: StartServer, sock_path: Path) -> None:
    serve()

    with ControlClient(sock_path, timeout=WAIT_S) as client:
        with pytest.raises(ControlError):
            client.request("nope")
        assert client.request("echo", ok=True) == {"ok": True}


def test_an_oversized_line_gets_too_large_and_its_connection_is_closed(
    serve: StartServer, sock_path: Path
) -> None:
    serve()

    reply, rest = raw_exchange(sock_path, b"x" * (1024 * 1024) + b"\n")

    assert reply["error"]["code"] == "too_large"
    assert rest == b""
    assert request(sock_path, "status") == {"state": "running"}


def test_a_line_of_exactly_the_maximum_size_is_accepted(
    serve: StartServer, sock_path: Path
) -> None:
    serve()
    frame = json.dumps({"v": 1, "op": "echo", "args": {"pad": ""}}).encode()
    pad = "p" * (MAX_REQUEST_BYTES - len(frame))
    line = json.dumps({"v": 1, "op": "echo", "args": {"pad": pad}}).encode()
    assert len(line) == MAX_REQUEST_BYTES

    reply, _ = raw_exchange(sock_path, line + b"\n")

    assert reply["ok"] is True
    assert reply["result"] == {"pad": pad}


def test_the_client_refuses_to_send_an_oversized_request(
    serve: StartServer, sock_path: Path
) -> None:
    serve()

    with ControlClient(sock_path, timeout=WAIT_S) as client:
        with pytest.raises(ControlError) as caught:
            client.request("echo", pad="p" * MAX_REQUEST_BYTES)
        assert caught.value.code == "too_large"
        assert client.request("echo", small=1) == {"small": 1}


# --- handlers ---------------------------------------------------------------------------------


def test_a_raising_handler_gets_failed_and_is_logged_with_its_traceback(
    serve: StartServer, sock_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    serve()
    caplog.set_level(logging.ERROR, logger="rustic.daemon.control")

    with ControlClient(sock_path, timeout=WAIT_S) as client:
        with pytest.raises(ControlError) as caught:
            client.request("boom")
        assert client.request("status") == {"state": "running"}

    assert caught.value.code == "failed"
    assert caught.value.message == "RuntimeError: the engine is on fire"
    [record] = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert record.getMessage() == "control handler failed op=boom"
    assert record.exc_info is not None


def test_a_handler_chooses_its_error_code_by_raising_control_error(
    serve: StartServer, sock_path: Path
) -> None:
    def strict(args: dict[str, Any]) -> None:
        raise ControlError("bad_request", "agent_id is required")

    serve({"reload": strict})

    with pytest.raises(ControlError) as caught:
        request(sock_path, "reload")

    assert (caught.value.code, caught.value.message) == ("bad_request", "agent_id is required")


def test_a_result_that_is_not_json_gets_failed(serve: StartServer, sock_path: Path) -> None:
    serve({"status": lambda args: {"when": object()}})

    with pytest.raises(ControlError) as caught:
        request(sock_path, "status")

    assert caught.value.code == "failed"
    assert "not JSON-serialisable" in caught.value.message


def test_ping_cannot_be_replaced_by_a_handler(sock_path: Path) -> None:
    with pytest.raises(ValueError, match="'ping'"):
        ControlServer(sock_path, {"ping": _status})


def test_a_slow_handler_does_not_block_ping_on_another_connection(
    serve: StartServer, sock_path: Path
) -> None:
    entered, release = threading.Event(), threading.Event()

    def slow(args: dict[str, Any]) -> str:
        entered.set()
        release.wait(WAIT_S)
        return "drained"

    serve({"stop": slow})
    results: list[Any] = []
    caller = threading.Thread(target=lambda: results.append(request(sock_path, "stop")))

    # Given a request whose handler is blocked
    caller.start()
    assert entered.wait(WAIT_S)

    # When another connection pings, Then it is answered while the first is still blocked
    try:
        assert request(sock_path, "ping")["pid"] == os.getpid()
        assert results == []
    finally:
        release.set()
        caller.join(WAIT_S)
    assert results == ["drained"]


# --- intake -----------------------------------------------------------------------------------


def test_closed_intake_refuses_ops_but_still_answers_status_and_ping(
    serve: StartServer, sock_path: Path
) -> None:
    server = serve()

    server.close_intake("SIGTERM received")

    with ControlClient(sock_path, timeout=WAIT_S) as client:
        with pytest.raises(ControlError) as caught:
            client.request("echo", x=1)
        assert client.request("status") == {"state": "running"}
        assert client.request("ping")["pid"] == os.getpid()
    assert caught.value.code == "shutting_down"
    assert "SIGTERM received" in caught.value.message


def test_closed_intake_honours_a_custom_allowlist(serve: StartServer, sock_path: Path) -> None:
    server = serve(always_allowed=frozenset({"echo", "ping"}))

    server.close_intake("stopping")

    assert request(sock_path, "echo", x=1) == {"x": 1}
    with pytest.raises(ControlError, match="shutting_down"):
        request(sock_path, "status")


# --- socket file lifecycle --------------------------------------------------------------------


def test_the_socket_file_is_only_accessible_to_its_owner(
    serve: StartServer, sock_path: Path
) -> None:
    serve()

    assert stat.S_IMODE(sock_path.stat().st_mode) == 0o600


def test_a_stale_socket_is_replaced_and_the_removal_logged(
    serve: StartServer, sock_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Given a socket file whose daemon died without unlinking it
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as dead:
        dead.bind(os.fspath(sock_path))
    assert sock_path.is_socket()
    caplog.set_level(logging.WARNING, logger="rustic.daemon.control")

    # When a new server starts at the same path
    serve()

    # Then it serves there and says it removed the leftover
    assert request(sock_path, "status") == {"state": "running"}
    messages = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert messages == [f"removed stale control socket path={sock_path}"]


def test_a_live_server_makes_a_second_one_raise_with_its_pid(
    serve: StartServer, sock_path: Path
) -> None:
    serve()
    second = ControlServer(sock_path, HANDLERS)

    with pytest.raises(DaemonAlreadyRunning) as caught:
        second.start()

    assert caught.value.pid == os.getpid()
    assert caught.value.path == sock_path
    assert request(sock_path, "status") == {"state": "running"}


def test_a_file_that_is_not_a_socket_is_left_alone(sock_path: Path) -> None:
    sock_path.write_text("not mine to delete")

    with pytest.raises(FileExistsError, match="not a socket"):
        ControlServer(sock_path, HANDLERS).start()

    assert sock_path.read_text() == "not mine to delete"


def test_stop_removes_the_socket_file_and_clients_then_find_no_daemon(
    sock_path: Path,
) -> None:
    server = ControlServer(sock_path, HANDLERS)
    server.start()

    server.stop()

    assert not sock_path.exists()
    with pytest.raises(DaemonNotRunning):
        request(sock_path, "status")


def test_stop_leaves_a_socket_file_that_another_daemon_has_taken_over(
    sock_path: Path,
) -> None:
    server = ControlServer(sock_path, HANDLERS)
    server.start()
    sock_path.unlink()
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as other:
        other.bind(os.fspath(sock_path))

        server.stop()

        assert sock_path.is_socket()


def test_stop_lets_a_request_in_progress_deliver_its_reply(sock_path: Path) -> None:
    entered, release = threading.Event(), threading.Event()

    def slow(args: dict[str, Any]) -> str:
        entered.set()
        release.wait(WAIT_S)
        return "done"

    server = ControlServer(sock_path, {"stop": slow})
    server.start()
    results: list[Any] = []
    caller = threading.Thread(target=lambda: results.append(request(sock_path, "stop")))
    caller.start()
    assert entered.wait(WAIT_S)

    # stop() waits for the connection in progress, so it runs beside the release
    stopper = threading.Thread(target=server.stop)
    stopper.start()
    wait_until(lambda: not sock_path.exists())  # the stop is under way: the socket is gone
    release.set()
    stopper.join(WAIT_S)
    caller.join(WAIT_S)

    assert results == ["done"]
    assert not sock_path.exists()


def test_a_client_on_a_missing_socket_raises_daemon_not_running(tmp_path: Path) -> None:
    missing = tmp_path / "nobody.sock"

    with pytest.raises(DaemonNotRunning) as caught:
        ControlClient(missing).request("status")

    assert caught.value.path == missing


# --- runtime paths ----------------------------------------------------------------------------


def test_ensure_runtime_dir_creates_it_private(tmp_path: Path) -> None:
    created = paths.ensure_runtime_dir(tmp_path / "run" / "rustic")

    assert created.is_dir()
    assert stat.S_IMODE(created.stat().st_mode) == 0o700


def test_ensure_runtime_dir_tightens_an_existing_dir_of_ours(tmp_path: Path) -> None:
    loose = tmp_path / "loose"
    loose.mkdir(mode=0o755)
    loose.chmod(0o755)

    paths.ensure_runtime_dir(loose)

    assert stat.S_IMODE(loose.stat().st_mode) == 0o700


def test_ensure_runtime_dir_refuses_a_dir_owned_by_another_user(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    theirs = tmp_path / "theirs"
    theirs.mkdir(mode=0o755)
    theirs.chmod(0o755)
    monkeypatch.setattr(os, "getuid", lambda: theirs.stat().st_uid + 1)

    with pytest.raises(PermissionError, match="RUSTIC_RUNTIME_DIR"):
        paths.ensure_runtime_dir(theirs)

    assert stat.S_IMODE(theirs.stat().st_mode) == 0o755


def test_runtime_dir_prefers_explicit_then_rustic_then_xdg_then_tmp(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("RUSTIC_RUNTIME_DIR", "/r/rustic")
    monkeypatch.setenv("XDG_RUNTIME_DIR", "/run/user/7")
    assert paths.runtime_dir("/explicit") == Path("/explicit")
    assert paths.runtime_dir() == Path("/r/rustic")

    monkeypatch.delenv("RUSTIC_RUNTIME_DIR")
    assert paths.runtime_dir() == Path("/run/user/7/rustic")

    monkeypatch.delenv("XDG_RUNTIME_DIR")
    assert paths.runtime_dir() == Path(f"/tmp/rustic-{os.getuid()}")


def test_guild_files_are_named_after_the_guild(tmp_path: Path) -> None:
    assert paths.socket_path(tmp_path, "demo") == tmp_path / "demo.sock"
    assert paths.pid_path(tmp_path, "demo") == tmp_path / "demo.pid"
    assert paths.spill_path(tmp_path, "demo") == tmp_path / "demo.spill.jsonl"


@pytest.mark.parametrize("guild_id", ["", ".", "..", "a/b", "../escape"])
def test_a_guild_id_that_is_not_a_file_name_is_refused(tmp_path: Path, guild_id: str) -> None:
    with pytest.raises(ValueError, match="guild id"):
        paths.pid_path(tmp_path, guild_id)


def test_a_socket_path_too_long_for_a_unix_address_is_refused(tmp_path: Path) -> None:
    deep = tmp_path / ("d" * 120)

    with pytest.raises(ValueError, match="RUSTIC_RUNTIME_DIR"):
        paths.socket_path(deep, "demo")


def test_list_guild_sockets_names_guilds_with_a_socket_file(tmp_path: Path) -> None:
    for guild in ("beta", "alpha"):
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.bind(os.fspath(paths.socket_path(tmp_path, guild)))
    (tmp_path / "plain.sock").write_text("")
    (tmp_path / "gamma.pid").write_text("1")

    assert paths.list_guild_sockets(tmp_path) == ["alpha", "beta"]
    assert paths.list_guild_sockets(tmp_path / "missing") == []
