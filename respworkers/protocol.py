"""The respworkers wire protocol (RWP/1): the only module that builds, parses and validates frames.

docs/protocol.md is the normative text; this module is its executable form. Every
``decode_*`` function takes the frames as received (after the ROUTER identity has
been split off by the caller) and either returns a small typed record or raises
:class:`ProtocolError` with a short ``reason``. Every ``encode_*`` function returns
the list of frames to send (without a ROUTER identity).

No other module spells a frame literal.
"""

from __future__ import annotations

import json
from typing import Any, NamedTuple, Union

from .errors import ProtocolError

# --- version headers -------------------------------------------------------------------------
CLIENT = b"RWC1"  #: client <-> broker, on the clients endpoint
WORKER = b"RWW1"  #: worker <-> broker, on the workers endpoint
STATUS = b"RWS1"  #: anyone <-> broker, on the status endpoint

# --- client commands (client -> broker) -------------------------------------------------------
SUBMIT = b"SUBMIT"
WAIT = b"WAIT"
QUERY = b"QUERY"
CANCEL = b"CANCEL"
PING = b"PING"

# --- broker -> client ---------------------------------------------------------------------------
ACCEPTED = b"ACCEPTED"
RESULT = b"RESULT"
FAILED = b"FAILED"
CANCELLED = b"CANCELLED"
REFUSED = b"REFUSED"
INFO = b"INFO"
UNKNOWN = b"UNKNOWN"
PONG = b"PONG"
INVALID = b"INVALID"

# --- worker -> broker ---------------------------------------------------------------------------
HELLO = b"HELLO"
# RESULT (shared name with the client side)
ERROR = b"ERROR"
HEARTBEAT = b"HEARTBEAT"
RETURN = b"RETURN"
BYE = b"BYE"

# --- broker -> worker ---------------------------------------------------------------------------
WELCOME = b"WELCOME"
JOB = b"JOB"
# HEARTBEAT
DISCONNECT = b"DISCONNECT"

# --- status -------------------------------------------------------------------------------------
STATUS_REQ = b"STATUS"
SNAPSHOT = b"SNAPSHOT"

#: Reasons a job can fail with (third frame of FAILED).
FAIL_TIMEOUT = "timeout"
FAIL_ERROR = "error"
FAIL_LOST = "worker-lost"
FAIL_CANCELLED = "cancelled"

#: Codes of REFUSED.
REFUSE_FULL = "full"
REFUSE_INVALID = "invalid"
REFUSE_LIMIT = "limit"
REFUSE_SHUTDOWN = "shutdown"

MAX_ID_BYTES = 200
MAX_QUEUE_BYTES = 64
MAX_INFO_BYTES = 8192  #: JSON frames peers send the broker (HELLO info)
MAX_REPLY_INFO_BYTES = 64 << 20  #: INFO from the broker carries tracebacks
DEFAULT_QUEUE = "default"
MAX_WORKER_QUEUES = 64  #: queues one worker may serve

_QUEUE_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-")
_EMPTY = b""


# ================================================================================================
# field codecs
# ================================================================================================


def check_job_id(raw: bytes) -> str:
    """A job id is 1..200 bytes of printable UTF-8 without whitespace."""
    if not raw or len(raw) > MAX_ID_BYTES:
        raise ProtocolError("bad job id", f"must be 1..{MAX_ID_BYTES} bytes, got {len(raw)}")
    try:
        text = raw.decode()
    except UnicodeDecodeError:
        raise ProtocolError("bad job id", "not UTF-8") from None
    if not text.isprintable() or " " in text:
        raise ProtocolError("bad job id", f"{text!r} has whitespace or control characters")
    return text


_known_queues: dict[bytes, str] = {}


def check_queue(raw: bytes) -> str:
    """A queue name is 1..64 characters of ``[A-Za-z0-9._-]``; valid names are memoised."""
    name = _known_queues.get(raw)
    if name is not None:
        return name
    try:
        text = raw.decode("ascii")
    except UnicodeDecodeError:
        raise ProtocolError("bad queue", "queue names are ASCII") from None
    if not text or len(text) > MAX_QUEUE_BYTES or not set(text) <= _QUEUE_CHARS:
        raise ProtocolError("bad queue", f"{text!r} is not 1..64 of [A-Za-z0-9._-]")
    if len(_known_queues) < 10_000:  # bounded: hostile peers must not grow memory
        _known_queues[raw] = text
    return text


