"""Tests of guild YAML files: loading, issues located at a line and key, and class checks."""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import pytest

from rustic.imports import import_object
from rustic.spec import AgentSpec, EngineSpec, GuildSpec, SpecError, SpecIssue
from rustic.specfile import check_agent_classes, load_guild_spec, parse_guild_spec

VALID = """\
id: hello
name: Hello guild
agents:
  - id: greeter
    name: Greeter
    class_name: agents.greeter.Greeter
"""


def write_spec(tmp_path: Path, text: str, name: str = "guild.yaml") -> Path:
    """Write dedented YAML `text` into `tmp_path` and return its path."""
    path = tmp_path / name
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def issues_of(path: Path, *, check_classes: bool = False) -> list[SpecIssue]:
    """Load `path` expecting a refusal; return the issues."""
    with pytest.raises(SpecError) as caught:
        load_guild_spec(path, check_classes=check_classes)
    return caught.value.issues


def where(issue: SpecIssue) -> tuple[str, int | None, int | None, str]:
    """The location part of an issue."""
    return issue.file, issue.line, issue.column, issue.key_path


# --- loading and error locations -------------------------------------------------------------


def test_a_valid_file_loads_with_defaults_and_its_source(tmp_path: Path) -> None:
    path = write_spec(tmp_path, VALID)

    spec = load_guild_spec(path)

    assert spec.agent("greeter").class_name == "agents.greeter.Greeter"
    assert spec.execution == EngineSpec()
    assert spec.shutdown_timeout == 10.0
    assert spec.source == path.absolute()
    assert spec.base_dir == tmp_path.absolute()


def test_a_value_of_the_wrong_type_is_reported_at_its_line_with_the_value_found(
    tmp_path: Path,
) -> None:
    # Given an agent whose name is a number
    path = write_spec(tmp_path, VALID.replace("name: Greeter", "name: 3"))

    # When the file is loaded
    (issue,) = issues_of(path)

    # Then the issue points at the value and quotes it
    assert where(issue) == (str(path), 5, 11, "agents[0].name")
    assert issue.message == "Input should be a valid string (got 3)"
    assert str(issue) == f"{path}:5:11: agents[0].name: Input should be a valid string (got 3)"


def test_a_missing_key_points_at_the_mapping_that_lacks_it(tmp_path: Path) -> None:
    # Given an agent without class_name
    path = write_spec(tmp_path, VALID.replace("    class_name: agents.greeter.Greeter\n", ""))

    # When the file is loaded
    (issue,) = issues_of(path)

    # Then the issue points at the agent's mapping, which starts at its first key
    assert where(issue) == (str(path), 4, 5, "agents[0].class_name")
    assert issue.message == "field required"


def test_an_unknown_top_level_key_is_reported_at_the_key_with_the_allowed_keys(
    tmp_path: Path,
) -> None:
    path = write_spec(tmp_path, VALID + "colour: blue\n")

    (issue,) = issues_of(path)

    assert where(issue) == (str(path), 7, 1, "colour")
    assert issue.message.startswith("unknown key (allowed: agents, default_topic, dependency_map")
    assert issue.message.endswith("shutdown_timeout, state)")


def test_an_unknown_key_inside_an_agent_lists_the_agent_fields(tmp_path: Path) -> None:
    path = write_spec(tmp_path, VALID + "    topics: [a]\n")

    (issue,) = issues_of(path)

    assert where(issue) == (str(path), 7, 5, "agents[0].topics")
    assert "allowed: additional_topics, class_name, dependency_map, description" in issue.message


def test_an_unknown_key_in_an_execution_block_lists_the_engine_fields(tmp_path: Path) -> None:
    path = write_spec(tmp_path, VALID + "    execution: {engine: asyncio, workers: 2}\n")

    (issue,) = issues_of(path)

    assert where(issue) == (str(path), 7, 34, "agents[0].execution.workers")
    assert "allowed: address, dedicated_threads, engine, max_concurrency" in issue.message


def test_a_duplicate_agent_id_is_reported_at_the_second_occurrence(tmp_path: Path) -> None:
    # Given four agents, the fourth reusing the second one's id
    agents = "".join(
        f"  - {{id: {agent_id}, name: N, class_name: m.C}}\n" for agent_id in ("a", "b", "c", "b")
    )
    path = write_spec(tmp_path, "id: hello\nname: Hello\nagents:\n" + agents)

    # When the file is loaded
    (issue,) = issues_of(path)

    # Then the fourth agent's id is blamed and the first use is named
    assert where(issue) == (str(path), 7, 6, "agents[3].id")
    assert issue.message == "duplicate agent id (first used by agents[1]) (got 'b')"


