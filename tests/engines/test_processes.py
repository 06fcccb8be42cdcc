"""The multiprocess engine: agents in spawned children, crashes, restarts, reload, cleanup."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from daemon_harness import EXAMPLES, Rustic
from engine_harness import wait_until
from remote_agents import DoneLog, Job, Reporter, Tally
from remote_harness import Project, Remote, gone
from rustic import Agent, AgentBuilder, DependencySpec, EngineSpec, ProcessContext, processor
from rustic.engines import create_engine
from rustic.engines.processes import MultiprocessExecutionEngine
from rustic.engines.remote import HostError

HERE = Path(__file__).parent


@pytest.fixture
def remote() -> Iterator[Remote]:
    r = Remote(MultiprocessExecutionEngine(max_workers=1, batch_size=16))
    yield r
    r.guild.stop(timeout=2)


def test_agents_run_in_child_processes_and_their_messages_come_back_through_the_guild(
    remote: Remote,
) -> None:
    remote.launch(Reporter, "r")
    remote.send("r", *(Job(n=n) for n in range(100)))
    done = remote.wait_done("r", 100)
    assert [d.n for d in done] == list(range(100))
    assert {d.pid for d in done} == set(remote.engine.pids().values())
    assert os.getpid() not in {d.pid for d in done}
    assert f"pid={done[0].pid}" in remote.info("r").where


def test_a_child_killed_mid_stream_is_restarted_and_no_message_is_lost_or_repeated(
    remote: Remote,
) -> None:
    # Given an agent working through 300 jobs in a child
    remote.launch(Reporter, "r")
    remote.send("r", *(Job(n=n, delay=0.002) for n in range(300)))
    first_pid = remote.wait_done("r", 40)[0].pid

    # When its child is killed with SIGKILL
    os.kill(first_pid, signal.SIGKILL)

    # Then a new child finishes the stream: every job reported once, in order
    done = remote.wait_done("r", 300)
    assert [d.n for d in done] == list(range(300))
    assert len({d.pid for d in done}) == 2
    assert first_pid not in remote.engine.pids().values()
    wait_until(lambda: remote.guild.wrapper("r").processed == 300, what="300 processed")
    info = remote.info("r")
    assert (info.state, info.dead_letters, info.queue_depth) == ("running", 0, 0)


def test_a_message_that_keeps_killing_its_child_is_dead_lettered_after_three_crashes(
    remote: Remote,
) -> None:
    # Given an agent and a poison job between two good ones
    remote.launch(Reporter, "r")

    # When the poison job kills the child each time it is handled
    remote.send("r", Job(n=0), Job(n=1, kill=True), Job(n=2))

    # Then it is dead-lettered after three crashes and the others are handled once each
    assert [d.n for d in remote.wait_done("r", 2)] == [0, 2]
    wait_until(lambda: len(remote.guild.bus.dead_letters()) == 1, what="a dead letter")
    (dead,) = remote.guild.bus.dead_letters()
    assert dead.message.payload["n"] == 1
    assert "died 3 times" in dead.reason
    wait_until(lambda: remote.guild.wrapper("r").processed == 3, what="3 processed")
    assert remote.info("r").state == "running"
    assert remote.engine.wait_idle(5)


def test_an_agent_whose_child_keeps_dying_is_marked_failed_and_its_neighbours_carry_on() -> None:
    r = Remote(MultiprocessExecutionEngine(max_workers=1, max_crashes=2, max_restarts=3))
    try:
        # Given two agents sharing a child, one of which kills it on every job
        r.launch(Reporter, "doomed")
        r.launch(Reporter, "fine")

        # When the doomed agent gets three deadly jobs
        r.send("doomed", Job(n=1, kill=True), Job(n=2, kill=True), Job(n=3, kill=True))

        # Then after three deaths in a row it is failed, its jobs dead-lettered...
        wait_until(lambda: r.info("doomed").state == "failed", what="doomed failed")
        wait_until(lambda: len(r.guild.bus.dead_letters()) == 3, what="three dead letters")
        reasons = [d.reason for d in r.guild.bus.dead_letters()]
        assert "the agent failed" in reasons[-1]

        # ...its new mail queues, and the other agent of the child keeps working
        r.send("doomed", Job(n=4))
        r.send("fine", Job(n=5))
        assert [d.n for d in r.wait_done("fine", 1)] == [5]
        assert r.info("doomed").queue_depth == 1
        assert DoneLog.of("doomed") == []
        assert r.engine.wait_idle(5)  # a failed agent's queued mail is not work in progress
    finally:
        r.guild.stop(timeout=2)


def test_state_and_dependencies_live_in_the_child_and_state_survives_a_restart(
    remote: Remote,
) -> None:
    # Given an agent that counts in its state and in an agent-scoped store
    store = {"store": DependencySpec(class_name="rustic.deps.KeyValueStore")}
    remote.launch(Tally, "t", dependency_map=store)
    remote.send("t", *(Job(n=n) for n in range(10)))

    # Then its state updates, on_startup's included, land in the guild's store
    assert [d.count for d in remote.wait_done("t", 10)] == list(range(1, 11))
    state = remote.guild.wrapper("t").state
    wait_until(lambda: state.get().get("count") == 10, what="count 10")
    first_pid = state.get()["pid"]
    assert state.get() == {"starts": 1, "pid": first_pid, "count": 10, "last": 9}
    # the store was built in the child only
    assert "t" not in remote.guild.dependencies.agent_scoped

    # When the child dies and the agent is rebuilt, its state carries on from the guild's copy
    os.kill(first_pid, signal.SIGKILL)
    wait_until(lambda: state.get().get("starts") == 2, what="a second start")
    remote.send("t", Job(n=10))
    assert remote.wait_done("t", 11)[-1].count == 1  # a fresh store in the new child
    wait_until(lambda: state.get().get("count") == 11, what="count 11")
    assert state.get()["pid"] != first_pid


def test_shutdown_leaves_no_child_behind_even_with_a_stuck_handler() -> None:
    r = Remote(MultiprocessExecutionEngine(max_workers=2))
    r.launch(Reporter, "stuck")
    r.launch(Reporter, "idle")
    pids = list(r.engine.pids().values())
    assert len(pids) == 2

    # Given a handler that will not return for a minute
    r.send("stuck", Job(n=1, delay=60))
    wait_until(lambda: r.guild.wrapper("stuck").in_flight is not None, what="in flight")

    # When the guild stops with a short timeout
    report = r.guild.stop(timeout=0.5)

    # Then the stuck agent is named, its job counted pending, and no child is left
    assert "stuck" in report.stuck_agents
    assert report.pending == 1
    assert report.not_joined == []
    assert all(gone(pid) for pid in pids)
    assert r.engine.pids() == {}


def test_children_exit_when_the_guild_process_is_killed(tmp_path: Path) -> None:
    # Given a guild process with a multiprocess agent, printing its child's pid
    script = tmp_path / "guild_process.py"
    script.write_text(
        textwrap.dedent(
            f"""
            import sys, threading
            sys.path.insert(0, {str(HERE)!r})
            from rustic import AgentBuilder, Guild
            from rustic.engines.processes import MultiprocessExecutionEngine
            from remote_agents import Reporter

            if __name__ == "__main__":
                engine = MultiprocessExecutionEngine(max_workers=1)
                guild = Guild(id="orphans", execution_engine=engine)
                guild.launch_agent(AgentBuilder(Reporter).set_id("r").build_spec())
                print(*engine.pids().values(), flush=True)
                threading.Event().wait()
            """
        )
    )
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        child = int(proc.stdout.readline())
        assert not gone(child)

        # When the guild process dies without a chance to clean up
        proc.kill()
        proc.wait(10)

        # Then its child notices and exits
        wait_until(lambda: gone(child), what="the orphaned child to exit")
    finally:
        proc.kill()
        proc.wait(10)


def test_an_agent_class_a_child_cannot_import_is_refused_at_launch(remote: Remote) -> None:
    class Local(Agent):  # type: ignore[type-arg]
        @processor(dict)
        def work(self, ctx: ProcessContext[dict[str, Any]]) -> None:
            pass

    spec = AgentBuilder(Local).set_id("local").build_spec()
    with pytest.raises(HostError, match="importable module"):
        remote.guild.launch_agent(spec)
    assert "local" not in remote.guild.agent_ids()
    remote.launch(Reporter, "r")  # the engine is unharmed
    remote.send("r", Job(n=1))
    assert [d.n for d in remote.wait_done("r", 1)] == [1]


VERSIONED = """
    import os
    from rustic import Agent, AgentFixtures, ProcessContext, processor
    from remote_agents import Done, Job

    VERSION = "{version}"


    class Versioned(Agent):
        @processor(Job)
        def work(self, ctx: ProcessContext[Job]) -> None:
            if ctx.payload.delay:
                import time
                time.sleep(ctx.payload.delay)
            done = Done(agent=self.id, n=ctx.payload.n, pid=os.getpid(), version=VERSION)
            ctx.send(done, topic="done")

        @AgentFixtures.on_reload
        def adopt(self, previous) -> None:
            self.state.update({{"reloaded_from": repr(previous), "into": VERSION}})
