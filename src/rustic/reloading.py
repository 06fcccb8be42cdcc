"""Re-importing an agent's code for a hot swap: its module and the project modules it uses.

Only modules whose file lies under the project's folder (the app dir) are re-imported;
the standard library and installed packages never are. New module objects are executed
from source (never from a possibly stale ``.pyc``) into fresh namespaces, dependencies
first, and only replace the old ones in ``sys.modules`` when every one of them executed:
a syntax error or an exception at import leaves the running code untouched.
"""

from __future__ import annotations

import ast
import importlib.util
import logging
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

logger = logging.getLogger(__name__)

_IGNORED_PARTS = frozenset({".venv", "venv", "site-packages", "dist-packages", "__pycache__"})


class CodeLoadError(Exception):
    """The new code of an agent could not be imported; the old code keeps running."""


@dataclass
class ProjectGraph:
    """Which project modules import which, read from their source."""

    app_dir: Path
    imports: dict[str, set[str]] = field(default_factory=dict)
    files: dict[str, Path] = field(default_factory=dict)

    def closure(self, module: str) -> list[str]:
        """``module`` and every project module it imports, transitively, leaves first."""
        order: list[str] = []
        visiting: set[str] = set()

        def visit(name: str) -> None:
            if name in order or name in visiting:
                return
            visiting.add(name)
            for dep in sorted(self._imports_of(name)):
                visit(dep)
            order.append(name)

        visit(module)
        return order

    def _imports_of(self, name: str) -> set[str]:
        if name not in self.imports:
            path = module_file(name, self.app_dir)
            if path is None:
                self.imports[name] = set()
            else:
                self.files[name] = path
                self.imports[name] = self._project_imports(name, path)
        return self.imports[name]

    def _project_imports(self, name: str, path: Path) -> set[str]:
        try:
            tree = ast.parse(path.read_bytes(), str(path))
        except SyntaxError:
            return set()  # the re-import itself reports the syntax error
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        found: set[str] = set()
        for candidate in _imported_names(tree, package):
            if module_file(candidate, self.app_dir) is not None:
                found.add(candidate)
        found.discard(name)
        return found


def _imported_names(tree: ast.Module, package: str) -> Iterable[str]:
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                yield from (".".join(parts[:n]) for n in range(1, len(parts) + 1))
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".") if package else []
                anchor = anchor[: len(anchor) - (node.level - 1)] if node.level > 1 else anchor
                base = ".".join([*anchor, base] if base else anchor)
            if base:
                yield base
                yield from (f"{base}.{alias.name}" for alias in node.names)


def module_file(name: str, app_dir: Path) -> Path | None:
    """The source file of module ``name`` if it belongs to the project under ``app_dir``."""
    module = sys.modules.get(name)
    origin = getattr(module, "__file__", None) if module is not None else None
    if origin is None:
        try:
            spec = importlib.util.find_spec(name)
        except (ImportError, ValueError):
            return None
        origin = spec.origin if spec is not None else None
    if origin is None or not origin.endswith(".py"):
        return None
    path = Path(origin).resolve()
    if not path.is_relative_to(app_dir) or _IGNORED_PARTS.intersection(path.parts):
        return None
    return path


def project_files_of(module: str, app_dir: Path) -> set[Path]:
    """The files whose change must reload an agent whose class lives in ``module``."""
    graph = ProjectGraph(app_dir.resolve())
    graph.closure(module)
    return set(graph.files.values())


def reimport(module: str, app_dir: Path) -> ModuleType:
    """Re-import ``module`` and the project modules it uses, dependencies first.

    Returns the new module. Raises :class:`CodeLoadError` with the file and line of the
    problem when any of them fails; then nothing in ``sys.modules`` has changed.
    """
    graph = ProjectGraph(app_dir.resolve())
    names = [name for name in graph.closure(module) if name in graph.files]
    if module not in names:
        raise CodeLoadError(f"module {module!r} is not under the app dir {app_dir}")

    saved: dict[str, ModuleType | None] = {name: sys.modules.get(name) for name in names}
    try:
        for name in names:
            sys.modules[name] = _execute(name, graph.files[name])
    except BaseException:
        _restore(saved)
        raise
    for name in names:
        _attach_to_parent(name, sys.modules[name])
    logger.debug("re-imported modules=%s", ",".join(names))
    return sys.modules[module]


def _execute(name: str, path: Path) -> ModuleType:
    """Run ``path`` as a fresh module called ``name``, compiling from source."""
    spec = importlib.util.spec_from_file_location(
        name,
        path,
        submodule_search_locations=[str(path.parent)] if path.name == "__init__.py" else None,
    )
    if spec is None:
        raise CodeLoadError(f"cannot find a loader for {path}")
    module = importlib.util.module_from_spec(spec)
    try:
        code = compile(path.read_bytes(), str(path), "exec")
    except SyntaxError as exc:
        raise CodeLoadError(f"syntax error in {exc.filename}:{exc.lineno}: {exc.msg}") from exc
    sys.modules[name] = module
    try:
        exec(code, module.__dict__)
    except Exception as exc:
        raise CodeLoadError(f"importing {path} raised {_located(exc, path)}") from exc
    return module


def _located(exc: BaseException, path: Path) -> str:
    line = None
    tb = exc.__traceback__
    while tb is not None:
        if tb.tb_frame.f_code.co_filename == str(path):
            line = tb.tb_lineno
        tb = tb.tb_next
    where = f" at line {line}" if line is not None else ""
    return f"{type(exc).__name__}: {exc}{where}"


def _restore(saved: dict[str, ModuleType | None]) -> None:
    for name, module in saved.items():
        if module is None:
            sys.modules.pop(name, None)
        else:
            sys.modules[name] = module


def _attach_to_parent(name: str, module: ModuleType) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = sys.modules.get(parent_name) if parent_name else None
    if parent is not None:
        setattr(parent, child, module)


def resolve_in(module: ModuleType, qualname: str) -> Any:
    """Find ``Outer.Inner`` inside ``module``; raises CodeLoadError when it is gone."""
    target: Any = module
    for part in qualname.split("."):
        try:
            target = getattr(target, part)
        except AttributeError:
            raise CodeLoadError(f"{module.__name__} no longer defines {qualname}") from None
    return target
