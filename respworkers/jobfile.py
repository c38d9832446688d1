"""Read ``rw submit`` job files: one JSON object, a JSON array, or JSON Lines.

Everything is checked before anything is sent, and every error names the line
(and the field) so the file can be fixed in one go.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
import stat
import sys
from dataclasses import dataclass
from typing import Any, Callable, Union

from . import protocol
from .errors import JobFileError, ProtocolError
from .options import OPTION_FIELDS, check_timeout, check_tries, job_options, parse_expiry, parse_time

FIELDS = ("payload", "payload_b64", "payload_file", "id", "queue", "timeout", "tries",
          *OPTION_FIELDS)
#: A job has exactly one of these.
PAYLOAD_FIELDS = ("payload", "payload_b64", "payload_file")
#: The most payload bytes one ``rw submit`` reads (job file and ``--payload-file`` together):
#: every job is read and checked before anything is sent, and the client holds each one
#: until it ends, so a file naming thousands of large files must not exhaust memory.
MAX_TOTAL = 1 << 30

#: One frame, or several (``payload_b64`` / ``payload_file`` given as a list).
Payload = Union[bytes, "tuple[bytes, ...]"]


@dataclass(frozen=True)
class JobSpec:
    payload: Payload
    id: str | None = None
    queue: str | None = None
    timeout: float | None = None
    tries: int | None = None
    line: int = 0
    #: priority, delay, eta, expires, tenant, backoff, backoff_max: those the job sets
    options: tuple[tuple[str, Any], ...] = ()


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


def size_text(n: int) -> str:
    """``512 bytes``, ``12.3 KiB``, ``1.0 GiB``."""
    if n < 1024:
        return f"{n} byte" + ("" if n == 1 else "s")
    value = float(n)
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        value /= 1024
        if value < 1024 or unit == "TiB":
            break
    return f"{value:.1f} {unit}"


class Budget:
    """How many payload bytes one ``rw submit`` may still read (:data:`MAX_TOTAL` in all)."""

    def __init__(self, limit: int = MAX_TOTAL) -> None:
        self.limit = limit
        self.left = limit

    def take(self, n: int) -> None:
        """Count ``n`` bytes; ValueError once the total is over the limit."""
        if n > self.left:
            raise ValueError(self.over())
        self.left -= n

    def over(self) -> str:
        return (f"the payloads add up to more than {size_text(self.limit)}, the most one "
                "rw submit reads (submit the jobs in several runs)")

    def read(self, path: str) -> bytes:
        """A whole file's bytes, counted; OSError if unreadable, ValueError if they do not
        fit. Reads at most what is left (and a byte), whatever the file is."""
        with open(path, "rb") as fh:  # a folder: IsADirectoryError
            info = os.fstat(fh.fileno())
            if not stat.S_ISREG(info.st_mode):  # a pipe, a device: no size to go by
                return self._took(fh.read(self.left + 1))
            if info.st_size > self.left:
                raise ValueError(self.over())
            data = fh.read(info.st_size + 1)
            if len(data) > info.st_size:  # it grew meanwhile
                data += fh.read(self.left + 1 - len(data))
            return self._took(data)

    def read_stdin(self) -> bytes:
        return self._took(sys.stdin.buffer.read(self.left + 1))

    def _took(self, data: bytes) -> bytes:
        self.take(len(data))
        return data


def read_payload_file(path: str, budget: Budget) -> bytes:
    """The bytes of ``rw submit --payload-file PATH`` ('-': stdin); JobFileError names it."""
    where = "--payload-file " + ("<stdin>" if path == "-" else path)
    try:
        return budget.read_stdin() if path == "-" else budget.read(path)
    except OSError as exc:
        detail = f"cannot read it: {exc.strerror or exc}"
    except ValueError as exc:
        detail = str(exc)
    raise JobFileError(f"{where}: {detail} (nothing was submitted)")


def _b64(value: str) -> bytes:
    """Standard base64 (line breaks and spaces ignored); ValueError if it is not that."""
    try:
        return base64.b64decode("".join(value.split()).encode("ascii"), validate=True)
    except UnicodeEncodeError:
        raise ValueError("not base64: it has characters other than A-Z a-z 0-9 + / =") from None
    except binascii.Error as exc:
        raise ValueError(f"not base64 ({exc})") from None


def _payload(obj: dict[str, Any], where: str, base: str, budget: Budget) -> Payload:
    """The job's payload bytes, from whichever one of :data:`PAYLOAD_FIELDS` it has."""
    given = [k for k in PAYLOAD_FIELDS if k in obj]
    if not given:
        raise JobFileError(f"{where}: missing field 'payload' (or 'payload_b64' or 'payload_file')")
    if len(given) > 1:
        raise JobFileError(f"{where}: fields {given[0]!r} and {given[1]!r} both given: "
                           "a job has one of 'payload', 'payload_b64', 'payload_file'")
    key = given[0]
    value = obj[key]
    if key == "payload":
        data = value.encode() if isinstance(value, str) else json.dumps(value).encode()
        try:
            budget.take(len(data))
        except ValueError as exc:
            raise JobFileError(f"{where}: field 'payload': {exc}") from None
        return data
    if isinstance(value, str):
        return _frame(key, value, f"{where}: field {key!r}", base, budget)
    if isinstance(value, list) and value and all(isinstance(item, str) for item in value):
        return tuple(_frame(key, item, f"{where}: field {key!r}[{i}]", base, budget)
                     for i, item in enumerate(value))
    if value == []:
        raise JobFileError(f"{where}: field {key!r}: an empty list (a payload has at least one frame)")
    raise JobFileError(f"{where}: field {key!r} must be a string or a list of strings")


