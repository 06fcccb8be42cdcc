"""A throwaway project folder of agent modules, and a guild that runs them."""

from __future__ import annotations

import sys
import textwrap
import threading
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rustic import (
    AgentSpec,
    BaseExecutionEngine,
    DependencySpec,
    Guild,
    MultithreadedExecutionEngine,
    SyncExecutionEngine,
)


class Project:
    """A package of agent modules under a temporary app dir, importable under a unique name."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.package = f"proj_{uuid.uuid4().hex[:8]}"
        (root / self.package).mkdir()
        (root / self.package / "__init__.py").write_text("")
        sys.path.insert(0, str(root))

    def write(self, module: str, source: str) -> Path:
        path = self.root / self.package / f"{module}.py"
        path.write_text(textwrap.dedent(source))
        return path

    def spec(self, agent_id: str, cls: str, **fields: Any) -> AgentSpec:
        return AgentSpec.model_validate(
            {"id": agent_id, "name": agent_id, "class_name": f"{self.package}.{cls}", **fields}
        )

    def close(self) -> None:
        sys.path.remove(str(self.root))
        for name in [m for m in sys.modules if m.split(".")[0] == self.package]:
            del sys.modules[name]


class Running:
    """A guild on one engine; the sync engine gets a driver thread, like the daemon's loop."""

    def __init__(self, project: Project, engine: BaseExecutionEngine) -> None:
        self.guild = Guild(
            id="reload",
            execution_engine=engine,
            app_dir=project.root,
            dependency_map={"store": DependencySpec(class_name="rustic.deps.KeyValueStore")},
        )
        self._stop = threading.Event()
        self._driver: threading.Thread | None = None
        if isinstance(engine, SyncExecutionEngine):
            self._driver = threading.Thread(target=engine.serve, args=(self._stop,), daemon=True)
            self._driver.start()

    def store(self) -> Any:
        return self.guild.dependencies.guild_scoped["store"]

    def stop(self) -> Any:
        self._stop.set()
        if self._driver is not None:
            self._driver.join(5)
        return self.guild.stop(timeout=5)


ENGINES: dict[str, Callable[[], BaseExecutionEngine]] = {
    "sync": SyncExecutionEngine,
    "multithreaded": lambda: MultithreadedExecutionEngine(max_workers=4),
}