def _uint(raw: bytes, what: str, minimum: int = 0) -> int:
    if not raw.isdigit() or len(raw) > 12:
        raise ProtocolError(f"bad {what}", f"{raw[:20]!r} is not a decimal number")
    value = int(raw)
    if value < minimum:
        raise ProtocolError(f"bad {what}", f"must be >= {minimum}")
    return value


def _opt_uint(raw: bytes, what: str, minimum: int) -> int | None:
    return None if not raw else _uint(raw, what, minimum)


def _flag(raw: bytes, what: str) -> bool:
    if raw == b"1":
        return True
    if raw == b"0":
        return False
    raise ProtocolError(f"bad {what}", "must be '0' or '1'")


def _json_object(raw: bytes, what: str, limit: int = MAX_INFO_BYTES) -> dict[str, Any]:
    if len(raw) > limit:
        raise ProtocolError(f"bad {what}", f"larger than {limit} bytes")
    try:
        value = json.loads(raw) if raw else {}
    except (ValueError, RecursionError) as exc:  # RecursionError: hostile deep nesting
        raise ProtocolError(f"bad {what}", f"not JSON ({exc})") from None
    if not isinstance(value, dict):
        raise ProtocolError(f"bad {what}", "not a JSON object")
    return value


def _text(raw: bytes) -> str:
    return raw.decode("utf-8", "replace")


def as_frames(value: Any, what: str) -> list[bytes]:
    """bytes-like or str (UTF-8) -> one frame; a non-empty list/tuple of them -> frames.

    Both sides of a job use it: the client for payloads, the worker for results.
    """
    if isinstance(value, (bytes, bytearray, memoryview)):
        return [bytes(value)]
    if isinstance(value, str):
        return [value.encode()]
    if isinstance(value, (list, tuple)) and value:
        out = []
        for item in value:
            if isinstance(item, str):
                item = item.encode()
            if not isinstance(item, (bytes, bytearray, memoryview)):
                raise TypeError(f"{what} has a frame of type {type(item).__name__}, not bytes")
            out.append(bytes(item))
        return out
    raise TypeError(f"{what} must be bytes, str or a non-empty list of them, "
                    f"got {type(value).__name__}")


def _ms(seconds: float | None) -> bytes:
    return b"" if seconds is None else str(max(1, round(seconds * 1000))).encode()


def _n(value: int | None) -> bytes:
    return b"" if value is None else str(value).encode()


# ================================================================================================
# clients endpoint
# ================================================================================================


class Submit(NamedTuple):
    job_id: str
    queue: str
    timeout: float | None  # seconds; None = broker default
    tries: int | None  # None = broker default
    payload: list[bytes]


class Plain(NamedTuple):
    """A request from a plain REQ socket: all frames after the delimiter are the payload."""

    payload: list[bytes]


class JobRef(NamedTuple):
    command: bytes  # WAIT, QUERY or CANCEL
    job_id: str


class Ping(NamedTuple):
    pass


ClientRequest = Union[Submit, Plain, JobRef, Ping]


def decode_client(frames: list[bytes]) -> ClientRequest:
    """Decode what a client sent (frames after the ROUTER identity).

    Both kinds of client put an empty delimiter first: REQ does so itself, a
    DEALER must add it. A request whose first frame after the delimiter is not
    the ``RWC1`` header is a plain request, so any REQ socket is a client.
    """
    if len(frames) < 2 or frames[0]:
        raise ProtocolError("no delimiter", "client messages start with an empty frame")
    if frames[1] != CLIENT:
        if len(frames[1]) == 4 and frames[1].startswith(b"RWC"):
            raise ProtocolError("unsupported version", f"{frames[1]!r}; this broker speaks RWC1")
        return Plain(frames[1:])
    if len(frames) < 3:
        raise ProtocolError("no command", "RWC1 header without a command frame")
    cmd = frames[2]
    if cmd == SUBMIT:
        if len(frames) < 8:
            raise ProtocolError("short SUBMIT", "needs id, queue, timeout, tries and >= 1 payload")
        timeout = _opt_uint(frames[5], "timeout", 1)
        return Submit(
            check_job_id(frames[3]),
            check_queue(frames[4]) if frames[4] else DEFAULT_QUEUE,
            None if timeout is None else timeout / 1000.0,
            _opt_uint(frames[6], "tries", 1),
            frames[7:],
        )
    if cmd in (WAIT, QUERY, CANCEL):
        if len(frames) != 4:
            raise ProtocolError(f"bad {cmd.decode()}", "needs exactly one job id frame")
        return JobRef(cmd, check_job_id(frames[3]))
    if cmd == PING:
        return Ping()
    raise ProtocolError("unknown command", repr(cmd[:20]))


