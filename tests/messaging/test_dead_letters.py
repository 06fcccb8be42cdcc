"""Dead letters: kept by every bus, listed, and delivered again to the agent that gave up."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from bus_agents import Hop, Refuse, guild_folder, ledger_lines
from daemon_harness import Rustic, wait_until
from rustic import AgentBuilder, AgentSpec, Guild
from rustic.deadletters import list_dead_letters, retry_dead_letters


@pytest.fixture(autouse=True)
def _refusing() -> Iterator[None]:
    Refuse.accept = False
    Refuse.handled.clear()
    yield
    Refuse.accept = False


def refuser(agent_id: str = "refuser") -> AgentSpec:
    builder = AgentBuilder(Refuse).set_id(agent_id).add_additional_topic("hops")
    spec = builder.build_spec()
    return spec.model_copy(update={"max_retries": 0})


@pytest.fixture(params=["memory", "sqlite"])
def messaging(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    return "memory" if request.param == "memory" else f"sqlite:///{tmp_path}/bus.db"


def test_a_message_an_agent_gave_up_on_is_listed_with_its_reason(messaging: str) -> None:
    # Given an agent that refuses every Hop
    with Guild(id="dl", messaging=messaging) as guild:
        guild.launch_agent(refuser())
        guild.launch_agent(refuser("other"))

        # When two Hops are published and handled
        sent = [guild.publish("hops", Hop(seq=n)) for n in range(2)]
        assert guild.run_until_idle(timeout=10)

        # Then each agent's two are dead letters, with ids, reasons and the messages
        letters = list_dead_letters(guild.bus, agent_id="refuser")
        assert [dead.message.id for dead in letters] == [m.id for m in sent]
        assert all(dead.reason.startswith("ValueError: hop") for dead in letters)
        assert len({dead.id for dead in list_dead_letters(guild.bus)}) == 4


def test_a_retried_dead_letter_is_handled_again_by_its_agent_only(messaging: str) -> None:
    # Given two dead letters of the refuser, and an agent that now accepts
    with Guild(id="dl", messaging=messaging) as guild:
        guild.launch_agent(refuser())
        guild.publish("hops", Hop(seq=7))
        guild.publish("hops", Hop(seq=8))
        assert guild.run_until_idle(timeout=10)
        first, second = list_dead_letters(guild.bus)
        Refuse.accept = True

        # When one is retried, with an id that names none
        result = retry_dead_letters(guild.bus, [first.id, 999])
        assert guild.run_until_idle(timeout=10)

        # Then it is handled, once, and the other stays a dead letter
        assert [dead.id for dead in result.retried] == [first.id]
        assert result.skipped == [999]
        assert Refuse.handled == [7]
        assert list_dead_letters(guild.bus) == [second]


def test_retrying_without_ids_retries_every_dead_letter(messaging: str) -> None:
    with Guild(id="dl", messaging=messaging) as guild:
        guild.launch_agent(refuser())
        for n in range(3):
            guild.publish("hops", Hop(seq=n))
        assert guild.run_until_idle(timeout=10)
        Refuse.accept = True

        result = retry_dead_letters(guild.bus)
        assert guild.run_until_idle(timeout=10)

        assert len(result.retried) == 3
        assert sorted(Refuse.handled) == [0, 1, 2]
        assert list_dead_letters(guild.bus) == []


def test_dead_letters_on_sqlite_survive_a_restart_and_are_retried_after_it(
    tmp_path: Path,
) -> None:
    # Given a dead letter in a guild on sqlite that then stopped
    url = f"sqlite:///{tmp_path}/bus.db"
    with Guild(id="dl", messaging=url) as guild:
        guild.launch_agent(refuser())
        sent = guild.publish("hops", Hop(seq=3))
        assert guild.run_until_idle(timeout=10)

    # When the guild starts again and the dead letter is retried
    Refuse.accept = True
    with Guild(id="dl", messaging=url) as guild:
        guild.launch_agent(refuser())
        [dead] = list_dead_letters(guild.bus)
        retry_dead_letters(guild.bus, [dead.id])
        assert guild.run_until_idle(timeout=10)

        # Then the agent handles the very message that failed
        assert dead.message.id == sent.id
        assert Refuse.handled == [3]


PICKY_GUILD = """\
id: picky
name: Picky guild
messaging: {messaging}
agents:
  - {{id: picky, name: Picky, class_name: bus_agents.Picky, max_retries: 0,
      properties: {{refuse_while: {marker}, ledger: {ledger}}},
      additional_topics: [hops], listen_to_default_topic: false}}
"""


@pytest.mark.parametrize("backend", ["memory", "sqlite"])
def test_the_cli_lists_and_retries_dead_letters_of_a_running_daemon(
    rustic: Rustic, tmp_path: Path, backend: str
) -> None:
    # Given a daemon whose agent refuses Hops while a marker file exists
    marker, ledger = tmp_path / "refuse", tmp_path / "ledger.txt"
    marker.touch()
    messaging = "memory" if backend == "memory" else "sqlite:///bus.db"
    folder = tmp_path / "guild"
    text = PICKY_GUILD.format(messaging=messaging, marker=marker, ledger=ledger)
    guild_file = guild_folder(folder, text)
    rustic.start(guild_file)
    for seq in (1, 2):
        assert rustic.cli("send", "hops", f'{{"seq": {seq}}}', "--format", "Hop").exit_code == 0

    # When its dead letters are listed
    letters = wait_until(
        lambda: len(found := rustic.cli("dead-letters", "list", "--json").json()) == 2 and found,
        what="two dead letters",
    )
    table = rustic.cli("dead-letters", "list").stdout

    # Then each shows its agent, message and reason
    assert [dead["message"]["payload"]["seq"] for dead in letters] == [1, 2]
    assert all(dead["agent_id"] == "picky" for dead in letters)
    assert "ValueError: hop 1 refused" in table

    # And when the agent would accept them and one is retried by id, then the rest with --all
    marker.unlink()
    first = rustic.cli("dead-letters", "retry", str(letters[0]["id"]))
    assert first.exit_code == 0, first.stderr
    assert f"retried id={letters[0]['id']} agent=picky" in first.stdout
    wait_until(lambda: ledger_lines(ledger) == [1], what="the first retried message handled")
    assert rustic.cli("dead-letters", "retry", "--all").exit_code == 0

    # Then each is handled once and none is left
    wait_until(lambda: ledger_lines(ledger) == [1, 2], what="both retried messages handled")
    assert rustic.cli("dead-letters", "list", "--json").json() == []
    unknown = rustic.cli("dead-letters", "retry", "999")
    assert unknown.exit_code == 1
    assert "skipped id=999" in unknown.stdout
