"""Binary jobs through `rw`: payloads from base64 and files, results to files, never raw bytes
on a terminal. Real broker and worker processes; the job-file error cases are parsed alone."""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from respworkers.errors import JobFileError
from respworkers.jobfile import parse
from respworkers.session import JobResult

from conftest import Cluster

pytestmark = pytest.mark.timeout(60)

#: Not UTF-8 (0x80.. alone, 0xff), with NUL, newlines and an escape character among them.
BLOB = bytes(range(256)) + b"\xff\xd8\xff\xe0"


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def test_json_of_a_result_is_its_text_or_base64_and_each_frame() -> None:
    def done(*frames: bytes) -> dict:
        return JobResult("j", "done", list(frames)).as_dict()

    assert done(b"caf\xc3\xa9") == {"id": "j", "status": "done", "result": "café"}
    assert done(b"\xff\x00") == {"id": "j", "status": "done", "result_b64": "/wA="}
    assert done(b"\xff", b"ab") == {"id": "j", "status": "done", "result_b64": "/2Fi",
                                    "result_frames_b64": ["/w==", "YWI="]}
    assert done(b"a", b"b") == {"id": "j", "status": "done", "result": "ab",
                                "result_frames_b64": ["YQ==", "Yg=="]}
    assert JobResult("f", "failed", None, "error", "boom").as_dict() == {
        "id": "f", "status": "failed", "reason": "error", "error": "boom"}


# ============================================================================ errors
@pytest.mark.parametrize(
    "job, message",
    [
        ({"payload_b64": "not base64!"}, "field 'payload_b64': not base64"),
        ({"payload_b64": "AAE"}, "field 'payload_b64': not base64 (Incorrect padding)"),
        ({"payload_b64": "AAé="}, "field 'payload_b64': not base64"),
        ({"payload_b64": ["AAE=", "A-_="]}, "field 'payload_b64'[1]: not base64"),
        ({"payload_file": "nope.bin"}, "field 'payload_file': cannot read {dir}/nope.bin: No such file"),
        ({"payload_file": ["ok.bin", "nope.bin"]}, "field 'payload_file'[1]: cannot read {dir}/nope.bin"),
        ({"payload_file": "folder"}, "field 'payload_file': cannot read {dir}/folder: Is a directory"),
        ({"payload_file": ""}, "field 'payload_file': an empty path"),
        ({"payload_b64": []}, "field 'payload_b64': an empty list"),
        ({"payload_file": []}, "field 'payload_file': an empty list"),
        ({"payload_file": 3}, "field 'payload_file' must be a string or a list of strings"),
        ({"payload_b64": ["AAE=", 1]}, "field 'payload_b64' must be a string or a list of strings"),
        ({"payload": "x", "payload_b64": "AAE="}, "fields 'payload' and 'payload_b64' both given"),
        ({"payload_b64": "AAE=", "payload_file": "ok.bin"},
         "fields 'payload_b64' and 'payload_file' both given"),
        ({"id": "x"}, "missing field 'payload' (or 'payload_b64' or 'payload_file')"),
    ],
)
def test_job_file_errors_name_the_line_and_the_field(tmp_path: Path, job: dict, message: str) -> None:
    (tmp_path / "ok.bin").write_bytes(b"ok")
    (tmp_path / "folder").mkdir()
    text = '[\n  {"payload": "fine"},\n  ' + json.dumps(job) + "\n]\n"
    with pytest.raises(JobFileError) as err:
        parse(text, "jobs.json", base=str(tmp_path))
    assert str(err.value).startswith(f"jobs.json: line 3 (job 2): {message.format(dir=tmp_path)}"), err.value
    # JSON Lines: the same, on its line
    with pytest.raises(JobFileError) as err:
        parse('{"payload": "fine"}\n\n' + json.dumps(job) + "\n", "f", base=str(tmp_path))
    assert str(err.value).startswith(f"f: line 3: {message.format(dir=tmp_path)}"), err.value


