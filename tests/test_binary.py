"""Binary jobs through `rw`: payloads from base64 and files, results to files, never raw bytes
on a terminal. Real broker and worker processes; the job-file error cases are parsed alone."""

from __future__ import annotations

import base64
import json
import os
from pathlib import Path

import pytest

from respworkers.errors import JobFileError
from respworkers.jobfile import parse
from respworkers.session import JobResult

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
