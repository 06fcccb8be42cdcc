"""Guild YAML files: loading with node marks, so that each issue names its file, line and key."""

from __future__ import annotations

import os
import sys
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, ValidationError

from rustic.imports import ObjectImportError, import_object, qualified_name
from rustic.spec import AgentSpec, DependencySpec, GuildSpec, SpecError, SpecIssue

Loc = tuple[int | str, ...]


def load_guild_spec(path: str | os.PathLike[str], *, check_classes: bool = False) -> GuildSpec:
    """Read and validate a guild YAML file; with `check_classes`, also import its classes."""
    file = os.fspath(path)
    try:
        text = Path(file).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SpecError([SpecIssue(file, None, None, "", "file not found")]) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise SpecError([SpecIssue(file, None, None, "", f"cannot read file: {exc}")]) from None
    spec = parse_guild_spec(text, file)
    spec._source = Path(file).absolute()
    if check_classes:
        check_agent_classes(spec)
    return spec


def parse_guild_spec(text: str, source: str) -> GuildSpec:
    """Validate guild YAML `text`; `source` names it in error messages."""
    node, data = _compose(text, source)
    if not isinstance(data, dict):
        found = "an empty document" if node is None else f"{type(data).__name__} {_show(data)}"
        line, column = _position(node)
        message = f"top level must be a mapping (got {found})"
        raise SpecError([SpecIssue(source, line, column, "", message)])
    locator = _Locator(source, node)
    try:
        spec = GuildSpec.model_validate(data)
    except ValidationError as exc:
        raise SpecError(locator.issues(exc, GuildSpec)) from None
    spec._locator = locator
    return spec


def check_agent_classes(spec: GuildSpec) -> None:
    """Import every agent and dependency class and validate agent properties.

    The guild's `base_dir` is put on `sys.path` first (and left there, as the runtime
    does). All problems are collected into one `SpecError`.
    """
    from rustic.agent import Agent

    base = str(spec.base_dir.absolute())
    if base not in sys.path:
        sys.path.insert(0, base)
    locator = spec._locator or _Locator(str(spec.source or f"<guild {spec.id}>"), None)
    issues: list[SpecIssue] = []
    for name, dependency in spec.dependency_map.items():
        issues += _check_dependency(locator, ("dependency_map", name), dependency)
    for index, agent in enumerate(spec.agents):
        issues += _check_agent(locator, index, agent, Agent)
    if issues:
        raise SpecError(issues)


def _check_agent(locator: _Locator, index: int, agent: AgentSpec, base: type) -> list[SpecIssue]:
    """Check one agent's class and properties, then its dependencies."""
    loc: Loc = ("agents", index)
    issues: list[SpecIssue] = []
    for name, dependency in agent.dependency_map.items():
        issues += _check_dependency(locator, (*loc, "dependency_map", name), dependency)
    try:
        cls = agent.resolve_class()
    except ObjectImportError as exc:
        return [locator.issue((*loc, "class_name"), str(exc)), *issues]
    if not issubclass(cls, base):
        message = f"{agent.class_name!r} is not a subclass of {qualified_name(base)}"
        return [locator.issue((*loc, "class_name"), message), *issues]
    model = getattr(cls, "properties_model", None)
    if not (isinstance(model, type) and issubclass(model, BaseModel)):
        return issues
    try:
        model.model_validate(agent.properties)
    except ValidationError as exc:
        issues[:0] = locator.issues(exc, model, prefix=(*loc, "properties"))
    except Exception as exc:  # a user validator may raise anything; report it, don't crash
        message = f"validating properties raised {type(exc).__name__}: {exc}"
        issues.insert(0, locator.issue((*loc, "properties"), message))
    return issues


def _check_dependency(locator: _Locator, loc: Loc, dependency: DependencySpec) -> list[SpecIssue]:
    """Check that a dependency's class imports."""
    try:
        import_object(dependency.class_name)
    except ObjectImportError as exc:
        return [locator.issue((*loc, "class_name"), str(exc))]
    return []


def _compose(text: str, source: str) -> tuple[yaml.Node | None, Any]:
    """Parse YAML into its node tree and data, refusing syntax errors and duplicate keys."""
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is not None:
            _refuse_duplicate_keys(node, source)
        return node, None if node is None else loader.construct_document(node)
    except yaml.MarkedYAMLError as exc:
        line, column = _position(exc.problem_mark or exc.context_mark)
        message = " ".join(str(part) for part in (exc.context, exc.problem) if part)
        raise SpecError([SpecIssue(source, line, column, "", message)]) from None
    except yaml.YAMLError as exc:
        raise SpecError([SpecIssue(source, None, None, "", str(exc))]) from None
    finally:
        loader.dispose()


def _refuse_duplicate_keys(root: yaml.Node, source: str) -> None:
    """Raise a `SpecError` naming every key repeated within one mapping."""
    issues: list[SpecIssue] = []
    for loc, mapping in _mappings(root, ()):
        seen: dict[str, yaml.Node] = {}
        for key, _value in mapping.value:
            if not isinstance(key, yaml.ScalarNode):
                continue
            if key.value in seen:
                line, column = _position(key)
                first, _ = _position(seen[key.value])
                message = f"duplicate key (first at line {first})"
                issues.append(
                    SpecIssue(source, line, column, _key_path((*loc, key.value)), message)
                )
            seen.setdefault(key.value, key)
    if issues:
        raise SpecError(issues)


