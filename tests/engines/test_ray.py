"""The Ray engine: named actors per agent, per-agent CPUs, crashes, reload and cleanup.

Every Ray test shares the session's local Ray (the ``ray_session`` fixture), and is marked
``ray``; the two that need no cluster are not.
"""

from __future__ import annotations

import os
import shutil
import signal
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from conformance_agents import Worker
from daemon_harness import EXAMPLES, Rustic
from engine_harness import wait_until
from remote_agents import Job, Placed, Reporter
from remote_harness import Project, Remote
from rustic import EngineSpec
from rustic.engines import EngineError, create_engine
from rustic.engines.ray import RayExecutionEngine


@pytest.fixture
def remote(ray_session: None) -> Iterator[Remote]:
    r = Remote(RayExecutionEngine(batch_size=16))
    yield r
    r.guild.stop(timeout=2)


def named_actors() -> set[str]:
    import ray

    return {f"{a['namespace']}/{a['name']}" for a in ray.util.list_named_actors(True)}


@pytest.mark.ray
def test_each_agent_is_a_named_actor_that_runs_its_hooks_and_is_gone_after_shutdown(
    remote: Remote, tmp_path: Path
) -> None:
    # Given two agents, one reserving half a CPU through its own execution spec
    remote.launch(Worker, "w", properties={"marker_dir": str(tmp_path)})
    remote.launch(Placed, "p", execution={"engine": "ray", "num_cpus": 0.5})

    # Then each is a named actor in the guild's namespace, with its CPUs
    assert {"rustic-remote/remote.w", "rustic-remote/remote.p"} <= named_actors()
    remote.send("p", Job(n=1))
    (done,) = remote.wait_done("p", 1)
    assert done.cpus == 0.5
    assert done.pid != os.getpid()
    assert "actor rustic-remote/remote.w pid=" in remote.info("w").where

    # When the guild stops, on_shutdown ran in the actor and no actor is left
    report = remote.guild.stop(timeout=5)
    assert report.clean
    assert int((tmp_path / "w.shutdown").read_text()) not in (0, os.getpid())
    assert not {name for name in named_actors() if name.startswith("rustic-remote/")}


@pytest.mark.ray
def test_a_killed_actor_is_recreated_and_its_lost_batch_replayed(remote: Remote) -> None:
    # Given an agent working through a stream in its actor
    remote.launch(Reporter, "r")
    remote.send("r", *(Job(n=n, delay=0.002) for n in range(200)))
    first_pid = remote.wait_done("r", 30)[0].pid

    # When the actor's process is killed
    os.kill(first_pid, signal.SIGKILL)

    # Then a new actor finishes the stream with nothing lost or repeated
    done = remote.wait_done("r", 200, timeout=40)
    assert [d.n for d in done] == list(range(200))
    assert len({d.pid for d in done}) == 2
    assert "remote.r#2" in remote.info("r").where
    assert remote.info("r").state == "running"


VERSIONED = """
    import os
    from rustic import Agent, ProcessContext, processor
    from remote_agents import Done, Job

    class Versioned(Agent):
        @processor(Job)
        def work(self, ctx: ProcessContext[Job]) -> None:
            done = Done(agent=self.id, n=ctx.payload.n, pid=os.getpid(), version="{version}")
            ctx.send(done, topic="done")
"""


@pytest.mark.ray
def test_reload_moves_the_agent_to_a_new_actor_and_retires_the_old_one(
    ray_session: None, tmp_path: Path
) -> None:
    project = Project(tmp_path, "ray_reload_project")
    project.write("versioned", VERSIONED.format(version="v1"))
    remote = Remote(RayExecutionEngine(), app_dir=tmp_path)
    try:
        # Given version 1 serving
        remote.launch("ray_reload_project.versioned.Versioned", "v")
        remote.send("v", *(Job(n=n) for n in range(10)))
        remote.wait_done("v", 10)

        # When the code changes and the agent is reloaded, with mail queued meanwhile
        project.write("versioned", VERSIONED.format(version="v2"))
        remote.send("v", *(Job(n=n) for n in range(10, 20)))
        remote.guild.reload_agent("v")
        remote.send("v", *(Job(n=n) for n in range(20, 30)))

        # Then a second actor serves v2, nothing was lost, and the first actor is gone
        done = remote.wait_done("v", 30)
        assert [d.n for d in done] == list(range(30))
        assert done[-1].version == "v2"
        actors = {name for name in named_actors() if name.startswith("rustic-remote/")}
        assert actors == {"rustic-remote/remote.v#2"}
    finally:
        remote.guild.stop(timeout=2)
        project.close()


@pytest.mark.ray
def test_the_daemon_runs_a_guild_on_an_existing_cluster_and_leaves_no_actor(
    ray_session: None, rustic: Rustic, tmp_path: Path
) -> None:
    # Given the hello guild's agents, told to run on the Ray already running here
    hello = (EXAMPLES / "hello" / "guild.yaml").read_text()
    hello = hello.replace("id: hello", "id: rayhello")
    guild_file = tmp_path / "guild.yaml"
    # `auto` would pick the newest cluster on this host, which need not be the session's.
    import ray

    address = ray.get_runtime_context().gcs_address
    guild_file.write_text(hello + f'execution: {{engine: ray, address: "{address}"}}\n')
    shutil.copytree(EXAMPLES / "hello" / "agents", tmp_path / "agents")
    daemon = rustic.start(guild_file)

    # When a greeting goes through
    assert rustic.cli("send", "greetings", '{"name": "Ada"}').exit_code == 0
    wait_until(lambda: daemon.status()["totals"]["processed"] == 2, what="the greeting")

    # Then both agents were actors of the guild's namespace, gone once the daemon stopped
    assert {"rustic-rayhello/rayhello.greeter", "rustic-rayhello/rayhello.printer"} <= (
        named_actors()
    )
    assert rustic.cli("stop").exit_code == 0
    assert daemon.wait() == 0, daemon.stderr()
    assert not {name for name in named_actors() if name.startswith("rustic-rayhello/")}


def test_the_engine_is_built_by_name_with_its_knobs() -> None:
    spec = EngineSpec(engine="ray", address="auto", namespace="team", num_cpus=1)
    engine = create_engine(spec)
    assert isinstance(engine, RayExecutionEngine)
    assert (engine.address, engine.namespace, engine.num_cpus) == ("auto", "team", 1)


def test_without_ray_installed_the_engine_names_the_extra_to_install(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)  # makes `import ray` fail
    with pytest.raises(EngineError, match=r"pip install 'rustic\[ray\]'"):
        RayExecutionEngine()
