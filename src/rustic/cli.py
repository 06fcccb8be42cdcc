"""The `rustic` command: run a guild as a daemon and steer it from another terminal."""

from __future__ import annotations

import json
import os
import sys
import time
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer
from rich.console import Console
from rich.live import Live

from rustic.daemon.client import ControlClient, DaemonNotRunning
from rustic.daemon.exitcodes import EXIT_FAILURE, EXIT_OK, EXIT_USAGE
from rustic.daemon.locate import DaemonRef, NoDaemon, SeveralDaemons, find_daemon, probe
from rustic.daemon.locate import wait_for_exit as wait_for_daemon_exit
from rustic.daemon.options import RunOptions, UsageError, load_checked_spec
from rustic.daemon.paths import list_guild_sockets, runtime_dir
from rustic.daemon.protocol import ControlError
from rustic.daemon.render import guilds_table, make_console, reload_table, status_table
from rustic.spec import SpecError

STOP_REPLY_MARGIN_S = 60.0  # beyond the shutdown timeout, how long `stop` waits for its reply
STOP_REPLY_DEFAULT_S = 300.0  # the shutdown timeout assumed when `stop` is not given one
EXIT_WAIT_S = 10.0  # how long `stop` waits for the process to end after the reply

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Run guilds of message-driven agents; steer a running guild over its control socket.",
)


class LogLevel(StrEnum):
    """Levels accepted by `--log-level`."""

    debug = "debug"
    info = "info"
    warning = "warning"
    error = "error"


class LogFormat(StrEnum):
    """Formats accepted by `--log-format`."""

    text = "text"
    json = "json"


_debug = bool(os.environ.get("RUSTIC_DEBUG"))

GuildOpt = Annotated[
    str | None,
    typer.Option("--guild", "-g", envvar="RUSTIC_GUILD", help="Guild id of the daemon to talk to."),
]
RuntimeDirOpt = Annotated[
    Path | None,
    typer.Option(
        help="Where control sockets live; default $RUSTIC_RUNTIME_DIR, else "
        "$XDG_RUNTIME_DIR/rustic, else /tmp/rustic-UID."
    ),
]


@app.callback()
def _options(
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks of errors.")] = False,
) -> None:
    global _debug
    _debug = _debug or debug


@app.command()
def run(
    guild_file: Annotated[Path, typer.Argument(help="The guild's YAML file.")],
    *,
    engine: Annotated[str | None, typer.Option(help="Engine name or pkg.module:Class.")] = None,
    max_workers: Annotated[int | None, typer.Option(min=1)] = None,
    thread_name_prefix: Annotated[str | None, typer.Option()] = None,
    messaging: Annotated[str | None, typer.Option(help="Bus URL: memory, sqlite:///…")] = None,
    state: Annotated[str | None, typer.Option(help="State store URL: memory, sqlite:///…")] = None,
    only: Annotated[list[str] | None, typer.Option(help="Run only these agents: ID,ID…")] = None,
    shutdown_timeout: Annotated[float | None, typer.Option(help="Seconds for the drain.")] = None,
    app_dir: Annotated[Path | None, typer.Option(help="Import agents from here.")] = None,
    runtime_dir: RuntimeDirOpt = None,
    log_level: Annotated[LogLevel, typer.Option()] = LogLevel.info,
    log_format: Annotated[LogFormat, typer.Option()] = LogFormat.text,
    watch: Annotated[bool, typer.Option("--watch", help="Hot-swap agents on every save.")] = False,
    watch_path: Annotated[
        list[Path] | None, typer.Option(help="Folder to watch (default: the app dir).")
    ] = None,
    watch_exclude: Annotated[
        list[str] | None, typer.Option(help="Glob of paths that --watch ignores.")
    ] = None,
) -> None:
    """Run a guild in the foreground until SIGINT, SIGTERM or `rustic stop`.

    SIGHUP (or `rustic reload --all`) hot-swaps every agent to its current code and spec.
    """
    from rustic.daemon.runner import run_daemon  # the runtime loads only for `run`

    if shutdown_timeout is not None and shutdown_timeout <= 0:
        _fail(f"--shutdown-timeout must be positive; got {shutdown_timeout}", EXIT_USAGE)
    ids = frozenset(part.strip() for item in only or [] for part in item.split(",") if part.strip())
    if only and not ids:
        _fail("--only needs at least one agent id", EXIT_USAGE)
    options = RunOptions(
        guild_file=guild_file,
        engine=engine,
        max_workers=max_workers,
        thread_name_prefix=thread_name_prefix,
        messaging=messaging,
        state=state,
        only=ids if only else None,
        shutdown_timeout=shutdown_timeout,
        app_dir=app_dir,
        runtime_dir=runtime_dir,
        log_level=log_level.value,
        log_format=log_format.value,
        watch=watch,
        watch_paths=tuple(p.resolve() for p in watch_path or []),
        watch_excludes=tuple(watch_exclude or []),
    )
    raise typer.Exit(run_daemon(options, make_console(), make_console(stderr=True)))


