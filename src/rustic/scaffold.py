"""`rustic init NAME`: a guild file and an agent module that `rustic run` can run at once."""

from __future__ import annotations

import re
from pathlib import Path

from rustic.daemon.options import UsageError

GUILD_ID = re.compile(r"^[a-z0-9][a-z0-9_-]*$")

_GUILD_YAML = """\
# The {name} guild. Run it, then talk to it from a second terminal:
#   rustic run {name}/guild.yaml
#   rustic send requests '{{"text": "hello"}}'
#   rustic status
#   rustic stop
id: {name}
name: {title}
description: An echo agent that prints what it receives
execution:
  engine: sync                # or multithreaded; `rustic run --engine` overrides it
messaging: memory
state: memory
shutdown_timeout: 10
agents:
  - id: echo
    name: Echo
    description: Prints every request and counts them in its state
    class_name: agents.echo.Echo
    properties:
      prefix: "echo: "
    additional_topics: [requests]
"""

_INIT = '''\
"""The agents of the {name} guild."""
'''

_ECHO = '''\
"""`Echo`: prints every message it receives and counts them in its state."""

from __future__ import annotations

import json
import logging
from typing import Any

from pydantic import BaseModel

from rustic import Agent, AgentFixtures, ProcessContext, processor

logger = logging.getLogger(__name__)


class EchoProps(BaseModel):
    """What the guild file may set under `properties`."""

    prefix: str = "echo: "


class Echo(Agent[EchoProps]):
    """Prints each payload after `prefix` and keeps a count of them."""

    @processor(dict)
    def echo(self, ctx: ProcessContext[dict[str, Any]]) -> None:
        """Print the payload and count it."""
        print(f"{self.config.prefix}{json.dumps(ctx.payload)}", flush=True)
        seen = ctx.state.get().get("echoed", 0) + 1
        ctx.state.update({"echoed": seen})

    @AgentFixtures.on_shutdown
    def goodbye(self) -> None:
        """Say how many messages were echoed."""
        logger.info("echo stopping echoed=%d", self.state.get().get("echoed", 0))
'''


def scaffold_guild(name: str, parent: Path) -> list[Path]:
    """Write `<parent>/<name>/` with a guild file and an `agents` package; return the files.

    Raises `UsageError` when `name` is not a valid guild id or the folder is not empty.
    """
    if not GUILD_ID.match(name):
        raise UsageError(
            f"NAME must be a guild id: lowercase letters, digits, '-' and '_', starting with "
            f"a letter or digit; got {name!r}"
        )
    root = parent / name
    if root.exists() and any(root.iterdir()):
        raise UsageError(f"{root} exists and is not empty; choose another NAME or remove it")

    files = {
        root / "guild.yaml": _GUILD_YAML.format(name=name, title=name.replace("-", " ").title()),
        root / "agents" / "__init__.py": _INIT.format(name=name),
        root / "agents" / "echo.py": _ECHO,
    }
    for path, text in files.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    return list(files)