def encode_submit(
    job_id: str, queue: str, timeout: float | None, tries: int | None, payload: list[bytes]
) -> list[bytes]:
    if not payload:
        raise ValueError("a job needs at least one payload frame")
    return [_EMPTY, CLIENT, SUBMIT, job_id.encode(), queue.encode(), _ms(timeout), _n(tries), *payload]


def encode_job_ref(command: bytes, job_id: str) -> list[bytes]:
    return [_EMPTY, CLIENT, command, job_id.encode()]


def encode_ping() -> list[bytes]:
    return [_EMPTY, CLIENT, PING]


# --- broker -> client ------------------------------------------------------------------------


def encode_accepted(job_ids: list[bytes]) -> list[bytes]:
    """ACCEPTED confirms one or more jobs (the broker batches them per client)."""
    return [_EMPTY, CLIENT, ACCEPTED, *job_ids]


def encode_result(job_id: str, payload: list[bytes]) -> list[bytes]:
    return [_EMPTY, CLIENT, RESULT, job_id.encode(), *payload]


def encode_failed(job_id: str, reason: str, error: str) -> list[bytes]:
    return [_EMPTY, CLIENT, FAILED, job_id.encode(), reason.encode(), error.encode()]


def encode_cancelled(job_id: str) -> list[bytes]:
    return [_EMPTY, CLIENT, CANCELLED, job_id.encode()]


def encode_refused(job_id: str, code: str, text: str) -> list[bytes]:
    return [_EMPTY, CLIENT, REFUSED, job_id.encode(), code.encode(), text.encode()]


def encode_info(job_id: str, info: dict[str, Any]) -> list[bytes]:
    return [_EMPTY, CLIENT, INFO, job_id.encode(), json.dumps(info).encode()]


def encode_unknown(job_id: str) -> list[bytes]:
    return [_EMPTY, CLIENT, UNKNOWN, job_id.encode()]


def encode_pong(broker_id: str, limits: dict[str, Any]) -> list[bytes]:
    """PONG carries the broker's id (a new id means a restart) and its limits, as JSON."""
    return [_EMPTY, CLIENT, PONG, broker_id.encode(), json.dumps(limits).encode()]


def decode_pong(reply: Reply) -> tuple[str, dict[str, Any]]:
    if not reply.frames:
        raise ProtocolError("bad PONG", "no broker id")
    limits = _json_object(reply.frames[1], "limits") if len(reply.frames) > 1 else {}
    return _text(reply.frames[0]), limits


def encode_invalid(reason: str) -> list[bytes]:
    return [_EMPTY, CLIENT, INVALID, reason.encode()]


def encode_plain_reply(payload: list[bytes] | None) -> list[bytes]:
    """Reply to a plain REQ: the result frames, or one empty frame when the job failed."""
    return [_EMPTY, *payload] if payload else [_EMPTY, _EMPTY]


class Reply(NamedTuple):
    """What a client receives: ``command`` plus the job id and the rest, decoded."""

    command: bytes
    job_id: str
    # RESULT: result frames; FAILED: [reason, error]; REFUSED: [code, text];
    # ACCEPTED: the further job ids it confirms (job_id is the first)
    frames: list[bytes]
    info: dict[str, Any] | None = None  # INFO only


def decode_reply(frames: list[bytes]) -> Reply:
    """Decode what the broker sent a DEALER client (after nothing: DEALER has no identity)."""
    if len(frames) < 3 or frames[0] or frames[1] != CLIENT:
        raise ProtocolError("bad reply", "expected '' RWC1 COMMAND ...")
    cmd = frames[2]
    if cmd in (PONG, INVALID):
        return Reply(cmd, "", frames[3:])
    if len(frames) < 4:
        raise ProtocolError("bad reply", f"{cmd[:20]!r} without job id")
    job_id = _text(frames[3])
    rest = frames[4:]
    if cmd == RESULT:
        return Reply(cmd, job_id, rest)
    if cmd in (FAILED, REFUSED):
        if len(rest) != 2:
            raise ProtocolError("bad reply", f"{cmd.decode()} needs two text frames")
        return Reply(cmd, job_id, rest)
    if cmd == INFO:
        if len(rest) != 1:
            raise ProtocolError("bad reply", "INFO needs one JSON frame")
        return Reply(cmd, job_id, rest, _json_object(rest[0], "info", MAX_REPLY_INFO_BYTES))
    if cmd in (ACCEPTED, CANCELLED, UNKNOWN):
        return Reply(cmd, job_id, rest)
    raise ProtocolError("unknown command", repr(cmd[:20]))