@app.command()
def status(
    guild: GuildOpt = None,
    runtime_dir: RuntimeDirOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the status as JSON.")] = False,
    watch: Annotated[bool, typer.Option("--watch", help="Refresh until interrupted.")] = False,
    interval: Annotated[float, typer.Option(min=0.1, help="Seconds between refreshes.")] = 1.0,
) -> None:
    """Show the agents of a running guild: engine, state, counters, queue depth."""
    _, ref = _find(guild, runtime_dir)
    console = make_console()
    with ControlClient(ref.socket) as client:
        if watch:
            _watch(client, ref, console, interval, as_json)
        result = _request(client, "status")
    if as_json and console.is_terminal:
        console.print_json(data=result)
    elif as_json:
        print(json.dumps(result))
    else:
        console.print(status_table(console, result))


@app.command()
def send(
    topic: Annotated[str, typer.Argument(help="Topic to publish on.")],
    payload: Annotated[str, typer.Argument(help="The payload, a JSON object.")],
    format: Annotated[str | None, typer.Option(help="The message format (model name).")] = None,
    guild: GuildOpt = None,
    runtime_dir: RuntimeDirOpt = None,
) -> None:
    """Publish a message into a running guild."""
    # Refuse a bad payload before looking for a daemon: nothing is sent.
    try:
        data = json.loads(payload)
    except ValueError as exc:
        _fail(f"PAYLOAD is not valid JSON: {exc}", EXIT_USAGE)
    if not isinstance(data, dict):
        _fail(f"PAYLOAD must be a JSON object; got {type(data).__name__}", EXIT_USAGE)

    _, ref = _find(guild, runtime_dir)
    with ControlClient(ref.socket) as client:
        result = _request(client, "send", topic=topic, payload=data, format=format)
    print(f"sent guild={ref.guild_id} topic={result['topic']} id={result['id']}")


@app.command()
def stop(
    timeout: Annotated[float | None, typer.Option(help="Seconds for the drain.")] = None,
    guild: GuildOpt = None,
    runtime_dir: RuntimeDirOpt = None,
) -> None:
    """Stop a running guild gracefully, wait for the daemon to exit, print its accounting."""
    if timeout is not None and timeout <= 0:
        _fail(f"--timeout must be positive; got {timeout}", EXIT_USAGE)
    runtime, ref = _find(guild, runtime_dir)
    wait = (timeout or STOP_REPLY_DEFAULT_S) + STOP_REPLY_MARGIN_S
    with ControlClient(ref.socket) as client:
        try:
            result = client.request("stop", timeout=wait, shutdown_timeout=timeout)
        except ControlError as exc:
            if exc.code != "closed":
                _fail(f"stop failed: {exc.message} ({exc.code})", EXIT_FAILURE)
            result = {"exit": EXIT_FAILURE, "line": ""}
    if not wait_for_daemon_exit(runtime, ref, EXIT_WAIT_S):
        _warn(f"daemon of guild {ref.guild_id!r} (pid {ref.pid}) has not exited yet")
    print(result.get("line") or f"stopped guild={ref.guild_id} without an accounting line")
    raise typer.Exit(int(result.get("exit", EXIT_FAILURE)))