def test_an_unreadable_payload_file_is_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import respworkers.jobfile

    secret = tmp_path / "secret.bin"
    secret.write_bytes(b"x")
    secret.chmod(0)
    if os.geteuid() == 0:  # root reads files whatever their mode: refuse it the way the kernel would
        def refuse(path: str, *args: object) -> None:
            raise PermissionError(13, os.strerror(13), path)

        monkeypatch.setattr(respworkers.jobfile, "open", refuse, raising=False)
    with pytest.raises(JobFileError,
                       match=r"^f: line 2: field 'payload_file': cannot read .*secret.bin: Permission"):
        parse('{"payload": "a"}\n{"payload_file": "secret.bin"}', "f", base=str(tmp_path))


def test_payloads_past_the_total_bound_are_refused_naming_the_line(tmp_path: Path) -> None:
    from respworkers.jobfile import Budget

    (tmp_path / "big.bin").write_bytes(b"x" * 600)
    text = '{"payload_file": "big.bin"}\n{"payload_b64": ["' + b64(b"y" * 300) + '"]}\n'
    assert len(parse(text, "f", base=str(tmp_path), budget=Budget(900))) == 2
    with pytest.raises(JobFileError, match=r"^f: line 2: field 'payload_b64'\[0\]: the payloads add up "
                                           r"to more than 899 bytes"):
        parse(text, "f", base=str(tmp_path), budget=Budget(899))
    with pytest.raises(JobFileError, match=r"^f: line 1: field 'payload_file': .*big.bin: the payloads"):
        parse(text, "f", base=str(tmp_path), budget=Budget(599))


# ============================================================================ rw submit
@pytest.fixture(scope="module")
def grid() -> Iterator[Cluster]:
    """One broker, a `Bytes` worker (queue bytes: answers the payload reversed) and a `Frames`
    worker (queue frames: each frame reversed, in reverse order), shared by this module."""
    root = Path(tempfile.mkdtemp(prefix="rw-", dir="/tmp"))  # ipc paths must stay short
    c = Cluster(root)
    try:
        c.broker()
        c.pool("jobs_fixtures:Bytes", 1)
        c.pool("jobs_fixtures:Frames", 1)
        yield c
    finally:
        c.cleanup()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def here(grid: Cluster, request: pytest.FixtureRequest) -> Path:
    """A fresh working folder for one test."""
    d = grid.root / request.node.name.replace("[", "_").replace("]", "")
    d.mkdir()
    return d


def rw(c: Cluster, cwd: Path, *args: str, input: bytes = b"") -> subprocess.CompletedProcess[bytes]:
    """Run ``rw ARGS --broker ...`` in ``cwd``; stdout and stderr as bytes (they may not be text)."""
    return subprocess.run(
        [sys.executable, "-m", "respworkers", *args, "--broker", c.clients], cwd=cwd, env=c.env,
        capture_output=True, input=input, timeout=50,
    )


def lines(stdout: bytes) -> dict[str, dict]:
    return {d["id"]: d for d in map(json.loads, stdout.decode().splitlines())}


def submitted(c: Cluster) -> int:
    return int(c.snapshot()["totals"]["submitted"])


def test_payload_b64_carries_any_bytes_and_json_gives_result_b64(grid: Cluster, here: Path) -> None:
    text = "\n".join(json.dumps(job) for job in [
        {"payload_b64": b64(BLOB), "id": "b64-blob", "queue": "bytes"},
        # wrapped like `base64` prints it: line breaks and spaces are ignored
        {"payload_b64": "aGVs\nbG8=", "id": "b64-text", "queue": "bytes"},
    ])
    r = rw(grid, here, "submit", "-", "--json", input=text.encode())
    assert r.returncode == 0, r.stderr
    got = lines(r.stdout)
    assert got["b64-blob"]["status"] == "done"
    assert base64.b64decode(got["b64-blob"]["result_b64"]) == BLOB[::-1]
    assert "result" not in got["b64-blob"] and "result_hex" not in got["b64-blob"]
    assert got["b64-text"]["result"] == "olleh" and "result_b64" not in got["b64-text"]


