"""The deploy files stay honest: every ``rw`` command line in the systemd units, the compose
file, the compose-equivalent script and docs/deploy.md parses; the units keep their warm-stop
settings (and pass ``systemd-analyze verify`` where it is installed); the compose topology
runs as processes; and a journal copied while its broker runs starts a new broker with its
jobs intact (docs/deploy.md, "Backing up the journal")."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
from pathlib import Path

import click
import pytest

from respworkers.cli import cli as rw_main
from respworkers.config import load as load_config

from conftest import Cluster, wait_for

ROOT = Path(__file__).parent.parent
DEPLOY = ROOT / "deploy"
UNITS = sorted((DEPLOY / "systemd").glob("*.service"))
COMPOSE = DEPLOY / "compose.yaml"
EQUIVALENT = DEPLOY / "compose-equivalent.sh"
DOC = ROOT / "docs" / "deploy.md"

pytestmark = pytest.mark.timeout(120)


# ---------------------------------------------------------------- rw command lines
def check_rw_line(words: list[str], where: str) -> None:
    """``words`` start with ``rw``: its subcommand exists and every option it uses is one of
    that subcommand's (values of options are skipped by click's own parsing rules)."""
    assert words[0] == "rw", (where, words)
    if words[1:] in ([], ["--help"], ["--version"]):
        return
    ctx = click.Context(rw_main)
    command = rw_main.get_command(ctx, words[1])
    assert command is not None, f"{where}: no such rw command {words[1]!r} in {shlex.join(words)}"
    known = {opt for param in command.params for opt in getattr(param, "opts", [])}
    known |= {opt for param in command.params for opt in getattr(param, "secondary_opts", [])}
    known |= {"-h", "--help"}
    for word in words[2:]:
        if word.startswith("-") and word != "-":
            name = word.split("=", 1)[0]
            assert name in known, f"{where}: rw {words[1]} has no option {name} ({shlex.join(words)})"


def rw_lines(text: str) -> list[list[str]]:
    """Every command line in ``text`` that runs rw (shell syntax; '&&', '|', ';' split)."""
    found = []
    for line in text.splitlines():
        line = line.strip().lstrip("$").strip()
        if line.startswith("#"):
            continue
        line = re.sub(r"\s#\s.*$", "", line)  # a trailing comment
        for part in re.split(r"&&|\|\||;|\|", line):
            try:
                words = shlex.split(part)
            except ValueError:  # a quoted command cut at '&&', a line continued: plain words
                words = re.sub(r"[\"'\\]", " ", part).split()
            at = [i for i, w in enumerate(words) if re.fullmatch(r"([^$\s]\S*/)?rw", w)]
            if not at:
                continue
            words = ["rw"] + [w for w in words[at[0] + 1:]
                              if w not in ("&", "\\") and not w.startswith("$") and ">" not in w]
            if len(words) > 1:
                found.append(words)
    return found


def test_unit_command_lines_parse() -> None:
    assert [u.name for u in UNITS] == ["respworkers-broker.service", "respworkers-worker@.service"]
    for unit in UNITS:
        execs = [line.split("=", 1)[1] for line in unit.read_text().splitlines()
                 if line.startswith("ExecStart=")]
        assert len(execs) == 1, unit
        words = shlex.split(execs[0].replace("%i", "mypkg.jobs:Resize"))
        assert words[0] == "/opt/respworkers/bin/rw"
        check_rw_line(["rw", *words[1:]], unit.name)


def test_compose_and_script_command_lines_parse() -> None:
    text = COMPOSE.read_text()
    lists = [json.loads(f"[{m}]") for m in re.findall(r'\[(?:"CMD", )?("rw",[^\]]*)\]', text)]
    assert len(lists) >= 4, lists  # broker, two pools, the healthcheck
    for words in lists:
        check_rw_line(words, "compose.yaml")
    shell = rw_lines(text)
    assert any(w[1] == "submit" for w in shell) and any(w[1] == "status" for w in shell)
    for words in shell:
        check_rw_line(words, "compose.yaml")
    script = rw_lines(EQUIVALENT.read_text())
    assert {w[1] for w in script} >= {"broker", "worker", "status"}, script
    for words in script:
        check_rw_line(words, EQUIVALENT.name)
    # The script runs the compose services' commands: each of those lists is in it.
    flat = EQUIVALENT.read_text().replace('"$etc/', "/etc/respworkers/").replace('"', "")
    for words in lists:
        if words[1] in ("broker", "worker"):
            assert shlex.join(words) in flat, f"compose-equivalent.sh lacks {shlex.join(words)}"


def test_docs_command_lines_parse() -> None:
    text = DOC.read_text()
    blocks = re.findall(r"```(?:sh|bash|console)\n(.*?)```", text, re.S)
    lines = [w for block in blocks for w in rw_lines(block)]
    assert len(lines) >= 10, lines
    for words in lines:
        check_rw_line(words, "docs/deploy.md")
    for name in re.findall(r"deploy/[\w./@-]+", text):
        assert (ROOT / name.rstrip(".")).exists(), f"docs/deploy.md names {name}, which does not exist"


# ---------------------------------------------------------------- systemd units
def unit_settings(path: Path) -> dict[str, str]:
    settings = {}
    for line in path.read_text().splitlines():
        if "=" in line and not line.startswith(("#", "[")):
            key, value = line.split("=", 1)
            settings.setdefault(key.strip(), value.strip())
    return settings


def seconds(value: str) -> float:
    match = re.fullmatch(r"(\d+)(s|min)?", value)
    assert match, value
    return int(match[1]) * (60 if match[2] == "min" else 1)


def test_units_keep_warm_stops_and_their_state() -> None:
    broker = unit_settings(DEPLOY / "systemd" / "respworkers-broker.service")
    worker = unit_settings(DEPLOY / "systemd" / "respworkers-worker@.service")
    for unit in (broker, worker):
        assert unit["KillSignal"] == "SIGTERM"
        assert unit["KillMode"] == "mixed"  # SIGTERM to the main process only: one signal each
        assert unit["Restart"] == "on-failure"
        assert unit["User"] == "respworkers"
        assert unit["RestartPreventExitStatus"] == "2"
        assert "TimeoutStopSec" in unit and "SendSIGKILL" in unit
    assert broker["StateDirectory"] == "respworkers"
    assert "ExecReload" in broker and "-HUP" in broker["ExecReload"]
    # A warm stop lets the job in hand finish: up to its hard limit, 2 x timeout + 5 s,
    # with the default timeout of 60 s.
    assert seconds(worker["TimeoutStopSec"]) >= 2 * 60 + 5


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed")
def test_units_pass_systemd_analyze_verify(tmp_path: Path) -> None:
    """Verified with the installed rw in place of /opt/respworkers/bin/rw (absent here)."""
    rw = Path(sys.executable).with_name("rw")
    if not rw.exists():
        pytest.skip("no rw script next to this Python")
    for unit in UNITS:
        (tmp_path / unit.name).write_text(unit.read_text().replace("/opt/respworkers/bin/rw", str(rw)))
    done = subprocess.run(["systemd-analyze", "verify", *[u.name for u in UNITS]], cwd=tmp_path,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and not done.stdout.strip() and not done.stderr.strip(), (
        done.stdout + done.stderr)


# ---------------------------------------------------------------- compose
def test_compose_structure_and_configs() -> None:
    text = COMPOSE.read_text()
    services = re.findall(r"^  ([\w-]+):\s*$", text.split("\nservices:\n", 1)[1].split("\nvolumes:", 1)[0],
                          re.M)
    assert services == ["keys", "broker", "pool-a", "pool-b", "client"], services
    assert '"rw", "status", "--once"' in text and "healthcheck:" in text
    assert "condition: service_healthy" in text and "service_completed_successfully" in text
    assert "tcp://broker:" not in text  # endpoints live in the config files
    for name in set(re.findall(r"/etc/respworkers/([\w.-]+)", text)):
        assert (DEPLOY / "compose" / name).exists(), name
    for toml in (DEPLOY / "compose").glob("*.toml"):
        load_config(toml)  # parsed and validated as every rw command does
        body = toml.read_text()
        if ("[worker]" in body or "[client]" in body) and toml.name != "health.toml":
            assert "tcp://broker:" in body and "broker_key" in body, toml
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert re.search(r"^USER respworkers$", dockerfile, re.M)
    assert 'CMD ["rw", "--help"]' in dockerfile


def free_prefix() -> int:
    """A port prefix P whose ports P81, P82 and P83 are free on 127.0.0.1."""
    for prefix in range(300 + os.getpid() % 200, 650):
        ok = True
        for port in (prefix * 100 + 81, prefix * 100 + 82, prefix * 100 + 83):
            with socket.socket() as s:
                try:
                    s.bind(("127.0.0.1", port))
                except OSError:
                    ok = False
        if ok:
            return prefix
    pytest.skip("no free ports")


def test_compose_equivalent_runs_the_demo() -> None:
    """The compose topology (keys, broker with CURVE, its healthcheck, two pools, the client)
    as processes: every demo job done, by workers of both pools, and everything stopped."""
    env = {k: v for k, v in os.environ.items() if k != "RW_CONFIG"}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["RW_PORT_PREFIX"] = str(free_prefix())
    env["COLUMNS"] = "120"
    proc = subprocess.Popen(["bash", str(EQUIVALENT)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=90)
    finally:
        if proc.poll() is None:  # the script's own group: it and whatever it started
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)
    jobs = json.loads((DEPLOY / "compose" / "demo-jobs.json").read_text())
    assert proc.returncode == 0, out
    assert out.count("\n✓ ") + out.startswith("✓ ") == len(jobs), out
    assert "healthcheck: healthy" in out and "CURVE on" in out
    assert re.search(r"pool-a \(pid \d+\) exited 0", out) and re.search(r"pool-b \(pid \d+\) exited 0", out)
    assert re.search(r"broker \(pid \d+\) exited 0", out), out
    # `rw status --once` in a pipe: one plain row per worker, "done" after its state
    done = [int(n) for n in re.findall(r"^\S+:\d+ +default +idle +(\d+) +\d+ +\S+ ago$", out, re.M)]
    assert len(done) == 4 and sum(done) == len(jobs), out


# ---------------------------------------------------------------- journal backup
def backup_copies(journal: str, target: Path) -> None:
    """Both ways docs/deploy.md gives: deploy/backup-journal.py and the sqlite3 shell."""
    done = subprocess.run([sys.executable, str(DEPLOY / "backup-journal.py"), journal, str(target)],
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().endswith(": 12 jobs"), done.stdout
    if shutil.which("sqlite3"):
        shell = target.with_name("shell-copy.sqlite3")
        done = subprocess.run(["sqlite3", journal, f".backup {shell}"], capture_output=True,
                              text=True, timeout=30)
        assert done.returncode == 0 and not done.stderr, done.stderr
        with sqlite3.connect(shell) as db:
            assert db.execute("SELECT count(*) FROM jobs").fetchone()[0] == 12


def test_journal_backed_up_while_the_broker_runs_starts_a_broker(cluster: Cluster) -> None:
    broker = cluster.broker()
    with cluster.client() as client:
        ids = [client.submit(f"job {i}".encode(), id=f"kept-{i}", queue="later") for i in range(12)]
        for job in ids:
            assert client.query(job)["state"] == "queued"
    copy = Path(tempfile.mkdtemp(prefix="rwbak-", dir=cluster.root)) / "journal.sqlite3"
    backup_copies(cluster.journal, copy)
    with cluster.client() as client:  # after the copy: in the live journal, not in the copy
        client.submit(b"late", id="after-backup", queue="later")
    assert broker.popen.poll() is None, broker.output()  # the backup did not disturb it
    broker.signal(signal.SIGTERM)
    assert broker.wait(20) == 0, broker.output()

    # A new broker on the copy: the 12 jobs, payloads and all, run to the end.
    cluster.journal = str(copy)
    cluster.broker()
    cluster.pool("respworkers.examples:Demo", 2, "-q", "later")
    with cluster.client() as client:
        results = {o.id: o for o in client.results(ids, timeout=60)}
        assert {i: results[i].status for i in ids} == {i: "done" for i in ids}
        for n, job in enumerate(ids):
            assert results[job].frames[0].startswith(f"job {n}"[::-1].upper().encode()), results[job].frames
        assert client.query("after-backup") is None or client.query("after-backup")["state"] == "unknown"
    wait_for(lambda: cluster.snapshot()["totals"]["done"] == 12, 10, what="12 jobs done")