def _mappings(node: yaml.Node, loc: Loc) -> Iterator[tuple[Loc, yaml.MappingNode]]:
    """Yield every mapping node in the tree with its key path."""
    if isinstance(node, yaml.MappingNode):
        yield loc, node
        for key, value in node.value:
            name = key.value if isinstance(key, yaml.ScalarNode) else "?"
            yield from _mappings(value, (*loc, name))
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            yield from _mappings(item, (*loc, index))


class _Locator:
    """Turns pydantic errors into `SpecIssue`s by walking the YAML nodes along each `loc`."""

    def __init__(self, file: str, root: yaml.Node | None) -> None:
        self.file = file
        self.root = root

    def issues(self, error: ValidationError, model: type, prefix: Loc = ()) -> list[SpecIssue]:
        """One issue per pydantic error; `model` is what validated the value at `prefix`."""
        result = []
        for detail in error.errors(include_url=False):
            loc = (*prefix, *detail["loc"])
            key_node = detail["type"] in ("extra_forbidden", "duplicate_id")
            message = _describe(detail, model)
            result.append(self.issue(loc, message, key_node=key_node))
        return result

    def issue(self, loc: Loc, message: str, *, key_node: bool = False) -> SpecIssue:
        """Build an issue for `loc`, located at the deepest YAML node the path reaches."""
        line, column = _position(self._find(loc, key_node))
        return SpecIssue(self.file, line, column, _key_path(loc), message)

    def _find(self, loc: Loc, key_node: bool) -> yaml.Node | None:
        """Walk `loc` down the node tree; stop at the last node that exists."""
        node = self.root
        for depth, part in enumerate(loc):
            if part == "[key]" or node is None:
                break  # pydantic's marker for a bad dict key: `node` is already the key
            want_key = (key_node and depth == len(loc) - 1) or loc[depth + 1 : depth + 2] == (
                "[key]",
            )
            child = _child(node, part, want_key)
            if child is None:
                break
            node = child
        return node


def _child(node: yaml.Node, part: int | str, want_key: bool) -> yaml.Node | None:
    """Return the value (or key) node under `part`, or None when absent."""
    if isinstance(node, yaml.SequenceNode) and isinstance(part, int):
        items: list[yaml.Node] = node.value
        return items[part] if 0 <= part < len(items) else None
    if isinstance(node, yaml.MappingNode):
        for key, value in node.value:
            if isinstance(key, yaml.ScalarNode) and key.value == str(part):
                return key if want_key else value
    return None


def _describe(detail: Any, model: type) -> str:
    """Say what must hold and, where useful, the value found."""
    kind = detail["type"]
    if kind == "missing":
        return "field required"
    if kind == "extra_forbidden":
        allowed = _allowed_keys(model, detail["loc"][:-1])
        return f"unknown key (allowed: {', '.join(allowed)})" if allowed else "unknown key"
    return f"{detail['msg']} (got {_show(detail['input'])})"


def _allowed_keys(model: type, loc: Loc) -> list[str]:
    """List the field names of the model found at `loc` below `model`."""
    annotation: Any = model
    for part in loc:
        annotation = _step(annotation, part)
    found = _model_in(annotation)
    return sorted(found.model_fields) if found is not None else []


def _step(annotation: Any, part: int | str) -> Any:
    """Follow one `loc` part through a type: a model field, a list item or a dict value."""
    annotation = _model_in(annotation) or annotation
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        field = annotation.model_fields.get(str(part))
        return field.annotation if field is not None else None
    args = get_args(annotation)
    if get_origin(annotation) in (Union, types.UnionType):
        return next((_step(arg, part) for arg in args if arg is not type(None)), None)
    return args[-1] if get_origin(annotation) in (list, dict) and args else None


def _model_in(annotation: Any) -> type[BaseModel] | None:
    """Return the model class of `annotation` itself or of `Model | None`."""
    candidates = get_args(annotation) if get_origin(annotation) in (Union, types.UnionType) else ()
    for candidate in (annotation, *candidates):
        if isinstance(candidate, type) and issubclass(candidate, BaseModel):
            return candidate
    return None


def _position(node: yaml.Node | yaml.Mark | None) -> tuple[int | None, int | None]:
    """Return the 1-based line and column of a node or mark."""
    mark = node.start_mark if isinstance(node, yaml.Node) else node
    if mark is None:
        return None, None
    return mark.line + 1, mark.column + 1


def _key_path(loc: Loc) -> str:
    """Render a loc as `agents[0].properties.greeting`."""
    path = ""
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        elif part != "[key]":
            path += f".{part}" if path else str(part)
    return path


def _show(value: Any, limit: int = 60) -> str:
    """Quote a value found in the spec, shortened when long."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