def test_payload_file_is_read_relative_to_the_job_files_folder(grid: Cluster, here: Path) -> None:
    (here / "jobs").mkdir()
    photo = BLOB + b"photo"
    (here / "jobs" / "cat.jpg").write_bytes(photo)
    (here / "jobs" / "jobs.json").write_text(json.dumps(
        [{"payload_file": "cat.jpg", "id": "rel-cat", "queue": "bytes"}]))
    assert not (here / "cat.jpg").exists()  # not found from the working folder
    r = rw(grid, here, "submit", "jobs/jobs.json", "--json")
    assert r.returncode == 0, r.stderr
    assert base64.b64decode(lines(r.stdout)["rel-cat"]["result_b64"]) == photo[::-1]
    # from stdin, relative to the working folder
    r = rw(grid, here, "submit", "-", "--json",
           input=json.dumps({"payload_file": "jobs/cat.jpg", "id": "rel-stdin", "queue": "bytes"}).encode())
    assert r.returncode == 0, r.stderr
    assert base64.b64decode(lines(r.stdout)["rel-stdin"]["result_b64"]) == photo[::-1]


def test_payload_file_option_reads_files_and_stdin_as_bytes(grid: Cluster, here: Path) -> None:
    (here / "a.bin").write_bytes(BLOB + b"a")
    (here / "jobs.json").write_text(json.dumps({"payload": "text", "id": "opt-text"}))
    r = rw(grid, here, "submit", "jobs.json", "--payload-file", "a.bin", "--payload-file", "-",
           "-p", "dash-p", "--queue", "bytes", "--json", input=BLOB + b"stdin")
    assert r.returncode == 0, r.stderr
    got = lines(r.stdout)
    assert len(got) == 4 and got.pop("opt-text")["result"] == "txet"
    results = sorted(base64.b64decode(d["result_b64"]) if "result_b64" in d else d["result"].encode()
                     for d in got.values())
    assert results == sorted([(BLOB + b"a")[::-1], (BLOB + b"stdin")[::-1], b"p-hsad"])


def test_a_list_is_a_multi_frame_payload_and_json_gives_the_frames(grid: Cluster, here: Path) -> None:
    (here / "one.bin").write_bytes(b"\x00\x01\xfe")
    (here / "two.bin").write_bytes(b"\xff\x02")
    (here / "jobs.json").write_text(json.dumps([
        {"payload_b64": [b64(b"ab"), b64(b"\x80cd")], "id": "frames-b64", "queue": "frames"},
        {"payload_file": ["one.bin", "two.bin"], "id": "frames-file", "queue": "frames"},
    ]))
    r = rw(grid, here, "submit", "jobs.json", "--json")
    assert r.returncode == 0, r.stderr
    got = lines(r.stdout)
    # Frames answers each frame reversed, in reverse order
    frames = [base64.b64decode(f) for f in got["frames-b64"]["result_frames_b64"]]
    assert frames == [b"dc\x80", b"ba"]
    assert base64.b64decode(got["frames-b64"]["result_b64"]) == b"dc\x80ba"  # joined
    frames = [base64.b64decode(f) for f in got["frames-file"]["result_frames_b64"]]
    assert frames == [b"\x02\xff", b"\xfe\x01\x00"]


def test_submit_with_a_missing_payload_file_names_it_and_submits_nothing(grid: Cluster, here: Path) -> None:
    before = submitted(grid)
    (here / "jobs.json").write_text('[{"payload": "a"},\n {"payload_file": "gone.jpg"}]')
    r = rw(grid, here, "submit", "jobs.json", "--queue", "bytes")
    assert r.returncode == 2
    assert r.stderr.decode().startswith(
        "rw: jobs.json: line 2 (job 2): field 'payload_file': cannot read gone.jpg: No such file"), r.stderr
    assert b"nothing was submitted" in r.stderr
    r = rw(grid, here, "submit", "-p", "a", "--payload-file", "gone.jpg", "--queue", "bytes")
    assert r.returncode == 2
    assert b"--payload-file gone.jpg: cannot read it: No such file" in r.stderr, r.stderr
    r = rw(grid, here, "submit", "-", "--payload-file", "-", "--queue", "bytes")
    assert r.returncode == 2 and b"stdin can be read once" in r.stderr, r.stderr
    assert submitted(grid) == before