"""


def test_reload_starts_the_new_version_in_a_fresh_child_without_losing_queued_mail(
    tmp_path: Path,
) -> None:
    project = Project(tmp_path, "mp_reload_project")
    project.write("versioned", VERSIONED.format(version="v1"))
    r = Remote(MultiprocessExecutionEngine(max_workers=1, batch_size=4), app_dir=tmp_path)
    try:
        # Given version 1 at work, with slow jobs still queued
        r.launch("mp_reload_project.versioned.Versioned", "v")
        r.send("v", *(Job(n=n) for n in range(20)))
        old_pid = r.wait_done("v", 20)[0].pid
        r.send("v", *(Job(n=n, delay=0.01) for n in range(20, 60)))

        # When the code changes and the agent is reloaded mid-stream
        project.write("versioned", VERSIONED.format(version="v2"))
        report = r.guild.reload_agent("v")
        r.send("v", *(Job(n=n) for n in range(60, 80)))

        # Then every job is handled once, in order, by v1 then v2, in a new child
        done = r.wait_done("v", 80)
        assert [d.n for d in done] == list(range(80))
        versions = [d.version for d in done]
        assert versions == sorted(versions)
        assert versions[-1] == "v2"
        assert {d.pid for d in done if d.version == "v2"} - {old_pid}
        assert report.new_version != report.old_version
        assert r.guild.wrapper("v").state.get() == {"reloaded_from": "None", "into": "v2"}
        assert old_pid in r.engine.pids().values()  # the pool child stays for new agents
    finally:
        r.guild.stop(timeout=2)
        project.close()


def test_the_hello_guild_runs_end_to_end_under_the_daemon(rustic: Rustic) -> None:
    # Given the example hello guild run by the daemon on the multiprocess engine
    daemon = rustic.start(EXAMPLES / "hello" / "guild.yaml", "--engine", "multiprocess")

    # When a greeting goes through
    assert rustic.cli("send", "greetings", '{"name": "Ada"}').exit_code == 0
    wait_until(lambda: daemon.status()["totals"]["processed"] == 2, what="the greeting")

    # Then both agents ran in children, the printer printed, and stop leaves no child behind
    where = [agent["where"] for agent in daemon.status()["agents"]]
    pids = {int(w.rpartition("pid=")[2]) for w in where}
    assert daemon.proc.pid not in pids
    assert rustic.cli("stop").exit_code == 0
    assert daemon.wait() == 0, daemon.stderr()
    assert "Hello, Ada!" in daemon.stdout()
    assert all(gone(pid) for pid in pids)


def test_the_engine_is_built_by_name_with_its_knobs() -> None:
    spec = EngineSpec(engine="multiprocess", max_workers=3, options={"batch_size": 8})
    engine = create_engine(spec)
    assert isinstance(engine, MultiprocessExecutionEngine)
    assert (engine.max_workers, engine.batch_size) == (3, 8)
    assert MultiprocessExecutionEngine().max_workers == (os.cpu_count() or 1)
    with pytest.raises(ValueError, match="max_crashes"):
        MultiprocessExecutionEngine(max_crashes=0)
