"""Guild and agent specs: the pydantic models, and the error that lists what is wrong in one."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    ValidatorFunctionWrapHandler,
    model_validator,
)
from pydantic_core import InitErrorDetails, PydanticCustomError

from rustic.imports import ObjectImportError, import_object, qualified_name

if TYPE_CHECKING:
    from rustic.specfile import _Locator, check_agent_classes, load_guild_spec, parse_guild_spec

__all__ = [
    "AgentSpec",
    "DependencySpec",
    "EngineSpec",
    "GuildSpec",
    "SpecError",
    "SpecIssue",
    "check_agent_classes",
    "load_guild_spec",
    "parse_guild_spec",
]


class _Spec(BaseModel):
    """Base of all spec models: unknown keys are refused and equality looks at fields only.

    Private attributes (the source file, YAML nodes, a class given in code) do not take part
    in `==`, so a spec read twice from the same file compares equal. Specs are not hashable.
    """

    model_config = ConfigDict(extra="forbid")

    __hash__ = BaseModel.__hash__  # None: mutable models are not hashable

    def __eq__(self, other: object) -> bool:
        if type(other) is not type(self):
            return NotImplemented
        return self.__dict__ == other.__dict__


class EngineSpec(_Spec):
    """How agents are executed: an engine name or `pkg.module:Class`, plus its knobs."""

    model_config = ConfigDict(extra="forbid")

    engine: str = Field(default="sync", min_length=1)
    max_workers: int | None = Field(default=None, ge=1)
    thread_name_prefix: str | None = None
    dedicated_threads: bool = False
    max_concurrency: int | None = Field(default=None, ge=1)
    address: str | None = None
    namespace: str | None = None
    num_cpus: float | None = Field(default=None, ge=0)
    options: dict[str, Any] = Field(default_factory=dict)

    def merged(self, override: EngineSpec | None = None, **flags: Any) -> EngineSpec:
        """Layer a per-agent override, then CLI flags, over this spec.

        Only fields explicitly set on `override` count; flags win when they are not None.
        `options` dicts are merged key by key rather than replaced.
        """
        unknown = sorted(set(flags) - set(EngineSpec.model_fields))
        if unknown:
            raise TypeError(f"unknown engine flags: {', '.join(unknown)}")
        data = self.model_dump()
        layers = (
            [] if override is None else [override.model_dump(include=override.model_fields_set)]
        )
        layers.append({name: value for name, value in flags.items() if value is not None})
        for layer in layers:
            options = {**data["options"], **layer.pop("options", {})}
            data.update(layer, options=options)
        return EngineSpec.model_validate(data)


class DependencySpec(_Spec):
    """A dependency injected by name: the class to build and its properties."""

    model_config = ConfigDict(extra="forbid")

    class_name: str
    properties: dict[str, Any] = Field(default_factory=dict)
    scope: Literal["guild", "agent"] | None = None


class AgentSpec(_Spec):
    """One agent of a guild.

    `class_name` may also be given a class object in code; the spec then carries the class
    and `resolve_class` returns it without importing.
    """

    model_config = ConfigDict(extra="forbid")

    id: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    name: str
    description: str = ""
    class_name: str
    properties: dict[str, Any] = Field(default_factory=dict)
    additional_topics: list[str] = Field(default_factory=list)
    listen_to_default_topic: bool = True
    dependency_map: dict[str, DependencySpec] = Field(default_factory=dict)
    execution: EngineSpec | None = None
    max_retries: int = Field(default=2, ge=0)

    _agent_class: type | None = PrivateAttr(default=None)

    @model_validator(mode="wrap")
    @classmethod
    def _accept_class_object(cls, data: Any, handler: ValidatorFunctionWrapHandler) -> Any:
        """Let `class_name` be a class: keep the class and store its dotted name."""
        agent_class = None
        if isinstance(data, dict) and isinstance(data.get("class_name"), type):
            agent_class = data["class_name"]
            data = {**data, "class_name": qualified_name(agent_class)}
        spec = handler(data)
        if agent_class is not None:
            spec._agent_class = agent_class
        return spec

    def resolve_class(self) -> type:
        """Return the agent class, importing `class_name` unless a class object was given."""
        if self._agent_class is not None:
            return self._agent_class
        obj = import_object(self.class_name)
        if not isinstance(obj, type):
            raise ObjectImportError(self.class_name, f"not a class (got {obj!r})")
        return obj

    def fingerprint(self) -> str:
        """Return 12 hex digits of the sha256 of the spec's canonical JSON."""
        dumped = self.model_dump(mode="json", fallback=repr)
        canonical = json.dumps(dumped, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()[:12]


class GuildSpec(_Spec):
    """A guild: its defaults, backends and agents. Agent ids must be unique."""

    model_config = ConfigDict(extra="forbid")

    id: str = Field(pattern=r"^[a-z0-9][a-z0-9_-]*$")
    name: str
    description: str = ""
    execution: EngineSpec = Field(default_factory=EngineSpec)
    messaging: str = "memory"
    state: str = "memory"
    shutdown_timeout: float = Field(default=10.0, gt=0)
    default_topic: str = "default_topic"
    error_topic: str = "error_topic"
    dependency_map: dict[str, DependencySpec] = Field(default_factory=dict)
    agents: list[AgentSpec] = Field(default_factory=list)

    _source: Path | None = PrivateAttr(default=None)
    _locator: _Locator | None = PrivateAttr(default=None)  # finds lines for later checks

    @model_validator(mode="after")
    def _refuse_duplicate_agent_ids(self) -> GuildSpec:
        """Refuse a second agent with an id already used, pointing at the second one."""
        first_index: dict[str, int] = {}
        errors: list[InitErrorDetails] = []
        for index, agent in enumerate(self.agents):
            if agent.id in first_index:
                message = "duplicate agent id (first used by agents[{first}])"
                error = PydanticCustomError(
                    "duplicate_id", message, {"first": first_index[agent.id]}
                )
                errors.append({"type": error, "loc": ("agents", index, "id"), "input": agent.id})
            first_index.setdefault(agent.id, index)
        if errors:
            raise ValidationError.from_exception_data(type(self).__name__, errors)
        return self

    @property
    def source(self) -> Path | None:
        """The YAML file this spec was loaded from, if any."""
        return self._source

    @property
    def base_dir(self) -> Path:
        """The folder relative paths resolve against: the source file's folder, else cwd."""
        return self._source.parent if self._source is not None else Path.cwd()

    def resolve_url(self, url: str) -> str:
        """Make a relative `sqlite:///` path absolute against `base_dir`; pass others as is."""
        prefix = "sqlite:///"
        if not url.startswith(prefix):
            return url
        path, sep, query = url[len(prefix) :].partition("?")
        if not path or path.startswith("/") or path == ":memory:":
            return url
        return f"{prefix}{self.base_dir.absolute() / path}{sep}{query}"

    def agent(self, agent_id: str) -> AgentSpec:
        """Return the agent with `agent_id`, or raise `KeyError`."""
        for agent in self.agents:
            if agent.id == agent_id:
                return agent
        raise KeyError(f"no agent {agent_id!r} in guild {self.id!r}")


@dataclass(frozen=True)
class SpecIssue:
    """One problem in a spec: where it is, the key path, what must hold and the value found."""

    file: str
    line: int | None
    column: int | None
    key_path: str
    message: str

    def __str__(self) -> str:
        where = self.file
        if self.line is not None:
            where += f":{self.line}" + (f":{self.column}" if self.column is not None else "")
        return ": ".join(part for part in (where, self.key_path, self.message) if part)


class SpecError(Exception):
    """A spec was refused; `issues` lists every problem found, one line each in `str()`."""

    def __init__(self, issues: Sequence[SpecIssue]) -> None:
        self.issues = list(issues)
        super().__init__("\n".join(str(issue) for issue in self.issues))


# YAML loading lives in `rustic.specfile`, which imports the models above. It is looked up here
# on first use rather than imported, so that either module can be imported first. Type checkers
# see the imports above instead, so a misspelt name is still caught.
_LOADERS = frozenset({"check_agent_classes", "load_guild_spec", "parse_guild_spec"})

if not TYPE_CHECKING:

    def __getattr__(name: str) -> Any:
        """Resolve the loaders of `rustic.specfile` under their older home, `rustic.spec`."""
        if name in _LOADERS:
            from rustic import specfile

            return getattr(specfile, name)
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