# ============================================================================ results
def test_out_writes_results_to_files_with_safe_names(grid: Cluster, here: Path) -> None:
    (here / "jobs.json").write_text(json.dumps([
        {"payload_b64": b64(BLOB), "id": "img/cat.jpg", "queue": "bytes"},
        {"payload": "dots", "id": "..", "queue": "bytes"},
        {"payload": "single", "id": "x.0", "queue": "bytes"},  # must not clash with x's frame 0
        {"payload_b64": [b64(b"one"), b64(b"\xfftwo")], "id": "x", "queue": "frames"},
    ]))
    r = rw(grid, here, "submit", "jobs.json", "--out", "thumbs")
    assert r.returncode == 0, r.stderr
    out = here / "thumbs"  # created: its parent exists
    assert sorted(p.name for p in out.iterdir()) == ["%2E.", "img%2Fcat.jpg", "x%2E0", "x.0", "x.1"]
    assert (out / "img%2Fcat.jpg").read_bytes() == BLOB[::-1]
    assert (out / "%2E.").read_bytes() == b"stod"
    assert (out / "x%2E0").read_bytes() == b"elgnis"
    assert [(out / n).read_bytes() for n in ("x.0", "x.1")] == [b"owt\xff", b"eno"]
    assert sorted(p.name for p in here.iterdir()) == ["jobs.json", "thumbs"]  # nothing elsewhere
    shown = r.stdout.decode().splitlines()
    assert "✓ img/cat.jpg  -> thumbs/img%2Fcat.jpg (260 bytes)" in shown
    assert "✓ x  -> thumbs/x.0, thumbs/x.1 (2 files, 7 bytes)" in shown
    assert BLOB[::-1] not in r.stdout

    # rw result fetches them again, into another folder; --json names the files
    r = rw(grid, here, "result", "img/cat.jpg", "x", "--out", "again", "--json")
    assert r.returncode == 0, r.stderr
    got = lines(r.stdout)
    assert got["img/cat.jpg"] == {"id": "img/cat.jpg", "status": "done",
                                  "files": ["again/img%2Fcat.jpg"]}
    assert got["x"]["files"] == ["again/x.0", "again/x.1"]
    assert (here / "again" / "img%2Fcat.jpg").read_bytes() == BLOB[::-1]


def test_out_folder_whose_parent_is_missing_submits_nothing(grid: Cluster, here: Path) -> None:
    before = submitted(grid)
    r = rw(grid, here, "submit", "-p", "x", "--queue", "bytes", "--out", "no/such/folder")
    assert r.returncode == 2 and b"its parent folder no/such does not exist" in r.stderr, r.stderr
    assert not (here / "no").exists() and submitted(grid) == before


def test_a_binary_result_shows_its_size_and_first_bytes_never_raw(grid: Cluster, here: Path) -> None:
    (here / "jobs.json").write_text(json.dumps([
        {"payload_b64": b64(BLOB), "id": "bin-1", "queue": "bytes"},
        {"payload_b64": b64(b"J2[\x1bhi"), "id": "bin-esc", "queue": "bytes"},  # UTF-8, but an escape
        {"payload": "plain text", "id": "bin-text", "queue": "bytes"},
    ]))
    r = rw(grid, here, "submit", "jobs.json")
    assert r.returncode == 0, r.stderr
    shown = r.stdout.decode().splitlines()  # UTF-8 text: nothing raw
    assert "✓ bin-1  <binary, 260 bytes: e0ffd8fffffefdfc…>" in shown
    assert "✓ bin-esc  <binary, 6 bytes: 69681b5b324a>" in shown
    assert "✓ bin-text  txet nialp" in shown
    assert b"\x1b" not in r.stdout and b"\x00" not in r.stdout

    term = grid.rw_tty("result", "bin-1", "--broker", grid.clients, name="result")
    assert term.wait(30) == 0
    assert "✓ bin-1  <binary, 260 bytes: e0ffd8fffffefdfc…>" in term.lines()
    assert b"\xd8\xff\xe0" not in term.log.read_bytes() and b"\x00" not in term.log.read_bytes()