@app.command()
def reload(
    agents: Annotated[list[str] | None, typer.Argument(help="Ids of the agents to reload.")] = None,
    *,
    all_agents: Annotated[bool, typer.Option("--all", help="Reload every agent.")] = False,
    timeout: Annotated[
        float, typer.Option(help="Seconds an in-flight handler may take to finish.")
    ] = 5.0,
    as_json: Annotated[bool, typer.Option("--json", help="Print the results as JSON.")] = False,
    guild: GuildOpt = None,
    runtime_dir: RuntimeDirOpt = None,
) -> None:
    """Hot-swap agents of a running guild to their current code and guild-file spec."""
    if all_agents == bool(agents):
        _fail("name the agents to reload, or pass --all", EXIT_USAGE)
    _, ref = _find(guild, runtime_dir)
    with ControlClient(ref.socket, timeout=timeout + 30) as client:
        result = _request(
            client, "reload", agents=agents or None, all=all_agents, reload_timeout=timeout
        )
    results = result["results"]
    if as_json:
        print(json.dumps(results))
    else:
        console = make_console()
        console.print(reload_table(console, results))
    failed = [r for r in results if not r["ok"]]
    for r in failed:
        print(
            f"reload failed agent={r['agent_id']} step={r['step']}: {r['error']}", file=sys.stderr
        )
    raise typer.Exit(EXIT_FAILURE if failed else EXIT_OK)


@app.command()
def validate(
    guild_file: Annotated[Path, typer.Argument(help="The guild's YAML file.")],
    app_dir: Annotated[Path | None, typer.Option(help="Import agents from here.")] = None,
) -> None:
    """Check a guild file: the spec, the engines, and every class with its properties."""
    try:
        spec = load_checked_spec(guild_file, app_dir)
    except SpecError as exc:
        _fail(str(exc), EXIT_USAGE, prefix="")
    except UsageError as exc:
        _fail(str(exc), EXIT_USAGE)
    count = len(spec.agents)
    print(f"ok {guild_file}: guild {spec.id} with {count} agent{'' if count == 1 else 's'}")


@app.command()
def init(
    name: Annotated[str, typer.Argument(help="Guild id, and the folder to create.")],
    directory: Annotated[Path, typer.Option("--dir", help="Parent folder.")] = Path("."),
) -> None:
    """Scaffold a guild file and an agent module that `rustic run` can run at once."""
    from rustic.scaffold import scaffold_guild

    try:
        files = scaffold_guild(name, directory)
    except UsageError as exc:
        _fail(str(exc), EXIT_USAGE)
    for path in files:
        print(f"created {path}")
    print(f"run it with: rustic run {files[0]}")


@app.command()
def guilds(
    runtime_dir: RuntimeDirOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the list as JSON.")] = False,
) -> None:
    """List the daemons running under the runtime dir."""
    runtime = _runtime(runtime_dir)
    found = (_guild_row(runtime, guild_id) for guild_id in list_guild_sockets(runtime))
    rows = [row for row in found if row is not None]
    if as_json:
        print(json.dumps(rows))
    elif not rows:
        print(f"no rustic daemon is running in {runtime}")
    else:
        console = make_console()
        console.print(guilds_table(console, rows))


dead_letters_app = typer.Typer(
    no_args_is_help=True, help="List the messages agents gave up on, and deliver them again."
)
app.add_typer(dead_letters_app, name="dead-letters")


@dead_letters_app.command("list")
def dead_letters_list(
    agent: Annotated[str | None, typer.Option(help="Only this agent's dead letters.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print them as JSON.")] = False,
    guild: GuildOpt = None,
    runtime_dir: RuntimeDirOpt = None,
) -> None:
    """List a running guild's dead letters, oldest first."""
    from rustic.daemon.dead_letters import dead_letters_table

    _, ref = _find(guild, runtime_dir)
    with ControlClient(ref.socket) as client:
        letters = _request(client, "dead_letters", agent=agent)["dead_letters"]
    if as_json:
        print(json.dumps(letters))
    elif not letters:
        print(f"no dead letters in guild {ref.guild_id}")
    else:
        console = make_console()
        console.print(dead_letters_table(console, letters))


