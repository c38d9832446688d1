"""Import ``module:Class`` worker targets, the current directory importable, with clear errors."""

from __future__ import annotations

import importlib
import os
import sys
import traceback
from collections.abc import Sequence
from types import ModuleType

from .errors import TargetError
from .worker.base import Worker

#: Frames of the import machinery (and of this module), left out of import error reports.
_MACHINERY = (os.path.abspath(__file__), os.path.abspath(importlib.__file__))


def _shown(path: str) -> str:
    """A path relative to the working directory when it is inside it: shorter, as typed."""
    try:
        rel = os.path.relpath(path)
    except ValueError:
        return path
    return path if rel.startswith(os.pardir) else rel


def _user_frames(exc: BaseException) -> list[traceback.FrameSummary]:
    """The frames of the failed import that ran the user's code (not importlib's)."""
    return [
        f for f in traceback.extract_tb(exc.__traceback__)
        if not f.filename.startswith("<frozen ") and os.path.abspath(f.filename) not in _MACHINERY
    ]


def _import_failure(target: str, module_name: str, exc: Exception) -> str:
    """Say which module failed to import, with the file and line where it went wrong.

    A bare "no module named 'my'" hides that the target's module was found and that
    one of its own imports failed; any exception at import time gets the same report.
    """
    frames = _user_frames(exc)
    if isinstance(exc, ModuleNotFoundError) and not frames and exc.name and (
        module_name == exc.name or module_name.startswith(exc.name + ".")
    ):
        return f"{target!r}: no module named {exc.name!r}"
    head = f"{target!r}: importing {module_name!r} failed"
    if isinstance(exc, SyntaxError):  # raised while compiling: the place is in the exception
        if exc.filename:
            exc.filename = _shown(exc.filename)
        where = "".join(traceback.format_exception_only(type(exc), exc)).rstrip()
        return f"{head}:\n{where}"
    lines = [
        f'  File "{_shown(f.filename)}", line {f.lineno}, in {f.name}' + (f"\n    {f.line}" if f.line else "")
        for f in frames
    ]
    return "\n".join([f"{head}: {type(exc).__name__}: {exc}", *lines])


def _import_module(target: str, module_name: str) -> ModuleType:
    cwd = os.getcwd()
    if cwd not in sys.path and "" not in sys.path:
        sys.path.insert(0, cwd)
    try:
        return importlib.import_module(module_name)
    except Exception as exc:
        raise TargetError(_import_failure(target, module_name, exc)) from None


def import_targets(targets: Sequence[str]) -> list[type[Worker]]:
    """Every Worker class the targets name: ``module:Class``, or ``module`` for each Worker
    subclass defined in that module (not imported into it), in the order defined."""
    found: list[type[Worker]] = []
    for target in targets:
        if ":" in target:
            classes = [import_target(target)]
        else:
            if not target or not all(part.isidentifier() for part in target.split(".")):
                raise TargetError(f"{target!r}: expected MODULE:CLASS or MODULE, for example "
                                  "mypkg.jobs:Resize or mypkg.jobs")
            module = _import_module(target, target)
            classes = [obj for obj in vars(module).values()
                       if isinstance(obj, type) and issubclass(obj, Worker) and obj is not Worker
                       and obj.__module__ == module.__name__ and obj.overrides_processing()]
            if not classes:
                raise TargetError(f"{target!r}: the module defines no respworkers.Worker "
                                  "subclass that overrides process or process_multipart")
        found.extend(c for c in classes if c not in found)
    if not found:
        raise TargetError("name at least one worker target (MODULE:CLASS or MODULE)")
    return found


def import_target(target: str) -> type[Worker]:
    """Return the Worker subclass named by ``package.module:Class`` (dotted attributes allowed)."""
    module_name, sep, attr_path = target.partition(":")
    if not sep or not module_name or not attr_path:
        raise TargetError(f"{target!r}: expected MODULE:CLASS, for example mypkg.jobs:Resize")
    module = _import_module(target, module_name)
    obj: object = module
    for part in attr_path.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise TargetError(f"{target!r}: module {module_name!r} has no attribute {part!r}") from None
    if not (isinstance(obj, type) and issubclass(obj, Worker)):
        raise TargetError(f"{target!r}: {attr_path} is not a subclass of respworkers.Worker")
    if obj is Worker or not obj.overrides_processing():
        raise TargetError(f"{target!r}: {attr_path} overrides neither process nor process_multipart")
    return obj
