"""Hot swap of one agent inside a running guild: nothing lost, nothing twice, old code safe."""

from __future__ import annotations

import textwrap
import time

import pytest

from reload_project import Project, Running
from rustic.hotswap import ReloadError
from waiting import wait_until

CONSUMER = """
    from pydantic import BaseModel
    from rustic import Agent, AgentFixtures, ProcessContext, processor


    class Item(BaseModel):
        n: int
        delay: float = 0.0


    class Start(BaseModel):
        count: int
        base: int


    class Props(BaseModel):
        label: str = "x"


    VERSION = "{version}"


    class Producer(Agent):
        @processor(Start)
        def produce(self, ctx: ProcessContext[Start]) -> None:
            for n in range(ctx.payload.base, ctx.payload.base + ctx.payload.count):
                ctx.send(Item(n=n), topic="items")


    class Consumer(Agent[Props]):
        @processor(Item)
        def consume(self, ctx: ProcessContext[Item], store) -> None:
            if ctx.payload.delay:
                import time
                time.sleep(ctx.payload.delay)
            store.incr(f"n{{ctx.payload.n}}")
            store.set(f"v{{ctx.payload.n}}", VERSION + self.config.label)
            ctx.state.update({{"count": ctx.state.get().get("count", 0) + 1}})
"""


def launch_pair(project: Project, running: Running, version: str = "v0") -> None:
    project.write("agents", CONSUMER.format(version=version))
    running.guild.launch_agent(
        project.spec("producer", "agents.Producer", additional_topics=["start"])
    )
    running.guild.launch_agent(
        project.spec("consumer", "agents.Consumer", additional_topics=["items"])
    )


def test_every_message_is_handled_exactly_once_across_many_swaps(
    project: Project, running: Running
) -> None:
    # Given a producer streaming items to a consumer
    launch_pair(project, running)

    # When the consumer is reloaded ten times while 5,000 items stream, new code each time
    reports = []
    for version in range(1, 11):
        for batch in range(2):
            base = ((version - 1) * 2 + batch) * 250
            running.guild.publish("start", {"count": 250, "base": base}, format="Start")
        project.write("agents", CONSUMER.format(version=f"v{version}"))
        reports.append(running.guild.reload_agent("consumer"))

    # Then every item was handled exactly once, by several versions
    store = running.store()
    wait_until(lambda: running.guild.wrapper("consumer").processed == 5000, timeout=30)
    counts = [store.get(f"n{n}") for n in range(5000)]
    assert counts == [1] * 5000
    assert running.guild.wrapper("consumer").state.get()["count"] == 5000
    assert len({store.get(f"v{n}") for n in range(5000)}) >= 3
    assert len({r.new_version for r in reports}) == 10
    assert all(r.pause_ms < 1000 for r in reports)


def test_a_reload_waits_for_the_in_flight_handler(project: Project, running: Running) -> None:
    launch_pair(project, running)
    running.guild.publish("items", {"n": 1, "delay": 0.3}, format="Item")
    wait_until(lambda: running.guild.wrapper("consumer").in_flight is not None)

    project.write("agents", CONSUMER.format(version="v1"))
    report = running.guild.reload_agent("consumer")

    assert running.store().get("v1") == "v0x"  # the in-flight one finished on the old code
    assert report.new_version != report.old_version


def test_a_stuck_handler_makes_the_reload_fail_instead_of_hanging(
    project: Project, running: Running
) -> None:
    # Given a consumer busy with a long message and another queued
    launch_pair(project, running)
    running.guild.publish("items", {"n": 1, "delay": 1.5}, format="Item")
    wait_until(lambda: running.guild.wrapper("consumer").in_flight is not None)
    running.guild.publish("items", {"n": 2}, format="Item")

    # When a reload allows it only 0.2 s to quiesce
    project.write("agents", CONSUMER.format(version="v1"))
    started = time.monotonic()
    with pytest.raises(ReloadError) as caught:
        running.guild.reload_agent("consumer", timeout=0.2)

    # Then it fails at quiesce, promptly, and the old version handles both messages
    assert time.monotonic() - started < 1.5
    assert caught.value.step == "quiesce"
    wait_until(lambda: running.store().get("n2") == 1)
    assert running.store().get("v2") == "v0x"
    assert running.guild.wrapper("consumer").last_reload["ok"] is False  # type: ignore[index]