def _frame(key: str, value: str, where: str, base: str, budget: Budget) -> bytes:
    """One frame of a ``payload_b64`` or ``payload_file`` field; ``where`` names the field."""
    try:
        if key == "payload_b64":
            data = _b64(value)
            budget.take(len(data))
            return data
        if not value:
            raise ValueError("an empty path")
        path = os.path.join(base, value) if base else value
        try:
            return budget.read(path)
        except OSError as exc:
            raise ValueError(f"cannot read {path}: {exc.strerror or exc}") from None
        except ValueError as exc:
            raise ValueError(f"{path}: {exc}") from None
    except ValueError as exc:
        raise JobFileError(f"{where}: {exc}") from None


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


def _field(name: str) -> str:
    return f"field {name!r}"


def _check(obj: Any, where: str, line: int, base: str, budget: Budget) -> JobSpec:
    if not isinstance(obj, dict):
        raise JobFileError(f"{where}: a job must be a JSON object, got {type(obj).__name__}")
    unknown = [k for k in obj if k not in FIELDS]
    if unknown:
        raise JobFileError(
            f"{where}: unknown field {unknown[0]!r} (a job has: {', '.join(FIELDS)})"
        )
    payload = _payload(obj, where, base, budget)
    job_id = _name(obj, "id", protocol.check_job_id, where)
    queue = _name(obj, "queue", protocol.check_queue, where)
    try:
        timeout = check_timeout(obj.get("timeout"), "field 'timeout'")
        tries = check_tries(obj.get("tries"), "field 'tries'")
        options = {k: obj[k] for k in OPTION_FIELDS if obj.get(k) is not None}
        if "eta" in options:
            options["eta"] = parse_time(options["eta"], "field 'eta'")
        if "expires" in options:
            options["expires"] = parse_expiry(options["expires"], "field 'expires'")
        job_options(**options, label=_field)  # checked now, made relative when sent
    except ValueError as exc:
        raise JobFileError(f"{where}: {exc}") from None
    return JobSpec(payload, job_id, queue, timeout, tries, line, tuple(options.items()))


def content_ids(content: bytes) -> Callable[[int], str]:
    """Default ids for a file's jobs: its content's hash and the job's place (1-based).

    Submitting the same file again names the same jobs, so the broker attaches to
    them instead of running them twice (an interrupted ``rw submit`` can be re-run).
    """
    digest = hashlib.sha256(content).hexdigest()[:16]
    return lambda index: f"{digest}-{index}"


def parse(text: str, source: str, *, base: str = "", budget: Budget | None = None) -> list[JobSpec]:
    """Parse a whole job file; raise :class:`JobFileError` naming ``source``, line and field.

    ``payload_file`` paths are relative to the folder ``base`` (the job file's; "": the
    current one, as for stdin). The files are read here, so every job is known before any
    is sent; ``budget`` bounds the bytes of all payloads together (default: :data:`MAX_TOTAL`).
    """
    budget = Budget() if budget is None else budget
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
            jobs.append(_check(obj, f"{source}: line {line} (job {n})", line, base, budget))
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
            jobs.append(_check(whole, f"{source}: line {line}", line, base, budget))
        else:
            for i, raw in enumerate(lines, 1):
                if not raw.strip():
                    continue
                try:
                    obj = json.loads(raw)
                except json.JSONDecodeError as exc:
                    raise JobFileError(f"{source}: line {i}: invalid JSON: {exc.msg}") from None
                jobs.append(_check(obj, f"{source}: line {i}", i, base, budget))
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