# ================================================================================================
# workers endpoint
# ================================================================================================


class Hello(NamedTuple):
    queues: tuple[str, ...]
    info: dict[str, Any]
    job_id: str | None  # the job the worker holds, when it re-registers mid-job
    attempt: int


class WorkerResult(NamedTuple):
    job_id: str
    attempt: int
    ready: bool
    payload: list[bytes]


class WorkerError(NamedTuple):
    job_id: str
    attempt: int
    ready: bool
    error: str


class Return(NamedTuple):
    job_id: str
    attempt: int


class Heartbeat(NamedTuple):
    pass


class Bye(NamedTuple):
    pass


WorkerMessage = Union[Hello, WorkerResult, WorkerError, Return, Heartbeat, Bye]

_HEARTBEAT = Heartbeat()
_BYE = Bye()


def decode_worker(frames: list[bytes]) -> WorkerMessage:
    """Decode what a worker sent (frames after the ROUTER identity)."""
    if len(frames) < 2 or frames[0] != WORKER:
        raise ProtocolError("bad header", "worker messages start with RWW1")
    cmd = frames[1]
    if cmd == RESULT:
        if len(frames) < 6:
            raise ProtocolError("short RESULT", "needs id, attempt, ready and >= 1 payload")
        return WorkerResult(
            check_job_id(frames[2]), _uint(frames[3], "attempt", 1), _flag(frames[4], "ready"),
            frames[5:],
        )
    if cmd == HEARTBEAT:
        return _HEARTBEAT
    if cmd == ERROR:
        if len(frames) != 6:
            raise ProtocolError("bad ERROR", "needs id, attempt, ready and error text")
        return WorkerError(
            check_job_id(frames[2]), _uint(frames[3], "attempt", 1), _flag(frames[4], "ready"),
            _text(frames[5]),
        )
    if cmd == HELLO:
        if len(frames) != 6:
            raise ProtocolError("bad HELLO", "needs queues, info, job id and attempt")
        names = frames[2].split(b",") if frames[2] else [DEFAULT_QUEUE.encode()]
        if len(names) > MAX_WORKER_QUEUES:
            raise ProtocolError("bad HELLO", f"more than {MAX_WORKER_QUEUES} queues")
        queues = tuple(dict.fromkeys(check_queue(q) for q in names))
        job_id = check_job_id(frames[4]) if frames[4] else None
        attempt = _uint(frames[5], "attempt", 1) if job_id else 0
        return Hello(queues, _json_object(frames[3], "info"), job_id, attempt)
    if cmd == RETURN:
        if len(frames) != 4:
            raise ProtocolError("bad RETURN", "needs id and attempt")
        return Return(check_job_id(frames[2]), _uint(frames[3], "attempt", 1))
    if cmd == BYE:
        return _BYE
    raise ProtocolError("unknown command", repr(cmd[:20]))


def encode_hello(
    queues: tuple[str, ...] | list[str], info: dict[str, Any], job_id: str | None, attempt: int
) -> list[bytes]:
    return [
        WORKER, HELLO, ",".join(queues).encode(), json.dumps(info).encode(),
        (job_id or "").encode(), str(attempt).encode() if job_id else b"",
    ]


def encode_worker_result(job_id: str, attempt: int, ready: bool, payload: list[bytes]) -> list[bytes]:
    if not payload:
        raise ValueError("a result needs at least one frame")
    return [WORKER, RESULT, job_id.encode(), str(attempt).encode(), b"1" if ready else b"0", *payload]


def encode_worker_error(job_id: str, attempt: int, ready: bool, error: str) -> list[bytes]:
    return [WORKER, ERROR, job_id.encode(), str(attempt).encode(), b"1" if ready else b"0",
            error.encode("utf-8", "replace")]


def encode_return(job_id: str, attempt: int) -> list[bytes]:
    return [WORKER, RETURN, job_id.encode(), str(attempt).encode()]


