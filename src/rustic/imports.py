"""Import objects named by dotted paths, with errors that say why the import failed."""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Any


class ObjectImportError(ImportError):
    """A dotted path could not be turned into an object.

    `path` is the path as given and `reason` says what went wrong (module not found,
    attribute missing, syntax error with file and line, or an error raised by the module).
    """

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"cannot import {path!r}: {reason}")
        self.path = path
        self.reason = reason


def import_object(path: str) -> Any:
    """Import and return the object named by `path`.

    Accepted forms are `pkg.module.Name`, `pkg.module:Name` and `pkg.module:Outer.Inner`.
    Without a colon the longest importable module prefix is used, so `pkg.module.Outer.Inner`
    works too.
    """
    if ":" in path:
        module_name, _, attr_path = path.partition(":")
        if not module_name or not attr_path or ":" in attr_path:
            raise ObjectImportError(path, "expected 'pkg.module:Name'")
        module = _import_module(path, module_name)
        return _get_attribute(path, module, attr_path.split("."))
    return _import_dotted(path)


def qualified_name(obj: Any) -> str:
    """Return `module.QualName` for a class or function, the form `import_object` accepts."""
    return f"{obj.__module__}.{obj.__qualname__}"


def _import_dotted(path: str) -> Any:
    """Import `pkg.module.Name` by trying the longest module prefix first."""
    parts = path.split(".")
    if len(parts) < 2 or not all(parts):
        raise ObjectImportError(path, "expected a dotted path like 'pkg.module.Name'")

    # The first failure is the one worth reporting: it names the deepest missing module.
    first_error: ObjectImportError | None = None
    for split in range(len(parts) - 1, 0, -1):
        module_name = ".".join(parts[:split])
        try:
            module = _import_module(path, module_name, missing_ok=True)
        except _ModuleMissingError as missing:
            first_error = first_error or missing.error
            continue
        if first_error is not None and not hasattr(module, parts[split]):
            raise first_error
        return _get_attribute(path, module, parts[split:])
    assert first_error is not None  # the loop runs at least once and returns or records
    raise first_error


class _ModuleMissingError(Exception):
    """The module itself (not something it imports) does not exist."""

    def __init__(self, error: ObjectImportError) -> None:
        super().__init__(str(error))
        self.error = error


def _import_module(path: str, module_name: str, *, missing_ok: bool = False) -> ModuleType:
    """Import `module_name`, turning every failure into an `ObjectImportError` for `path`."""
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        itself = exc.name is not None and _is_prefix(exc.name, module_name)
        error = ObjectImportError(path, str(exc) if itself else f"{exc} (in {module_name})")
        if itself and missing_ok:
            raise _ModuleMissingError(error) from exc
        raise error from exc
    except SyntaxError as exc:
        where = f"{exc.filename}:{exc.lineno}"
        raise ObjectImportError(path, f"syntax error at {where}: {exc.msg}") from exc
    except Exception as exc:
        reason = f"importing {module_name} raised {type(exc).__name__}: {exc}"
        raise ObjectImportError(path, reason) from exc


def _is_prefix(name: str, module_name: str) -> bool:
    """Tell whether `name` is `module_name` or one of its parent packages."""
    return module_name == name or module_name.startswith(name + ".")


def _get_attribute(path: str, module: ModuleType, names: list[str]) -> Any:
    """Walk `names` as attributes starting from `module`."""
    obj: Any = module
    owner = module.__name__
    for name in names:
        if not name:
            raise ObjectImportError(path, "empty attribute name")
        try:
            obj = getattr(obj, name)
        except AttributeError:
            raise ObjectImportError(path, f"{owner!r} has no attribute {name!r}") from None
        owner = f"{owner}.{name}"
    return obj