@pytest.mark.parametrize(
    ("broken", "step", "reason"),
    [
        ("def oops(:\n", "import", "syntax error"),
        ("raise RuntimeError('boom at import')\n", "import", "boom at import"),
    ],
)
def test_broken_code_leaves_the_old_version_serving(
    project: Project, running: Running, broken: str, step: str, reason: str
) -> None:
    # Given a running consumer
    launch_pair(project, running)
    old_version = running.guild.wrapper("consumer").version

    # When its module is saved broken and a reload is asked for
    project.write("agents", textwrap.dedent(CONSUMER.format(version="v1")) + broken)
    with pytest.raises(ReloadError) as caught:
        running.guild.reload_agent("consumer")

    # Then the error names the step and the problem, and the old code keeps serving
    assert caught.value.step == step
    assert reason in str(caught.value)
    running.guild.publish("items", {"n": 7}, format="Item")
    wait_until(lambda: running.store().get("n7") == 1)
    assert running.store().get("v7") == "v0x"
    assert running.guild.wrapper("consumer").version == old_version

    # And the next good save recovers
    project.write("agents", CONSUMER.format(version="v2"))
    running.guild.reload_agent("consumer")
    running.guild.publish("items", {"n": 8}, format="Item")
    wait_until(lambda: running.store().get("n8") == 1)
    assert running.store().get("v8") == "v2x"


def test_properties_that_fail_validation_leave_the_old_version_serving(
    project: Project, running: Running
) -> None:
    launch_pair(project, running)
    bad = project.spec("consumer", "agents.Consumer", properties={"label": ["not", "a", "str"]})
    with pytest.raises(ReloadError) as caught:
        running.guild.reload_agent("consumer", new_spec=bad)
    assert caught.value.step == "build"
    assert "label" in str(caught.value)
    running.guild.publish("items", {"n": 3}, format="Item")
    wait_until(lambda: running.store().get("n3") == 1)


def test_a_new_spec_changes_properties_and_topics(project: Project, running: Running) -> None:
    # Given a consumer on "items"
    launch_pair(project, running)

    # When it is reloaded with a new label and on "other" instead
    new = project.spec(
        "consumer", "agents.Consumer", properties={"label": "y"}, additional_topics=["other"]
    )
    report = running.guild.reload_agent("consumer", new_spec=new)

    # Then it hears "other", no longer "items", and uses the new properties
    assert report.topics_added == ["other"]
    assert report.topics_removed == ["items"]
    running.guild.publish("items", {"n": 1}, format="Item")
    running.guild.publish("other", {"n": 2}, format="Item")
    wait_until(lambda: running.store().get("n2") == 1)
    assert running.store().get("v2") == "v0y"
    assert running.store().get("n1") is None


RESOURCEFUL = """
    from pydantic import BaseModel
    from rustic import Agent, AgentFixtures, ProcessContext, processor


    class Item(BaseModel):
        n: int


    class Keeper(Agent):
        def __init__(self) -> None:
            self.resource = None

        @AgentFixtures.on_startup
        def open(self) -> None:
            self.resource = open({path!r}, "a")

        @processor(Item)
        def keep(self, ctx: ProcessContext[Item]) -> None:
            self.resource.write("{version}:%d\\n" % ctx.payload.n)
            self.resource.flush()
            ctx.state.update({{"count": ctx.state.get().get("count", 0) + 1}})

        @AgentFixtures.on_reload
        def take_over(self, previous) -> None:
            {on_reload}
"""


def test_state_and_an_open_resource_survive_and_on_reload_migrates_state(
    project: Project, running: Running
) -> None:
    # Given a keeper that holds an open file and counts in its state
    log = project.root / "keeper.log"
    source = RESOURCEFUL.format(path=str(log), version="v1", on_reload="pass")
    project.write("keeper", source)
    running.guild.launch_agent(project.spec("keeper", "keeper.Keeper", additional_topics=["k"]))
    handle = running.guild.wrapper("keeper").state
    for n in range(3):
        running.guild.publish("k", {"n": n}, format="Item")
    wait_until(lambda: handle.get().get("count") == 3)

    # When v2 takes the file over and migrates "count" to "total"
    migrate = (
        "self.resource = previous.resource; "
        "self.state.update({'total': self.state.get()['count'], 'count': None})"
    )
    project.write("keeper", RESOURCEFUL.format(path=str(log), version="v2", on_reload=migrate))
    running.guild.reload_agent("keeper")
    running.guild.publish("k", {"n": 3}, format="Item")
    wait_until(lambda: handle.get().get("count") == 1)

    # Then the same state handle carries the migrated field, and the same file got v2's line
    assert running.guild.wrapper("keeper").state is handle
    assert handle.get() == {"total": 3, "count": 1}
    assert log.read_text().splitlines() == ["v1:0", "v1:1", "v1:2", "v2:3"]