HEARTBEAT_FRAMES = [WORKER, HEARTBEAT]  #: both directions; never mutate
BYE_FRAMES = [WORKER, BYE]


# --- broker -> worker ------------------------------------------------------------------------


class Welcome(NamedTuple):
    broker_id: str
    heartbeat: float  # seconds between the broker's heartbeats
    liveness: int  # beats the broker may miss before the worker reconnects
    max_message_size: int | None = None  # the largest frame the broker takes


class Job(NamedTuple):
    job_id: str
    attempt: int
    timeout: float
    payload: list[bytes]


class Disconnect(NamedTuple):
    reason: str


BrokerMessage = Union[Welcome, Job, Heartbeat, Disconnect]


def encode_welcome(
    broker_id: str, heartbeat: float, liveness: int, max_message_size: int | None = None
) -> list[bytes]:
    info = {"broker": broker_id, "heartbeat": heartbeat, "liveness": liveness,
            "max_message_size": max_message_size}
    return [WORKER, WELCOME, json.dumps(info).encode()]


def encode_job(job_id: bytes, attempt: int, timeout: float, payload: list[bytes]) -> list[bytes]:
    return [WORKER, JOB, job_id, str(attempt).encode(), _ms(timeout), *payload]


def encode_disconnect(reason: str) -> list[bytes]:
    return [WORKER, DISCONNECT, reason.encode()]


def decode_broker(frames: list[bytes]) -> BrokerMessage:
    """Decode what the broker sent a worker's DEALER."""
    if len(frames) < 2 or frames[0] != WORKER:
        raise ProtocolError("bad header", "broker messages to workers start with RWW1")
    cmd = frames[1]
    if cmd == JOB:
        if len(frames) < 6:
            raise ProtocolError("short JOB", "needs id, attempt, timeout and >= 1 payload")
        return Job(
            check_job_id(frames[2]), _uint(frames[3], "attempt", 1),
            _uint(frames[4], "timeout", 1) / 1000.0, frames[5:],
        )
    if cmd == HEARTBEAT:
        return _HEARTBEAT
    if cmd == WELCOME:
        if len(frames) != 3:
            raise ProtocolError("bad WELCOME", "needs one JSON frame")
        info = _json_object(frames[2], "welcome")
        try:
            size = info.get("max_message_size")
            return Welcome(str(info["broker"]), float(info["heartbeat"]), int(info["liveness"]),
                           None if size is None else int(size))
        except (KeyError, TypeError, ValueError, OverflowError) as exc:
            raise ProtocolError("bad WELCOME", f"missing or wrong field {exc}") from None
    if cmd == DISCONNECT:
        return Disconnect(_text(frames[2]) if len(frames) > 2 else "")
    raise ProtocolError("unknown command", repr(cmd[:20]))


# ================================================================================================
# status endpoint
# ================================================================================================


def decode_status_request(frames: list[bytes]) -> None:
    """Validate a status request (frames after the ROUTER identity)."""
    if len(frames) != 3 or frames[0] or frames[1] != STATUS or frames[2] != STATUS_REQ:
        raise ProtocolError("bad status request", "expected '' RWS1 STATUS")


def encode_status_request() -> list[bytes]:
    return [_EMPTY, STATUS, STATUS_REQ]


def encode_snapshot(snapshot: dict[str, Any]) -> list[bytes]:
    return [_EMPTY, STATUS, SNAPSHOT, json.dumps(snapshot).encode()]


def encode_status_invalid(reason: str) -> list[bytes]:
    return [_EMPTY, STATUS, INVALID, reason.encode()]


def decode_snapshot(frames: list[bytes]) -> dict[str, Any]:
    """Decode a status reply as received by a REQ socket (delimiter already stripped)."""
    if len(frames) == 4 and not frames[0]:
        frames = frames[1:]  # a DEALER sees the delimiter
    if len(frames) != 3 or frames[0] != STATUS:
        raise ProtocolError("bad status reply", "expected RWS1 SNAPSHOT json")
    if frames[1] == INVALID:
        raise ProtocolError("status request refused", _text(frames[2]))
    if frames[1] != SNAPSHOT:
        raise ProtocolError("bad status reply", repr(frames[1][:20]))
    try:
        value = json.loads(frames[2])
    except (ValueError, RecursionError) as exc:
        raise ProtocolError("bad status reply", f"not JSON ({exc})") from None
    if not isinstance(value, dict):
        raise ProtocolError("bad status reply", "not a JSON object")
    return value