@dead_letters_app.command("retry")
def dead_letters_retry(
    ids: Annotated[list[int] | None, typer.Argument(help="Ids of the dead letters.")] = None,
    *,
    all_letters: Annotated[bool, typer.Option("--all", help="Retry every dead letter.")] = False,
    guild: GuildOpt = None,
    runtime_dir: RuntimeDirOpt = None,
) -> None:
    """Deliver dead letters again, each to the agent that gave up on it."""
    if all_letters == bool(ids):
        _fail("name the dead letters to retry, or pass --all", EXIT_USAGE)
    _, ref = _find(guild, runtime_dir)
    with ControlClient(ref.socket) as client:
        result = _request(client, "retry_dead_letters", ids=ids or None, all=all_letters)
    for dead in result["retried"]:
        print(f"retried id={dead['id']} agent={dead['agent_id']} message={dead['message']['id']}")
    for dead_id in result["skipped"]:
        print(f"skipped id={dead_id}: no such dead letter, or its agent is not running here")
    raise typer.Exit(EXIT_FAILURE if result["skipped"] else EXIT_OK)


def main() -> None:
    """Entry point of the `rustic` console script."""
    try:
        app()
    except Exception as exc:
        if _debug:
            raise
        print(f"error: {type(exc).__name__}: {exc} (--debug shows more)", file=sys.stderr)
        sys.exit(EXIT_FAILURE)


# -- helpers ----------------------------------------------------------------------------------


def _runtime(explicit: Path | None) -> Path:
    return runtime_dir(explicit)


def _find(guild: str | None, explicit: Path | None) -> tuple[Path, DaemonRef]:
    """The runtime dir and the daemon a client command talks to, or exit saying why not."""
    runtime = _runtime(explicit)
    try:
        return runtime, find_daemon(runtime, guild)
    except NoDaemon as exc:
        _fail(str(exc), EXIT_FAILURE, prefix="")
    except SeveralDaemons as exc:
        _fail(str(exc), EXIT_USAGE, prefix="")
    except ValueError as exc:  # a guild id that cannot name a socket
        _fail(str(exc), EXIT_USAGE)


def _request(client: ControlClient, op: str, **args: Any) -> Any:
    """Send one request; an error reply or a vanished daemon ends the command in one line."""
    try:
        return client.request(op, **args)
    except DaemonNotRunning as exc:
        _fail(str(exc), EXIT_FAILURE)
    except ControlError as exc:
        _fail(f"{op} refused: {exc.message} ({exc.code})", EXIT_FAILURE)


def _watch(
    client: ControlClient, ref: DaemonRef, console: Console, interval: float, as_json: bool
) -> NoReturn:
    """Refresh the status every `interval` seconds until Ctrl-C or the daemon goes away."""
    try:
        if console.is_terminal and not as_json:
            with Live(console=console, auto_refresh=False) as live:
                while True:
                    live.update(status_table(console, client.request("status")), refresh=True)
                    time.sleep(interval)
        while True:
            result = client.request("status")
            if as_json:
                print(json.dumps(result), flush=True)
            else:
                console.print(status_table(console, result), "")
                sys.stdout.flush()
            time.sleep(interval)
    except KeyboardInterrupt:
        raise typer.Exit(EXIT_OK) from None
    except (DaemonNotRunning, ControlError, OSError):
        print(f"guild {ref.guild_id} is no longer running", flush=True)
        raise typer.Exit(EXIT_OK) from None


def _guild_row(runtime: Path, guild_id: str) -> dict[str, Any] | None:
    """One line of `rustic guilds`, or None for a stale socket."""
    ref = probe(runtime, guild_id)
    if ref is None:
        return None
    row: dict[str, Any] = {"guild": guild_id, "pid": ref.pid, "socket": str(ref.socket)}
    try:
        with ControlClient(ref.socket) as client:
            status = client.request("status")
    except (ControlError, DaemonNotRunning, OSError) as exc:
        return {**row, "state": f"not answering ({exc})"}
    totals = status.get("totals", {})
    stopping = status.get("daemon", {}).get("stopping")
    return {
        **row,
        "state": "stopping" if stopping else "running",
        "agents": len(status.get("agents", [])),
        "processed": totals.get("processed", 0),
        "queue_depth": totals.get("queue_depth", 0),
    }


def _fail(message: str, code: int, *, prefix: str = "error: ") -> NoReturn:
    """Print one message to stderr and leave with `code`."""
    print(f"{prefix}{message}", file=sys.stderr)
    raise typer.Exit(code)


def _warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)
