"""Worker targets that fail to import say where (in-process: import_target on files in a temp dir)."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from respworkers.errors import TargetError
from respworkers.targets import import_target

pytestmark = pytest.mark.timeout(20)


@pytest.fixture
def pkg(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """An importable package folder ``mypkg`` in a fresh working directory, forgotten afterwards."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", ".")])
    before = set(sys.modules)
    (tmp_path / "mypkg").mkdir()
    (tmp_path / "mypkg" / "__init__.py").write_text("")
    yield tmp_path / "mypkg"
    for name in set(sys.modules) - before:
        del sys.modules[name]


WORKER = "from respworkers import Worker\n\nclass Job(Worker):\n    def process(self, p):\n        return p\n"


def failure(target: str) -> str:
    with pytest.raises(TargetError) as err:
        import_target(target)
    return str(err.value)


def test_missing_import_inside_the_module_names_the_module_and_line(pkg: Path) -> None:
    # "my" is a prefix of "mypkg": it must not pass for the target's own module missing
    (pkg / "jobs.py").write_text("import os\n\nimport my\n" + WORKER)
    message = failure("mypkg.jobs:Job")
    assert message.startswith("'mypkg.jobs:Job': importing 'mypkg.jobs' failed: "
                              "ModuleNotFoundError: No module named 'my'"), message
    assert 'File "mypkg/jobs.py", line 3, in <module>\n    import my' in message
    assert "importlib" not in message and "targets.py" not in message


def test_failing_import_two_modules_deep_shows_both_lines(pkg: Path) -> None:
    (pkg / "helpers.py").write_text("\n\nfrom collections import nothing_here\n")
    (pkg / "jobs.py").write_text("from . import helpers\n" + WORKER)
    message = failure("mypkg.jobs:Job")
    assert "importing 'mypkg.jobs' failed: ImportError: cannot import name 'nothing_here'" in message
    assert message.index('"mypkg/jobs.py", line 1') < message.index('"mypkg/helpers.py", line 3')


def test_syntax_error_shows_file_and_line(pkg: Path) -> None:
    (pkg / "jobs.py").write_text(WORKER + "\ndef broken(:\n    pass\n")
    message = failure("mypkg.jobs:Job")
    assert message.startswith("'mypkg.jobs:Job': importing 'mypkg.jobs' failed:\n")
    assert 'File "mypkg/jobs.py", line 7' in message and "def broken(:" in message
    assert "SyntaxError" in message


def test_exception_at_module_level_shows_where_it_was_raised(pkg: Path) -> None:
    (pkg / "jobs.py").write_text(
        WORKER + "\ndef configure():\n    raise RuntimeError('no GPU found')\n\nconfigure()\n")
    message = failure("mypkg.jobs:Job")
    assert "importing 'mypkg.jobs' failed: RuntimeError: no GPU found" in message
    assert 'File "mypkg/jobs.py", line 10, in <module>\n    configure()' in message
    assert 'File "mypkg/jobs.py", line 8, in configure\n    raise RuntimeError' in message


def test_missing_modules_of_the_target_itself_keep_their_short_message(pkg: Path) -> None:
    assert failure("nosuchpkg.jobs:Job") == "'nosuchpkg.jobs:Job': no module named 'nosuchpkg'"
    assert failure("mypkg.nothing:Job") == "'mypkg.nothing:Job': no module named 'mypkg.nothing'"
    (pkg / "jobs.py").write_text(WORKER)
    assert import_target("mypkg.jobs:Job").__name__ == "Job"
    assert "has no attribute 'Other'" in failure("mypkg.jobs:Other")
