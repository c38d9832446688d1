"""The benchmarks still run: they speak the protocol with their own raw peers, so a change to
the wire format must change them too. A tiny run each, for breakage, never for speed."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"

pytestmark = pytest.mark.timeout(180)


def test_core_benchmark_runs() -> None:
    r = subprocess.run([sys.executable, str(BENCH / "core.py"), "--jobs", "2000", "--rounds", "1"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "us CPU per job" in r.stdout


def test_suite_runs_one_small_group(tmp_path: Path) -> None:
    out = tmp_path / "suite.json"
    r = subprocess.run([sys.executable, str(BENCH / "suite.py"), "--only", "od-100",
                        "--rounds", "1", "--jobs", "300", "--json", str(out)],
                       capture_output=True, text=True, timeout=170)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report, "the suite wrote no results"
