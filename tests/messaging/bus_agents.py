"""Agents and helpers shared by the messaging tests (also imported by daemons' guild files)."""

from __future__ import annotations

import os
import shutil
import threading
import time
from pathlib import Path
from typing import Any, ClassVar

from pydantic import BaseModel

from rustic import Agent, AgentBuilder, AgentSpec, Guild, ProcessContext, processor
from rustic.message import Message, new_id


class Hop(BaseModel):
    """A numbered message travelling down a chain."""

    seq: int
    hops: int = 0


class Burst(BaseModel):
    """Asks a source for ``count`` Hops."""

    count: int


class SourceProps(BaseModel):
    """Where a source sends its Hops."""

    topic: str = "hop-0"


class Source(Agent[SourceProps]):
    """Publishes a burst of Hops, all in the one turn that handles the Burst."""

    @processor(Burst)
    def burst(self, ctx: ProcessContext[Burst]) -> None:
        for seq in range(ctx.payload.count):
            ctx.send(Hop(seq=seq), topic=self.config.topic)


class RelayProps(BaseModel):
    """Where a relay forwards to."""

    next_topic: str


class Relay(Agent[RelayProps]):
    """Forwards each Hop one hop further."""

    @processor(Hop)
    def forward(self, ctx: ProcessContext[Hop]) -> None:
        ctx.send(Hop(seq=ctx.payload.seq, hops=ctx.payload.hops + 1), topic=self.config.next_topic)


class LedgerProps(BaseModel):
    """The file a ledger appends to, and how long it works on each message."""

    path: str
    work_s: float = 0.0


class Ledger(Agent[LedgerProps]):
    """Appends each Hop's seq to a file, one line per handling, in one write.

    A line written is a side effect outside the bus: a message handled twice shows up
    as its seq on two lines.
    """

    @processor(Hop)
    def land(self, ctx: ProcessContext[Hop]) -> None:
        if self.config.work_s:
            deadline = time.perf_counter() + self.config.work_s
            while time.perf_counter() < deadline:
                pass
        fd = os.open(self.config.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            os.write(fd, f"{ctx.payload.seq}\n".encode())
        finally:
            os.close(fd)


class Collect(Agent):  # type: ignore[type-arg]
    """Keeps every message it gets, by agent id."""

    journal: ClassVar[dict[str, list[Message]]] = {}
    lock: ClassVar[threading.Lock] = threading.Lock()

    @processor(dict)
    def keep(self, ctx: ProcessContext[dict[str, Any]]) -> None:
        with self.lock:
            self.journal.setdefault(self.id, []).append(ctx.message)

    @classmethod
    def seen(cls, agent_id: str) -> list[Message]:
        with cls.lock:
            return list(cls.journal.get(agent_id, []))


class Refuse(Agent):  # type: ignore[type-arg]
    """Raises on every Hop until ``accept`` is set, so that each one ends as a dead letter."""

    accept: ClassVar[bool] = False
    handled: ClassVar[list[int]] = []

    @processor(Hop)
    def refuse(self, ctx: ProcessContext[Hop]) -> None:
        if not self.accept:
            raise ValueError(f"hop {ctx.payload.seq} refused")
        self.handled.append(ctx.payload.seq)


class PickyProps(BaseModel):
    """The file whose presence makes a picky agent refuse, and its ledger."""

    refuse_while: str
    ledger: str


class Picky(Agent[PickyProps]):
    """Refuses every Hop while a file exists; after that, writes each seq to its ledger."""

    @processor(Hop)
    def take(self, ctx: ProcessContext[Hop]) -> None:
        if os.path.exists(self.config.refuse_while):
            raise ValueError(f"hop {ctx.payload.seq} refused")
        with open(self.config.ledger, "a", encoding="utf-8") as ledger:
            ledger.write(f"{ctx.payload.seq}\n")


def chain_specs(relays: int, ledger: Path, work_s: float = 0.0) -> list[AgentSpec]:
    """``relays`` relays from hop-0 to hop-N, then a ledger writing to ``ledger``."""
    specs = [
        AgentBuilder(Relay)
        .set_id(f"relay-{n}")
        .set_properties({"next_topic": f"hop-{n + 1}"})
        .add_additional_topic(f"hop-{n}")
        .listen_to_default_topic(False)
        .build_spec()
        for n in range(relays)
    ]
    sink = (
        AgentBuilder(Ledger)
        .set_id("ledger")
        .set_properties({"path": str(ledger), "work_s": work_s})
        .add_additional_topic(f"hop-{relays}")
        .listen_to_default_topic(False)
        .build_spec()
    )
    return [*specs, sink]


# A source, two relays and a ledger, as a guild file for a daemon (see `guild_folder`).
CHAIN_GUILD = """\
id: {guild_id}
name: {name}
messaging: {messaging}
execution: {execution}
agents:
  - {{id: source, name: Source, class_name: bus_agents.Source,
      additional_topics: [burst], listen_to_default_topic: false}}
  - {{id: relay-0, name: Relay 0, class_name: bus_agents.Relay,
      properties: {{next_topic: hop-1}}, additional_topics: [hop-0],
      listen_to_default_topic: false}}
  - {{id: relay-1, name: Relay 1, class_name: bus_agents.Relay,
      properties: {{next_topic: hop-2}}, additional_topics: [hop-1],
      listen_to_default_topic: false}}
  - {{id: ledger, name: Ledger, class_name: bus_agents.Ledger,
      properties: {{path: {ledger}, work_s: {work_s}}}, additional_topics: [hop-2],
      listen_to_default_topic: false}}
"""


def guild_folder(folder: Path, guild_yaml: str) -> Path:
    """Write ``folder/guild.yaml`` beside a copy of this module, which its agents import."""
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copy(__file__, folder / "bus_agents.py")
    guild_file = folder / "guild.yaml"
    guild_file.write_text(guild_yaml)
    return guild_file


def run_relay_chain(guild: Guild, ledger: Path, messages: int = 300) -> None:
    """Launch ``chain_specs(3, ledger)`` in ``guild`` and check every Hop lands once."""
    for spec in chain_specs(3, ledger):
        guild.launch_agent(spec)
    for seq in range(messages):
        guild.publish("hop-0", Hop(seq=seq))
    assert guild.run_until_idle(timeout=30)
    assert sorted(ledger_lines(ledger)) == list(range(messages))


def message(topic: str, payload: dict[str, Any], sender: str = "external") -> Message:
    """A fresh message as a publisher outside the guild would make it."""
    return Message(new_id(), topic, sender, "dict", payload)


def ledger_lines(path: Path) -> list[int]:
    """The seqs a ledger wrote, in order, one per handling."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return []
    return [int(line) for line in text.splitlines() if line]
