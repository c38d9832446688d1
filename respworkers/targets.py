"""Import ``module:Class`` worker targets, the current directory importable, with clear errors."""

from __future__ import annotations

import importlib
import os
import sys

from .errors import TargetError
from .worker.base import Worker


def import_target(target: str) -> type[Worker]:
    """Return the Worker subclass named by ``package.module:Class`` (dotted attributes allowed)."""
    module_name, sep, attr_path = target.partition(":")
    if not sep or not module_name or not attr_path:
        raise TargetError(f"{target!r}: expected MODULE:CLASS, for example mypkg.jobs:Resize")
    cwd = os.getcwd()
    if cwd not in sys.path and "" not in sys.path:
        sys.path.insert(0, cwd)
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and module_name.startswith(exc.name):
            raise TargetError(f"{target!r}: no module named {exc.name!r}") from None
        raise TargetError(f"{target!r}: importing {module_name!r} failed: {exc}") from exc
    except Exception as exc:
        raise TargetError(
            f"{target!r}: importing {module_name!r} raised {type(exc).__name__}: {exc}"
        ) from exc
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
