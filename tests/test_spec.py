"""Tests of guild spec models: equality, GuildSpec helpers, EngineSpec.merged and imports."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from pydantic import ValidationError

from rustic import spec as spec_module
from rustic import specfile
from rustic.imports import ObjectImportError, import_object, qualified_name
from rustic.spec import AgentSpec, EngineSpec, GuildSpec


def test_a_spec_is_not_hashable() -> None:
    with pytest.raises(TypeError):
        hash(EngineSpec())


# --- GuildSpec helpers -------------------------------------------------------------------------


def test_resolve_url_uses_the_working_directory_for_a_spec_built_in_code() -> None:
    spec = GuildSpec(id="g", name="G")

    assert spec.source is None
    assert spec.resolve_url("sqlite:///bus.db") == f"sqlite:///{Path.cwd()}/bus.db"


def test_agent_lookup_raises_key_error_for_an_unknown_id() -> None:
    spec = GuildSpec(id="g", name="G")

    with pytest.raises(KeyError, match="nobody"):
        spec.agent("nobody")


def test_duplicate_agent_ids_are_refused_in_code_too() -> None:
    agent = {"id": "a", "name": "A", "class_name": "m.C"}

    with pytest.raises(ValidationError) as caught:
        GuildSpec(id="g", name="G", agents=[agent, agent])

    assert caught.value.errors()[0]["loc"] == ("agents", 1, "id")


def test_an_agent_spec_built_from_a_class_object_carries_the_class() -> None:
    class Local:
        pass

    spec = AgentSpec.model_validate({"id": "a", "name": "A", "class_name": Local})

    assert spec.class_name == qualified_name(Local)
    assert spec.resolve_class() is Local


# --- EngineSpec.merged -------------------------------------------------------------------------


def test_merged_layers_the_override_then_the_flags_over_the_guild_default() -> None:
    # Given a guild default, an agent override and CLI flags
    guild = EngineSpec(engine="multithreaded", max_workers=8, options={"a": 1, "b": 1})
    agent = EngineSpec(engine="asyncio", options={"b": 2})

    # When they are merged
    merged = guild.merged(agent, max_concurrency=4, engine=None)

    # Then set override fields and non-None flags win; the rest stays
    assert merged.engine == "asyncio"
    assert merged.max_workers == 8
    assert merged.max_concurrency == 4
    assert merged.options == {"a": 1, "b": 2}


def test_merged_ignores_override_fields_left_at_their_default() -> None:
    guild = EngineSpec(engine="multithreaded", dedicated_threads=True)

    merged = guild.merged(EngineSpec(max_workers=2))

    assert merged.engine == "multithreaded"
    assert merged.dedicated_threads is True
    assert merged.max_workers == 2


def test_merged_flags_win_over_the_override() -> None:
    merged = EngineSpec().merged(EngineSpec(engine="asyncio"), engine="ray")

    assert merged.engine == "ray"


def test_merged_refuses_an_unknown_flag() -> None:
    with pytest.raises(TypeError, match="workers"):
        EngineSpec().merged(None, workers=3)


# --- import_object -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "path",
    ["rustic.spec.EngineSpec", "rustic.spec:EngineSpec", "rustic.spec:EngineSpec.merged"],
)
def test_import_object_accepts_dotted_and_colon_forms(path: str) -> None:
    found = import_object(path)

    assert qualified_name(found).startswith("rustic.spec.EngineSpec")


def test_import_object_finds_a_nested_attribute_without_a_colon() -> None:
    assert import_object("rustic.spec.EngineSpec.merged") is EngineSpec.merged


@pytest.mark.parametrize(
    ("path", "reason"),
    [
        ("x_missing.y.Z", "No module named 'x_missing'"),
        ("rustic.spec.Nothing", "'rustic.spec' has no attribute 'Nothing'"),
        ("rustic.spec:EngineSpec.nothing", "'rustic.spec.EngineSpec' has no attribute 'nothing'"),
        ("rustic.nomodule.Thing", "No module named 'rustic.nomodule'"),
        ("Thing", "expected a dotted path like 'pkg.module.Name'"),
    ],
)
def test_import_object_says_why_it_failed(path: str, reason: str) -> None:
    with pytest.raises(ObjectImportError) as caught:
        import_object(path)

    assert caught.value.reason == reason
    assert str(caught.value) == f"cannot import {path!r}: {reason}"


def test_import_object_reports_a_syntax_error_with_file_and_line(
    tmp_path: Path, fresh_imports: None
) -> None:
    (tmp_path / "broken_mod.py").write_text("x = 1\ndef f(:\n", encoding="utf-8")
    sys.path.insert(0, str(tmp_path))

    with pytest.raises(ObjectImportError) as caught:
        import_object("broken_mod.f")

    assert f"syntax error at {tmp_path / 'broken_mod.py'}:2:" in caught.value.reason


# --- module layout -----------------------------------------------------------------------------


def test_the_loaders_are_still_importable_from_rustic_spec() -> None:
    from rustic.spec import check_agent_classes, load_guild_spec, parse_guild_spec

    assert load_guild_spec is specfile.load_guild_spec
    assert parse_guild_spec is specfile.parse_guild_spec
    assert check_agent_classes is specfile.check_agent_classes
    assert not hasattr(spec_module, "no_such_loader")