def test_a_raising_on_reload_puts_the_old_instance_back(project: Project, running: Running) -> None:
    log = project.root / "keeper.log"
    project.write("keeper", RESOURCEFUL.format(path=str(log), version="v1", on_reload="pass"))
    running.guild.launch_agent(project.spec("keeper", "keeper.Keeper", additional_topics=["k"]))
    old = running.guild.wrapper("keeper").agent

    bad = "raise RuntimeError('cannot take over')"
    project.write("keeper", RESOURCEFUL.format(path=str(log), version="v2", on_reload=bad))
    with pytest.raises(ReloadError) as caught:
        running.guild.reload_agent("keeper")

    assert caught.value.step == "on_reload"
    assert running.guild.wrapper("keeper").agent is old
    running.guild.publish("k", {"n": 9}, format="Item")
    wait_until(lambda: "v1:9" in log.read_text())


HELPER = """
    def greet(name: str) -> str:
        return "{word} " + name
"""

GREETER = """
    from pydantic import BaseModel
    from rustic import Agent, ProcessContext, processor
    from {package} import helpers


    class Name(BaseModel):
        name: str


    class Greeter(Agent):
        @processor(Name)
        def greet(self, ctx: ProcessContext[Name], store) -> None:
            store.set(self.id + ":" + ctx.payload.name, helpers.greet(ctx.payload.name))
"""

LONER = """
    from rustic import Agent, ProcessContext, processor


    class Loner(Agent):
        @processor(dict)
        def ignore(self, ctx: ProcessContext[dict]) -> None:
            pass
"""


def test_a_helper_module_change_reaches_the_agent_that_imports_it(
    project: Project, running: Running
) -> None:
    # Given a greeter that uses helpers.greet, and an unrelated agent
    project.write("helpers", HELPER.format(word="hello"))
    project.write("greeter", GREETER.format(package=project.package))
    project.write("loner", LONER)
    running.guild.launch_agent(project.spec("greeter", "greeter.Greeter", additional_topics=["g"]))
    running.guild.launch_agent(project.spec("loner", "loner.Loner"))
    loner_class = type(running.guild.wrapper("loner").agent)

    # When only the helper changes and the greeter is reloaded
    project.write("helpers", HELPER.format(word="howdy"))
    running.guild.reload_agent("greeter")
    running.guild.publish("g", {"name": "Ada"}, format="Name")

    # Then the greeter uses the new helper; the loner was not touched
    wait_until(lambda: running.store().get("greeter:Ada") is not None)
    assert running.store().get("greeter:Ada") == "howdy Ada"
    assert type(running.guild.wrapper("loner").agent) is loner_class


def test_reloading_an_unknown_agent_names_the_running_ones(
    project: Project, running: Running
) -> None:
    launch_pair(project, running)
    with pytest.raises(KeyError, match="consumer"):
        running.guild.reload_agent("nobody")


def test_a_constructor_that_raises_fails_the_build_and_the_old_version_serves(
    project: Project, running: Running
) -> None:
    launch_pair(project, running)
    raising = CONSUMER.format(version="v1") + (
        "\n    def _refuse(self) -> None:\n"
        "        raise RuntimeError('constructor refuses')\n\n\n"
        "    Consumer.__init__ = _refuse\n"
    )
    project.write("agents", raising)

    with pytest.raises(ReloadError) as caught:
        running.guild.reload_agent("consumer")

    assert caught.value.step == "build"
    assert "constructor refuses" in caught.value.reason
    running.guild.publish("items", {"n": 4}, format="Item")
    wait_until(lambda: running.store().get("n4") == 1)
    assert running.store().get("v4") == "v0x"
