"""The compiled build (setup.py, ``make test-compiled``) is what runs when it is asked for,
and the pure package otherwise: a test run must know which broker it tested."""

from __future__ import annotations

import importlib
import os
import re
from pathlib import Path

import pytest

pytestmark = pytest.mark.timeout(30)

ROOT = Path(__file__).resolve().parent.parent


def hot_modules() -> list[str]:
    """setup.py's HOT list, as module names."""
    text = (ROOT / "setup.py").read_text()
    paths = re.findall(r'"(respworkers/[\w/]+)\.py"', text)
    assert paths, "setup.py names no HOT modules"
    return [p.replace("/", ".") for p in paths]


def test_the_hot_modules_exist_and_import() -> None:
    for name in hot_modules():
        importlib.import_module(name)


@pytest.mark.skipif(os.environ.get("RESPWORKERS_EXPECT_COMPILED") != "1",
                    reason="only under make test-compiled")
def test_every_hot_module_runs_compiled() -> None:
    for name in hot_modules():
        path = importlib.import_module(name).__file__ or ""
        assert path.endswith(".so"), f"{name} was imported from {path}, not the compiled build"


@pytest.mark.skipif(os.environ.get("RESPWORKERS_EXPECT_COMPILED") == "1",
                    reason="the compiled run checks the opposite")
def test_the_package_runs_as_pure_python() -> None:
    for name in hot_modules():
        path = importlib.import_module(name).__file__ or ""
        assert path.endswith(".py"), f"{name} was imported from {path}: a compiled module " \
            "in the source tree (remove it, or run make test-compiled)"
