"""A guild whose agents run out of process, with a DoneLog in this one; shared by the
multiprocess and Ray tests."""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path
from typing import Any

from engine_harness import wait_until
from remote_agents import Done, DoneLog, Job
from rustic import AgentBuilder, AgentSpec, BaseExecutionEngine, Guild
from rustic import MultithreadedExecutionEngine as Threads


class Remote:
    """A guild on an out-of-process engine; each agent listens on a topic named after it."""

    def __init__(self, engine: BaseExecutionEngine, app_dir: Path | None = None) -> None:
        self.engine = engine
        self.guild = Guild(id="remote", execution_engine=engine, app_dir=app_dir)
        DoneLog.reset()
        log = AgentBuilder(DoneLog).set_id("log").add_additional_topic("done")
        spec = log.listen_to_default_topic(False).build_spec()
        self.guild.launch_agent(spec, execution_engine=Threads(max_workers=1))

    def launch(self, cls: type[Any] | str, agent_id: str, **fields: Any) -> None:
        class_name = cls if isinstance(cls, str) else f"{cls.__module__}.{cls.__qualname__}"
        spec = AgentSpec.model_validate(
            {
                "id": agent_id,
                "name": agent_id,
                "class_name": class_name,
                "additional_topics": [agent_id],
                "listen_to_default_topic": False,
                **fields,
            }
        )
        self.guild.launch_agent(spec)

    def send(self, agent_id: str, *jobs: Job) -> None:
        for job in jobs:
            self.guild.publish(agent_id, job)

    def wait_done(self, agent_id: str, count: int, timeout: float = 20.0) -> list[Done]:
        wait_until(lambda: len(DoneLog.of(agent_id)) >= count, timeout, f"{count} done")
        return DoneLog.of(agent_id)

    def info(self, agent_id: str) -> Any:
        return {a.id: a for a in self.engine.agents()}[agent_id]


class Project:
    """A package of agent code in a temporary folder, importable while the project lives."""

    def __init__(self, root: Path, package: str) -> None:
        self.root = root
        self.package = package
        (root / package).mkdir()
        (root / package / "__init__.py").write_text("")
        sys.path.insert(0, str(root))

    def write(self, module: str, source: str) -> None:
        (self.root / self.package / f"{module}.py").write_text(textwrap.dedent(source))

    def close(self) -> None:
        sys.path.remove(str(self.root))
        for name in [m for m in sys.modules if m.split(".")[0] == self.package]:
            del sys.modules[name]


def gone(pid: int) -> bool:
    """True when no process ``pid`` runs (a zombie left to a non-reaping init counts)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    return stat.rpartition(")")[2].split()[0] == "Z"
