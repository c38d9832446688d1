"""Read ``rw submit`` job files: one JSON object, a JSON array, or JSON Lines.

Everything is checked before anything is sent, and every error names the line
(and the field) so the file can be fixed in one go.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any, Callable

from . import protocol
from .errors import JobFileError, ProtocolError
from .options import check_timeout, check_tries

FIELDS = ("payload", "id", "queue", "timeout", "tries")


@dataclass(frozen=True)
class JobSpec:
    payload: bytes
    id: str | None = None
    queue: str | None = None
    timeout: float | None = None
    tries: int | None = None
    line: int = 0


class _Lines:
    """Line numbers of increasing positions in one text, in linear time overall.

    Counting newlines from the start for every job made parsing an array quadratic
    (40,000 jobs took half a minute); this counts each newline once.
    """

    def __init__(self, text: str) -> None:
        self.text = text
        self.pos = 0
        self.line = 1

    def at(self, pos: int) -> int:
        """The 1-based line of ``pos``; positions must not decrease between calls."""
        if pos < self.pos:
            raise ValueError("positions must not decrease")
        self.line += self.text.count("\n", self.pos, pos)
        self.pos = pos
        return self.line


def _name(obj: dict[str, Any], key: str, check: Callable[[bytes], str], where: str) -> str | None:
    """An optional string field validated by the protocol's own rule for it."""
    value = obj.get(key)
    if value is None:
        return None
    if not isinstance(value, str):
        raise JobFileError(f"{where}: field {key!r} must be a string")
    try:
        return check(value.encode())
    except ProtocolError as exc:
        raise JobFileError(f"{where}: field {key!r}: {exc.detail}") from None


def _check(obj: Any, where: str, line: int) -> JobSpec:
    if not isinstance(obj, dict):
        raise JobFileError(f"{where}: a job must be a JSON object, got {type(obj).__name__}")
    unknown = [k for k in obj if k not in FIELDS]
    if unknown:
        raise JobFileError(
            f"{where}: unknown field {unknown[0]!r} (a job has: {', '.join(FIELDS)})"
        )
    if "payload" not in obj:
        raise JobFileError(f"{where}: missing field 'payload'")
    value = obj["payload"]
    payload = value.encode() if isinstance(value, str) else json.dumps(value).encode()
    job_id = _name(obj, "id", protocol.check_job_id, where)
    queue = _name(obj, "queue", protocol.check_queue, where)
    try:
        timeout = check_timeout(obj.get("timeout"), "field 'timeout'")
        tries = check_tries(obj.get("tries"), "field 'tries'")
    except ValueError as exc:
        raise JobFileError(f"{where}: {exc}") from None
    return JobSpec(payload, job_id, queue, timeout, tries, line)


def content_ids(content: bytes) -> Callable[[int], str]:
    """Default ids for a file's jobs: its content's hash and the job's place (1-based).

    Submitting the same file again names the same jobs, so the broker attaches to
    them instead of running them twice (an interrupted ``rw submit`` can be re-run).
    """
    digest = hashlib.sha256(content).hexdigest()[:16]
    return lambda index: f"{digest}-{index}"


def parse(text: str, source: str) -> list[JobSpec]:
    """Parse a whole job file; raise :class:`JobFileError` naming ``source``, line and field."""
    stripped = text.lstrip()
    if not stripped:
        raise JobFileError(f"{source}: no jobs (the file is empty)")
    decoder = json.JSONDecoder()
    jobs: list[JobSpec] = []
    lines_of = _Lines(text)
    if stripped[0] == "[":
        pos = text.index("[") + 1
        n = 0
        while True:
            while pos < len(text) and text[pos] in " \t\r\n":
                pos += 1
            if pos < len(text) and text[pos] == "]" and n == 0:
                pos += 1
                break
            n += 1
            line = lines_of.at(pos)
            try:
                obj, pos = decoder.raw_decode(text, pos)
            except json.JSONDecodeError as exc:
                raise JobFileError(f"{source}: line {exc.lineno}: invalid JSON: {exc.msg}") from None
            jobs.append(_check(obj, f"{source}: line {line} (job {n})", line))
            while pos < len(text) and text[pos] in " \t\r\n":
                pos += 1
            if pos < len(text) and text[pos] == ",":
                pos += 1
                continue
            if pos < len(text) and text[pos] == "]":
                pos += 1
                break
            raise JobFileError(
                f"{source}: line {lines_of.at(pos)}: invalid JSON: expected ',' or ']'"
            )
        tail = text[pos:]
        if tail.strip():
            extra = pos + len(tail) - len(tail.lstrip())
            raise JobFileError(f"{source}: line {lines_of.at(extra)}: text after the array")
    else:
        try:
            whole = json.loads(text)
        except json.JSONDecodeError:
            whole = None
            lines = text.split("\n")  # not splitlines(): JSON strings may hold U+2028 etc.
        else:
            lines = []
        if whole is not None:
            line = lines_of.at(len(text) - len(stripped))
            jobs.append(_check(whole, f"{source}: line {line}", line))
        else:
            for i, raw in enumerate(lines, 1):
                if not raw.strip():
                    continue
                try:
                    obj = json.loads(raw)
                except json.JSONDecodeError as exc:
                    raise JobFileError(f"{source}: line {i}: invalid JSON: {exc.msg}") from None
                jobs.append(_check(obj, f"{source}: line {i}", i))
    if not jobs:
        raise JobFileError(f"{source}: no jobs (the array is empty)")
    seen: dict[str, int] = {}
    for job in jobs:
        if job.id is not None:
            if job.id in seen:
                raise JobFileError(
                    f"{source}: line {job.line}: id {job.id!r} already used on line {seen[job.id]}"
                )
            seen[job.id] = job.line
    return jobs
