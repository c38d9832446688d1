"""Binary jobs through `rw`: payloads from base64 and files, results to files, never raw bytes
on a terminal. Real broker and worker processes; the job-file error cases are parsed alone."""

from __future__ import annotations

import base64

import pytest

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