def test_a_key_repeated_in_one_yaml_mapping_is_refused_at_the_second_key(
    tmp_path: Path,
) -> None:
    path = write_spec(tmp_path, VALID + "    name: Again\n")

    (issue,) = issues_of(path)

    assert where(issue) == (str(path), 7, 5, "agents[0].name")
    assert issue.message == "duplicate key (first at line 5)"


def test_a_yaml_syntax_error_is_reported_at_the_problem_mark(tmp_path: Path) -> None:
    path = write_spec(tmp_path, VALID + "    properties: {greeting: [Hello}\n")

    (issue,) = issues_of(path)

    assert (issue.file, issue.line, issue.key_path) == (str(path), 7, "")
    assert "expected ',' or ']'" in issue.message


def test_a_top_level_that_is_not_a_mapping_is_refused(tmp_path: Path) -> None:
    path = write_spec(tmp_path, "- id: hello\n- id: other\n")

    (issue,) = issues_of(path)

    assert where(issue) == (str(path), 1, 1, "")
    assert issue.message.startswith("top level must be a mapping (got list [")


def test_an_empty_file_is_refused(tmp_path: Path) -> None:
    path = write_spec(tmp_path, "# nothing here\n")

    (issue,) = issues_of(path)

    assert issue.message == "top level must be a mapping (got an empty document)"


def test_a_missing_file_is_reported_with_its_path(tmp_path: Path) -> None:
    path = tmp_path / "absent.yaml"

    (issue,) = issues_of(path)

    assert where(issue) == (str(path), None, None, "")
    assert str(issue) == f"{path}: file not found"


def test_a_guild_id_breaking_the_pattern_is_refused_with_the_value(tmp_path: Path) -> None:
    path = write_spec(tmp_path, VALID.replace("id: hello", "id: Hello World"))

    (issue,) = issues_of(path)

    assert where(issue) == (str(path), 1, 5, "id")
    assert (
        issue.message == "String should match pattern '^[a-z0-9][a-z0-9_-]*$' (got 'Hello World')"
    )


def test_a_negative_shutdown_timeout_is_refused(tmp_path: Path) -> None:
    path = write_spec(tmp_path, VALID + "shutdown_timeout: -1\n")

    (issue,) = issues_of(path)

    assert where(issue) == (str(path), 7, 19, "shutdown_timeout")
    assert issue.message == "Input should be greater than 0 (got -1)"


def test_several_problems_give_one_issue_each_and_one_line_each(tmp_path: Path) -> None:
    # Given a file with a bad timeout, an agent without a name and a dependency without class
    path = write_spec(
        tmp_path,
        """\
        id: hello
        name: Hello
        shutdown_timeout: 0
        dependency_map:
          store: {properties: {}}
        agents:
          - id: greeter
            class_name: agents.greeter.Greeter
        """,
    )

    # When the file is loaded
    with pytest.raises(SpecError) as caught:
        load_guild_spec(path)

    # Then each problem is one issue, and one line of the message
    located = [(issue.line, issue.key_path) for issue in caught.value.issues]
    assert located == [
        (3, "shutdown_timeout"),
        (5, "dependency_map.store.class_name"),
        (7, "agents[0].name"),
    ]
    assert len(str(caught.value).splitlines()) == 3


def test_parse_guild_spec_names_the_given_source_in_issues() -> None:
    with pytest.raises(SpecError) as caught:
        parse_guild_spec("id: hello\n", "inline.yaml")

    assert str(caught.value) == "inline.yaml:1:1: name: field required"


def test_a_spec_read_twice_compares_equal_and_has_a_stable_fingerprint(tmp_path: Path) -> None:
    path = write_spec(tmp_path, VALID)

    first, second = load_guild_spec(path), load_guild_spec(path)

    assert first == second
    assert first.agents[0].fingerprint() == second.agents[0].fingerprint()
    assert len(first.agents[0].fingerprint()) == 12
    changed = first.agents[0].model_copy(update={"properties": {"greeting": "Hi"}})
    assert changed.fingerprint() != first.agents[0].fingerprint()


def test_resolve_url_makes_relative_sqlite_paths_absolute_against_the_guild_folder(
    tmp_path: Path,
) -> None:
    spec = load_guild_spec(write_spec(tmp_path, VALID))
    base = tmp_path.absolute()

    assert spec.resolve_url("sqlite:///data/bus.db") == f"sqlite:///{base}/data/bus.db"
    assert spec.resolve_url("sqlite:///bus.db?timeout=5") == f"sqlite:///{base}/bus.db?timeout=5"
    assert spec.resolve_url("sqlite:////var/bus.db") == "sqlite:////var/bus.db"
    assert spec.resolve_url("memory") == "memory"
    assert spec.resolve_url("redis://localhost:6379/0") == "redis://localhost:6379/0"


# --- check_agent_classes -----------------------------------------------------------------------

AGENT_MODULE = """\
from pydantic import BaseModel, ConfigDict

from rustic.agent import Agent


class GreeterProps(BaseModel):
    model_config = ConfigDict(extra="forbid")

    greeting: str
    times: int = 1


class Greeter(Agent[GreeterProps]):
    pass


class NotAnAgent:
    pass
"""

CHECKED = """\
id: hello
name: Hello
agents:
  - id: greeter
    name: Greeter
    class_name: {class_name}
    properties:
      greeting: {greeting}
"""


@pytest.fixture
def agent_folder(tmp_path: Path, fresh_imports: None) -> Path:
    """A guild folder holding `agents_under_test/greeter.py`; needs `rustic.agent`."""
    pytest.importorskip("rustic.agent")
    package = tmp_path / "agents_under_test"
    package.mkdir()
    (package / "__init__.py").write_text("", encoding="utf-8")
    (package / "greeter.py").write_text(AGENT_MODULE, encoding="utf-8")
    return tmp_path


def checked_spec(folder: Path, class_name: str, greeting: str = "Hello") -> Path:
    """Write a guild file in `folder` with one agent."""
    return write_spec(folder, CHECKED.format(class_name=class_name, greeting=greeting))


def test_check_classes_accepts_a_good_agent_and_puts_the_guild_folder_on_sys_path(
    agent_folder: Path,
) -> None:
    path = checked_spec(agent_folder, "agents_under_test.greeter.Greeter")

    spec = load_guild_spec(path, check_classes=True)

    assert str(agent_folder.absolute()) in sys.path
    assert spec.agents[0].resolve_class().__name__ == "Greeter"


def test_check_classes_reports_an_unimportable_class_at_its_line(agent_folder: Path) -> None:
    path = checked_spec(agent_folder, "x_absent.y.Z")

    (issue,) = issues_of(path, check_classes=True)

    assert where(issue) == (str(path), 6, 17, "agents[0].class_name")
    assert issue.message == "cannot import 'x_absent.y.Z': No module named 'x_absent'"


def test_check_classes_reports_properties_failing_the_agent_model(agent_folder: Path) -> None:
    # Given a greeting that is a number
    path = checked_spec(agent_folder, "agents_under_test.greeter.Greeter", greeting="3")

    # When the classes are checked
    (issue,) = issues_of(path, check_classes=True)

    # Then the property is blamed at its own line
    assert where(issue) == (str(path), 8, 17, "agents[0].properties.greeting")
    assert issue.message == "Input should be a valid string (got 3)"


def test_check_classes_refuses_a_class_that_is_not_an_agent(agent_folder: Path) -> None:
    path = checked_spec(agent_folder, "agents_under_test.greeter.NotAnAgent")

    (issue,) = issues_of(path, check_classes=True)

    assert issue.key_path == "agents[0].class_name"
    assert issue.message.endswith("is not a subclass of rustic.agent.Agent")


def test_check_classes_collects_every_problem_including_dependencies(agent_folder: Path) -> None:
    # Given an agent missing a required property and two unimportable dependency classes
    text = (
        CHECKED.format(class_name="agents_under_test.greeter.Greeter", greeting="Hi")
        .replace("      greeting: Hi\n", "      colour: red\n")
        .replace("agents:\n", "dependency_map:\n  store: {class_name: nowhere.Store}\nagents:\n")
    )
    text += "    dependency_map:\n      cache: {class_name: nowhere.Cache}\n"
    path = write_spec(agent_folder, text)

    # When the classes are checked
    issues = issues_of(path, check_classes=True)

    # Then all four problems come back in one error
    assert [(issue.line, issue.key_path) for issue in issues] == [
        (4, "dependency_map.store.class_name"),
        (10, "agents[0].properties.greeting"),
        (10, "agents[0].properties.colour"),
        (12, "agents[0].dependency_map.cache.class_name"),
    ]


def test_check_classes_uses_the_class_object_of_a_spec_built_in_code(agent_folder: Path) -> None:
    sys.path.insert(0, str(agent_folder))
    greeter = import_object("agents_under_test.greeter.Greeter")
    agent = AgentSpec.model_validate(
        {"id": "a", "name": "A", "class_name": greeter, "properties": {"greeting": 3}}
    )
    spec = GuildSpec(id="g", name="G", agents=[agent])

    with pytest.raises(SpecError) as caught:
        check_agent_classes(spec)

    (issue,) = caught.value.issues
    assert (issue.file, issue.line, issue.key_path) == (
        "<guild g>",
        None,
        "agents[0].properties.greeting",
    )
