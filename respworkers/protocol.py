"""The respworkers wire protocol (RWP/3): the only module that builds, parses and validates frames.

docs/protocol.md is the normative text; this module is its executable form. Every
``decode_*`` function takes the frames as received (after the ROUTER identity has
been split off by the caller) and either returns a small typed record or raises
:class:`ProtocolError` with a short ``reason``. Every ``encode_*`` function returns
the list of frames to send (without a ROUTER identity).

On the clients and workers endpoints a message is one *command line* frame (the
version word, the command and its fields, separated by single spaces) followed by
the payload frames, if any. Fields never contain spaces (job ids and queue names
cannot), so a line splits in one C call; free text travels in a frame of its own.
Few frames matter: receiving a frame costs pyzmq more than anything else the broker
does per message.

No other module spells a frame literal.
"""

from __future__ import annotations

import json
import os
from typing import Any, NamedTuple, Union

from .errors import ProtocolError

# --- version words: the first word of every command line ---------------------------------------
RWC = b"RWC3"  #: client <-> broker, on the clients endpoint
RWW = b"RWW3"  #: worker <-> broker, on the workers endpoint
RWS = b"RWS1"  #: anyone <-> broker, on the status endpoint (a REQ exchange, multi-frame)

# --- client commands (client -> broker) -------------------------------------------------------
SUBMIT = b"SUBMIT"
SUBMITS = b"SUBMITS"  #: several jobs in one message
WAIT = b"WAIT"
UNWAIT = b"UNWAIT"  #: the client no longer waits for these jobs (it is closing)
WATCH = b"WATCH"  #: send this client the job's progress as it changes
JOBS = b"JOBS"  #: list the jobs the broker holds (a page)
REQUEUE = b"REQUEUE"  #: run ended jobs again under the same id
PURGE = b"PURGE"  #: cancel the queued jobs of a queue
PAUSE = b"PAUSE"  #: dispatch nothing from a queue (it keeps taking jobs)
RESUME = b"RESUME"  #: dispatch from a paused queue again
DRAIN = b"DRAIN"  #: (client) ask workers to finish their job and leave; (broker) tell one to
QUERY = b"QUERY"
CANCEL = b"CANCEL"
PING = b"PING"

# --- broker -> client ---------------------------------------------------------------------------
ACCEPTED = b"ACCEPTED"
RESULT = b"RESULT"
RESULTS = b"RESULTS"  #: several results in one message (only for jobs sent with SUBMITS)
FAILED = b"FAILED"
CANCELLED = b"CANCELLED"
EXPIRED = b"EXPIRED"
PROGRESS = b"PROGRESS"
REQUEUED = b"REQUEUED"
PURGED = b"PURGED"
PAUSED = b"PAUSED"
RESUMED = b"RESUMED"
DRAINING = b"DRAINING"
REFUSED = b"REFUSED"
INFO = b"INFO"
UNKNOWN = b"UNKNOWN"
PONG = b"PONG"
INVALID = b"INVALID"
RESYNC = b"RESYNC"  #: outcomes for this client were dropped: ask again (WAIT) for what you wait for

# --- worker -> broker ---------------------------------------------------------------------------
HELLO = b"HELLO"
# RESULT (shared name with the client side)
ERROR = b"ERROR"
HEARTBEAT = b"HEARTBEAT"
RETURN = b"RETURN"
BYE = b"BYE"
VACATE = b"VACATE"  #: a pool says the process in one of its slots has died

# --- broker -> worker ---------------------------------------------------------------------------
WELCOME = b"WELCOME"
JOB = b"JOB"
ABANDON = b"ABANDON"  #: the job has ended: stop working on this attempt
ACK = b"ACK"  #: the broker has applied a worker's answer (sent when no JOB follows at once)
# HEARTBEAT
DISCONNECT = b"DISCONNECT"

# --- status -------------------------------------------------------------------------------------
STATUS = b"STATUS"  #: the one status request
SNAPSHOT = b"SNAPSHOT"

#: Reasons a job can fail with (third frame of FAILED).
FAIL_TIMEOUT = "timeout"
FAIL_ERROR = "error"
FAIL_LOST = "worker-lost"
FAIL_CANCELLED = "cancelled"
FAIL_EXPIRED = "expired"

#: Codes of REFUSED.
REFUSE_FULL = "full"
REFUSE_INVALID = "invalid"
REFUSE_LIMIT = "limit"
REFUSE_SHUTDOWN = "shutdown"
REFUSE_JOURNAL = "journal"

MAX_ID_BYTES = 200
MAX_QUEUE_BYTES = 64
MAX_INFO_BYTES = 8192  #: JSON frames peers send the broker (HELLO info)
MAX_REPLY_INFO_BYTES = 64 << 20  #: INFO from the broker carries tracebacks
DEFAULT_QUEUE = "default"
MAX_WORKER_QUEUES = 64  #: queues one worker may serve
MAX_BATCH = 1000  #: jobs in one SUBMITS, ids in one WAIT
MAX_TOKEN_BYTES = 64  #: attempt tokens (the broker sends 32 hex digits)
MAX_SLOT_BYTES = 200
MAX_NAME_BYTES = 200  #: a worker or host name in DRAIN (the broker keeps 80 characters of a name)
MAX_PREFETCH = 1000  #: jobs one worker may hold (HELLO info ``prefetch``); also bounds JOBS, RESULTS

class RandomHex:
    """Unguessable random values of 32 hex digits (128 bits): the broker's attempt tokens,
    a client's job ids. Cut from one urandom read per 128, since a system call per value
    costs more than the value. Not locked (a caller shared by threads locks it), and a
    forked child must :meth:`forget` what its parent had read."""

    __slots__ = ("_hex", "_pos")

    def __init__(self) -> None:
        self._hex = b""
        self._pos = 0

    def next(self) -> bytes:
        pos = self._pos
        if pos >= len(self._hex):
            self._hex = os.urandom(2048).hex().encode()
            pos = 0
        self._pos = pos + 32
        return self._hex[pos:pos + 32]

    def forget(self) -> None:
        self._hex = b""
        self._pos = 0


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


def check_name(raw: bytes, what: str) -> str:
    """A tenant (or another short name): 1..64 characters of ``[A-Za-z0-9._-]``."""
    try:
        text = raw.decode("ascii")
    except UnicodeDecodeError:
        raise ProtocolError(f"bad {what}", f"{what} names are ASCII") from None
    if not text or len(text) > MAX_QUEUE_BYTES or not set(text) <= _QUEUE_CHARS:
        raise ProtocolError(f"bad {what}", f"{text!r} is not 1..64 of [A-Za-z0-9._-]")
    return text


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


#: The numbers most messages carry (attempts, frame counts, "0" for defaults), parsed once.
_SMALL = {str(i).encode(): i for i in range(1000)}


def _uint(raw: bytes, what: str, minimum: int = 0, digits: int = 12) -> int:
    value = _SMALL.get(raw)
    if value is None:
        if not raw.isdigit() or len(raw) > digits:
            raise ProtocolError(f"bad {what}", f"{raw[:20]!r} is not a decimal number")
        value = int(raw)
    if value < minimum:
        raise ProtocolError(f"bad {what}", f"must be >= {minimum}")
    return value


def _flag(raw: bytes, what: str) -> bool:
    if raw == b"1":
        return True
    if raw == b"0":
        return False
    raise ProtocolError(f"bad {what}", "must be '0' or '1'")


#: Largest PROGRESS report (JSON bytes): progress is a summary, not a data channel.
MAX_PROGRESS_BYTES = 4096


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


def _progress_report(raw: bytes) -> dict[str, Any]:
    """A worker's PROGRESS JSON, checked field by field and bounded as the broker will send
    it on (UTF-8, compact): ``fraction`` 0..1, ``message`` text, ``meta`` an object. The
    broker adds ``at`` and ``attempt``; the whole stays under MAX_INFO_BYTES for clients."""
    report = _json_object(raw, "progress", MAX_PROGRESS_BYTES)
    fraction = report.get("fraction")
    if fraction is not None and (isinstance(fraction, bool) or not isinstance(fraction, (int, float))
                                 or not 0 <= fraction <= 1):
        raise ProtocolError("bad progress", "fraction must be a number from 0 to 1")
    message = report.get("message")
    if message is not None and not isinstance(message, str):
        raise ProtocolError("bad progress", "message must be text")
    meta = report.get("meta")
    if meta is not None and not isinstance(meta, dict):
        raise ProtocolError("bad progress", "meta must be a JSON object")
    kept = {k: report[k] for k in ("fraction", "message", "meta") if report.get(k) is not None}
    try:
        size = len(json.dumps(kept, ensure_ascii=False, allow_nan=False,
                              separators=(",", ":")).encode())
    except ValueError:  # NaN or Infinity from a number too large for a float
        raise ProtocolError("bad progress", "numbers must be finite") from None
    if size > MAX_PROGRESS_BYTES:
        raise ProtocolError("bad progress", f"larger than {MAX_PROGRESS_BYTES} bytes as UTF-8 JSON")
    return kept


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


# ================================================================================================
# clients endpoint
# ================================================================================================


class Options(NamedTuple):
    """A job's options as SUBMIT carries them; None means the broker's default.

    Durations are seconds here and milliseconds on the wire; ``delay`` and ``expires``
    count from when the broker takes the job in (relative, so no clocks need to agree).
    """

    timeout: float | None = None  #: one attempt's time limit
    tries: int | None = None  #: attempts that count
    priority: int | None = None  #: 0..9, higher first (default 5)
    delay: float | None = None  #: wait this long before the job may run
    expires: float | None = None  #: not started by then: it ends ``expired``
    tenant: str | None = None  #: whose job it is, for fair shares within a queue
    backoff: float | None = None  #: delay before the first retry (then doubling, with jitter)
    backoff_max: float | None = None  #: the longest delay before a retry


NO_OPTIONS = Options()
MAX_PRIORITY = 9
DEFAULT_PRIORITY = 5
#: Option names on the wire, and whether each value is milliseconds (else a count or a name).
_OPTION_MS = {"timeout": True, "tries": False, "priority": False, "delay": True, "expires": True,
              "tenant": False, "backoff": True, "backoff_max": True}


def encode_options(opts: Options | None) -> bytes:
    """``-``, or ``key=value`` pairs joined by commas; durations in milliseconds."""
    if not opts or opts == NO_OPTIONS:
        return b"-"
    words = []
    for key, value in zip(Options._fields, opts):
        if value is None:
            continue
        if _OPTION_MS[key]:
            words.append(f"{key}={max(1 if key == 'timeout' else 0, round(float(value) * 1000))}")
        else:
            words.append(f"{key}={value}")
    return ",".join(words).encode() or b"-"


def decode_options(raw: bytes) -> Options:
    if raw == b"-":
        return NO_OPTIONS
    values: dict[str, Any] = {}
    for pair in raw.split(b","):
        key_b, eq, value = pair.partition(b"=")
        key = key_b.decode("ascii", "replace")
        if not eq or key not in _OPTION_MS:
            raise ProtocolError("bad options", f"{pair[:40]!r} is not one of "
                                f"{', '.join(_OPTION_MS)}=value")
        if key in values:
            raise ProtocolError("bad options", f"{key} given twice")
        if key == "tenant":
            values[key] = check_name(value, "tenant")
        elif key == "priority":
            n = _uint(value, "priority")
            if n > MAX_PRIORITY:
                raise ProtocolError("bad priority", f"must be 0..{MAX_PRIORITY}")
            values[key] = n
        elif key == "tries":
            values[key] = _uint(value, "tries", 1)
        elif key == "timeout":
            values[key] = _uint(value, "timeout", 1) / 1000.0
        else:
            values[key] = _uint(value, key) / 1000.0
    return Options(**values)


class Submit(NamedTuple):
    job_id: str
    queue: str
    options: Options
    payload: list[bytes]


class Plain(NamedTuple):
    """A request from a plain REQ socket: all frames after the delimiter are the payload."""

    payload: list[bytes]


class Query(NamedTuple):
    job_id: str


class Cancel(NamedTuple):
    job_id: str


class Wait(NamedTuple):
    """WAIT for one or more jobs (a client resyncing sends many ids per message)."""

    job_ids: list[str]


class Unwait(NamedTuple):
    """The client stops waiting for these jobs (they go on; it will not be told)."""

    job_ids: list[str]


class Watch(NamedTuple):
    """Send this client the job's progress as it changes (until it ends)."""

    job_id: str


class ListJobs(NamedTuple):
    """A page of the jobs the broker holds, newest first (JSON: state, queue, limit, cursor)."""

    query: dict[str, Any]


class Requeue(NamedTuple):
    """Run these ended jobs again under the same ids, with a fresh set of tries."""

    job_ids: list[str]


class Purge(NamedTuple):
    """Cancel the jobs waiting in a queue (queued or scheduled)."""

    queue: str


class Pause(NamedTuple):
    """Dispatch nothing from this queue until RESUME; it still takes and keeps jobs."""

    queue: str


class Resume(NamedTuple):
    """Dispatch from this paused queue again (idle workers get its jobs at once)."""

    queue: str


class Drain(NamedTuple):
    """Ask workers to finish the job in hand and leave: by name, every worker of a host, or
    all of them (``everyone``). Names and hosts nobody has are reported, not refused."""

    workers: tuple[str, ...]
    hosts: tuple[str, ...]
    everyone: bool


class Ping(NamedTuple):
    pass


_PING = Ping()


class SubmitMany(NamedTuple):
    jobs: list[Submit]


ClientRequest = Union[Submit, SubmitMany, Plain, Query, Cancel, Wait, Unwait, Watch, ListJobs,
                      Requeue, Purge, Pause, Resume, Drain, Ping]


def _line(frames: list[bytes], version: bytes) -> list[bytes]:
    """The words of a command line; checks the version word."""
    words = frames[0].split(b" ")
    if words[0] != version:
        if len(words[0]) == 4 and words[0][:3] == version[:3]:
            raise ProtocolError("unsupported version",
                                f"{words[0]!r}; this side speaks {version.decode()}")
        raise ProtocolError("bad header", f"messages start with {version.decode()}")
    if len(words) < 2:
        raise ProtocolError("no command", f"{version.decode()} without a command")
    return words


def _tail(frames: list[bytes], what: str) -> bytes:
    """The one text frame after a command line (error text, JSON, ...)."""
    if len(frames) != 2:
        raise ProtocolError(f"bad {what}", "needs the command line and one more frame")
    return frames[1]


def decode_client(frames: list[bytes]) -> ClientRequest:
    """Decode what a client sent (frames after the ROUTER identity).

    A first frame that is empty is a REQ envelope: everything after it is the payload
    of a plain request, so any REQ socket is a client. Otherwise the first frame is a
    ``RWC3`` command line (DEALER clients send no delimiter).
    """
    if not frames:
        raise ProtocolError("empty message", "no frames")
    if not frames[0]:
        if len(frames) < 2:
            raise ProtocolError("empty request", "a REQ request needs at least one frame")
        first = frames[1]
        if len(first) == 4 and first[:3] == b"RWC" or first[:4] == b"RWC1" and first[4:5] == b" ":
            # An RWP/1 client (it sent a delimiter, then its header): never run it as a job.
            raise ProtocolError("unsupported version", f"{first[:4]!r}; this broker speaks RWC3")
        return Plain(frames[1:])
    words = _line(frames, RWC)
    cmd = words[1]
    if cmd == SUBMIT:
        if len(words) != 5 or len(frames) < 2:
            raise ProtocolError("bad SUBMIT", "needs id, queue, options and >= 1 payload frame")
        return Submit(check_job_id(words[2]), check_queue(words[3]), decode_options(words[4]),
                      frames[1:])
    if cmd == SUBMITS:
        return _decode_submits(words, frames)
    if cmd in (WAIT, UNWAIT, REQUEUE):
        if not 3 <= len(words) <= 2 + MAX_BATCH or len(frames) != 1:
            raise ProtocolError(f"bad {cmd.decode()}", f"needs 1..{MAX_BATCH} job ids")
        ids = [check_job_id(w) for w in words[2:]]
        return Wait(ids) if cmd == WAIT else Unwait(ids) if cmd == UNWAIT else Requeue(ids)
    if cmd == WATCH:
        if len(words) != 3 or len(frames) != 1:
            raise ProtocolError("bad WATCH", "needs exactly one job id")
        return Watch(check_job_id(words[2]))
    if cmd == JOBS:
        if len(words) != 2:
            raise ProtocolError("bad JOBS", "takes no fields, then one JSON frame")
        return ListJobs(_json_object(_tail(frames, "JOBS"), "query"))
    if cmd in (PURGE, PAUSE, RESUME):
        if len(words) != 3 or len(frames) != 1:
            raise ProtocolError(f"bad {cmd.decode()}", "needs exactly one queue")
        queue = check_queue(words[2])
        return Purge(queue) if cmd == PURGE else Pause(queue) if cmd == PAUSE else Resume(queue)
    if cmd == DRAIN:
        if len(words) != 2:
            raise ProtocolError("bad DRAIN", "takes no fields, then one JSON frame")
        return _drain_selector(_json_object(_tail(frames, "DRAIN"), "selector"))
    if cmd in (QUERY, CANCEL):
        if len(words) != 3 or len(frames) != 1:
            raise ProtocolError(f"bad {cmd.decode()}", "needs exactly one job id")
        job_id = check_job_id(words[2])
        return Query(job_id) if cmd == QUERY else Cancel(job_id)
    if cmd == PING:
        if len(words) != 2:
            raise ProtocolError("bad PING", "takes no fields")
        return _PING
    raise ProtocolError("unknown command", repr(cmd[:20]))


def _names(value: Any, key: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, list) or not all(
            isinstance(v, str) and 0 < len(v.encode("utf-8", "replace")) <= MAX_NAME_BYTES
            for v in value):
        raise ProtocolError("bad selector", f"{key} must be a list of names of "
                            f"1..{MAX_NAME_BYTES} bytes")
    return tuple(dict.fromkeys(value))


def _drain_selector(selector: dict[str, Any]) -> Drain:
    """DRAIN's JSON: ``workers`` (names, as the status shows them), ``hosts``, ``all``."""
    everyone = selector.get("all")
    if everyone is not None and not isinstance(everyone, bool):
        raise ProtocolError("bad selector", "all must be true or false")
    drain = Drain(_names(selector.get("workers"), "workers"), _names(selector.get("hosts"), "hosts"),
                  bool(everyone))
    if not (drain.workers or drain.hosts or drain.everyone):
        raise ProtocolError("bad selector", "names no worker: give workers, hosts or all")
    return drain


def _batch(head: bytes, entries: list[tuple[bytes, list[bytes]]]) -> list[bytes]:
    """The layout SUBMITS and RESULTS share: ``head``, then each entry's words and its frame
    count on the one line; then every entry's frames, in order."""
    out = [b" ".join([head, *(b"%s %d" % (words, len(f)) for words, f in entries)])]
    for _, f in entries:
        out += f
    return out


def _unbatch(words: list[bytes], frames: list[bytes], width: int, reason: str,
             limit: int | None = None) -> list[tuple[list[bytes], list[bytes]]]:
    """Split a batch message into (an entry's ``width`` words, its frames); the last word of
    each entry is its frame count, and together the entries must use every frame."""
    n, extra = divmod(len(words) - 2, width)
    if n < 1 or extra:
        raise ProtocolError(reason, f"needs {width} words per entry, the last its frame count")
    if limit is not None and n > limit:
        raise ProtocolError(reason, f"more than {limit} entries")
    out = []
    pos = 1
    for i in range(2, len(words), width):
        end = pos + _uint(words[i + width - 1], "frame count", 1)
        if end > len(frames):
            raise ProtocolError(reason, "fewer frames than the line announces")
        out.append((words[i:i + width - 1], frames[pos:end]))
        pos = end
    if pos != len(frames):
        raise ProtocolError(reason, "more frames than the line announces")
    return out


def _decode_submits(words: list[bytes], frames: list[bytes]) -> SubmitMany:
    """``RWC3 SUBMITS`` then ``<id> <queue> <options> <frames>`` per job; the payload frames
    of all jobs follow the line, in order."""
    return SubmitMany([
        Submit(check_job_id(job_id), check_queue(queue),
               NO_OPTIONS if options == b"-" else decode_options(options), payload)
        for (job_id, queue, options), payload in _unbatch(words, frames, 4, "bad SUBMITS", MAX_BATCH)])


def encode_submits(submits: list[list[bytes]]) -> list[bytes]:
    """One SUBMITS message for several jobs, each given as its encode_submit() frames."""
    if not 1 <= len(submits) <= MAX_BATCH:
        raise ValueError(f"SUBMITS carries 1..{MAX_BATCH} jobs, not {len(submits)}")
    cut = len(b"RWC3 SUBMIT ")
    return _batch(b"RWC3 SUBMITS", [(f[0][cut:], f[1:]) for f in submits])


def encode_submit(
    job_id: str, queue: str, options: Options | None, payload: list[bytes]
) -> list[bytes]:
    if not payload:
        raise ValueError("a job needs at least one payload frame")
    return [b"RWC3 SUBMIT %s %s %s" % (job_id.encode(), (queue or DEFAULT_QUEUE).encode(),
                                       encode_options(options)),
            *payload]


def encode_job_ref(command: bytes, job_id: str) -> list[bytes]:
    return [b"RWC3 %s %s" % (command, job_id.encode())]


def encode_wait(job_ids: list[str]) -> list[bytes]:
    if not 1 <= len(job_ids) <= MAX_BATCH:
        raise ValueError(f"WAIT names 1..{MAX_BATCH} jobs, not {len(job_ids)}")
    return [b" ".join([b"RWC3 WAIT", *(j.encode() for j in job_ids)])]


def encode_watch(job_id: str) -> list[bytes]:
    return [b"RWC3 WATCH " + job_id.encode()]


def encode_list_jobs(query: dict[str, Any]) -> list[bytes]:
    return [b"RWC3 JOBS", json.dumps(query).encode()]


def encode_requeue(job_ids: list[str]) -> list[bytes]:
    if not 1 <= len(job_ids) <= MAX_BATCH:
        raise ValueError(f"REQUEUE names 1..{MAX_BATCH} jobs, not {len(job_ids)}")
    return [b" ".join([b"RWC3 REQUEUE", *(j.encode() for j in job_ids)])]


def encode_purge(queue: str) -> list[bytes]:
    return [b"RWC3 PURGE " + queue.encode()]


def encode_pause(queue: str) -> list[bytes]:
    return [b"RWC3 PAUSE " + queue.encode()]


def encode_resume(queue: str) -> list[bytes]:
    return [b"RWC3 RESUME " + queue.encode()]


def encode_drain(workers: list[str] | tuple[str, ...] = (), hosts: list[str] | tuple[str, ...] = (),
                 everyone: bool = False) -> list[bytes]:
    """DRAIN with its selector (only the keys that select something are written)."""
    selector: dict[str, Any] = {}
    if workers:
        selector["workers"] = list(workers)
    if hosts:
        selector["hosts"] = list(hosts)
    if everyone:
        selector["all"] = True
    return [b"RWC3 DRAIN", json.dumps(selector).encode()]


def encode_unwait(job_ids: list[str]) -> list[bytes]:
    if not 1 <= len(job_ids) <= MAX_BATCH:
        raise ValueError(f"UNWAIT names 1..{MAX_BATCH} jobs, not {len(job_ids)}")
    return [b" ".join([b"RWC3 UNWAIT", *(j.encode() for j in job_ids)])]


PING_FRAMES = [b"RWC3 PING"]  #: never mutate


def encode_ping() -> list[bytes]:
    return list(PING_FRAMES)


# --- broker -> client ------------------------------------------------------------------------


def encode_accepted(job_ids: list[bytes]) -> list[bytes]:
    """ACCEPTED confirms one or more jobs in one line (the broker batches them per client)."""
    return [b" ".join((b"RWC3 ACCEPTED", *job_ids))]


def encode_result(job_id: bytes, payload: list[bytes]) -> list[bytes]:
    return [b"RWC3 RESULT " + job_id, *payload]


def encode_results(results: list[tuple[bytes, list[bytes]]]) -> list[bytes]:
    """The results of jobs sent with SUBMITS: one RESULT, or for several one RESULTS
    (``RWC3 RESULTS <id> <frames> ...`` then all frames)."""
    if len(results) == 1:
        return encode_result(*results[0])
    return _batch(b"RWC3 RESULTS", results)


def encode_failed(job_id: bytes, reason: str, error: str) -> list[bytes]:
    return [b"RWC3 FAILED %s %s" % (job_id, reason.encode()), error.encode("utf-8", "replace")]


def encode_cancelled(job_id: bytes) -> list[bytes]:
    return [b"RWC3 CANCELLED " + job_id]


def encode_expired(job_id: bytes) -> list[bytes]:
    return [b"RWC3 EXPIRED " + job_id]


def encode_progress(job_id: bytes, progress: dict[str, Any]) -> list[bytes]:
    """A report checked by the worker decoder: at most MAX_PROGRESS_BYTES plus the broker's
    ``at`` and ``attempt``, so well under a client's MAX_INFO_BYTES."""
    return [b"RWC3 PROGRESS " + job_id,
            json.dumps(progress, ensure_ascii=False, separators=(",", ":")).encode()]


def encode_jobs_page(page: dict[str, Any]) -> list[bytes]:
    return [b"RWC3 JOBS", json.dumps(page).encode()]


def encode_requeued(report: dict[str, Any]) -> list[bytes]:
    return [b"RWC3 REQUEUED", json.dumps(report).encode()]


def encode_purged(queue: str, cancelled: int, left: int) -> list[bytes]:
    return [b"RWC3 PURGED %s %d %d" % (queue.encode(), cancelled, left)]


def encode_paused(queue: str, queued: int, changed: bool) -> list[bytes]:
    return [b"RWC3 PAUSED %s %d %d" % (queue.encode(), queued, changed)]


def encode_resumed(queue: str, dispatched: int, queued: int, changed: bool) -> list[bytes]:
    return [b"RWC3 RESUMED %s %d %d %d" % (queue.encode(), dispatched, queued, changed)]


def encode_draining(report: dict[str, Any]) -> list[bytes]:
    return [b"RWC3 DRAINING", json.dumps(report).encode()]


def encode_refused(job_id: str, code: str, text: str) -> list[bytes]:
    return [b"RWC3 REFUSED %s %s" % (job_id.encode(), code.encode()), text.encode()]


def encode_info(job_id: str, info: dict[str, Any]) -> list[bytes]:
    return [b"RWC3 INFO " + job_id.encode(), json.dumps(info).encode()]


def encode_unknown(job_id: str) -> list[bytes]:
    return [b"RWC3 UNKNOWN " + job_id.encode()]


def encode_pong(broker_id: str, limits: dict[str, Any]) -> list[bytes]:
    """PONG carries the broker's id (a new id means a restart) and its limits, as JSON."""
    return [b"RWC3 PONG " + broker_id.encode(), json.dumps(limits).encode()]


RESYNC_FRAMES = [b"RWC3 RESYNC"]  #: never mutate


def encode_invalid(reason: str) -> list[bytes]:
    return [b"RWC3 INVALID", reason.encode("utf-8", "replace")]


def encode_plain_reply(payload: list[bytes] | None) -> list[bytes]:
    """Reply to a plain REQ: the result frames, or one empty frame when the job failed."""
    return [_EMPTY, *payload] if payload else [_EMPTY, _EMPTY]


class Accepted(NamedTuple):
    job_ids: list[str]  #: journaled: the broker will not lose them


class Result(NamedTuple):
    job_id: str
    frames: list[bytes]


class Results(NamedTuple):
    """Several results in one message (jobs sent with SUBMITS, or a WAIT of several ids)."""

    entries: list[tuple[str, list[bytes]]]


class Failed(NamedTuple):
    job_id: str
    reason: str  #: timeout, error or worker-lost: the last attempt's
    error: str  #: the error text; its first line is the summary


class Cancelled(NamedTuple):
    job_id: str


class Expired(NamedTuple):
    """Not started before its expiry time: it never ran, and never will."""

    job_id: str


class Progress(NamedTuple):
    job_id: str
    progress: dict[str, Any]  #: fraction, message, meta, at (see docs/protocol.md)


class JobsPage(NamedTuple):
    page: dict[str, Any]  #: jobs (newest first), cursor (to continue, or null), scanned


class Requeued(NamedTuple):
    report: dict[str, Any]  #: requeued, unknown (ids), skipped (id -> state)


class Purged(NamedTuple):
    queue: str
    cancelled: int
    left: int  #: still waiting: ask again to go on


class Paused(NamedTuple):
    """The queue is paused: its jobs wait (``queued`` of them now) until RESUME."""

    queue: str
    queued: int
    changed: bool  #: this request paused it (False: it was paused already)


class Resumed(NamedTuple):
    queue: str
    dispatched: int  #: jobs sent to idle workers at once
    queued: int  #: still waiting for a worker
    changed: bool  #: this request resumed it (False: it was not paused)


class Draining(NamedTuple):
    report: dict[str, Any]  #: asked (name, job in hand or null), unknown (names and hosts)


class Refused(NamedTuple):
    job_id: str
    code: str  #: shutdown, journal, limit or full
    text: str


class Info(NamedTuple):
    job_id: str
    info: dict[str, Any]


class Unknown(NamedTuple):
    job_id: str


class Pong(NamedTuple):
    broker_id: str
    limits: dict[str, Any]  #: max_message_size, max_queued, max_timeout, max_tries
    starting: bool = False  #: the broker is still loading its journal


class Invalid(NamedTuple):
    reason: str


class Resync(NamedTuple):
    """Outcomes for this client were dropped while it did not read: ask again."""


ClientReply = Union[Accepted, Result, Results, Failed, Cancelled, Expired, Refused, Info, Unknown,
                    Pong, Invalid, Resync, Progress, JobsPage, Requeued, Purged, Paused, Resumed,
                    Draining]

_RESYNC = Resync()


def decode_reply(frames: list[bytes]) -> ClientReply:
    """Decode what the broker sent a DEALER client into the record of its command."""
    if not frames:
        raise ProtocolError("bad reply", "no frames")
    words = _line(frames, RWC)
    cmd = words[1]
    if cmd == PONG:
        if len(words) != 3 or not words[2]:
            raise ProtocolError("bad reply", "PONG needs a broker id")
        limits = _json_object(_tail(frames, "PONG"), "limits")
        starting = bool(limits.pop("starting", False))
        return Pong(_text(words[2]), limits, starting)
    if cmd == INVALID:
        if len(words) != 2:
            raise ProtocolError("bad reply", "INVALID takes no fields")
        return Invalid(_text(_tail(frames, "INVALID")))
    if cmd == RESULTS:
        return Results([(check_job_id(job_id), result)
                        for (job_id,), result in _unbatch(words, frames, 2, "bad reply")])
    if cmd == RESYNC:
        if len(words) != 2 or len(frames) != 1:
            raise ProtocolError("bad reply", "RESYNC takes no fields")
        return _RESYNC
    if cmd in (JOBS, REQUEUED, DRAINING):
        if len(words) != 2:
            raise ProtocolError("bad reply", f"{cmd.decode()} takes no fields, then JSON")
        report = _json_object(_tail(frames, cmd.decode()), "report", MAX_REPLY_INFO_BYTES)
        return (JobsPage(report) if cmd == JOBS else Requeued(report) if cmd == REQUEUED
                else Draining(report))
    if cmd == PURGED:
        if len(words) != 5 or len(frames) != 1:
            raise ProtocolError("bad reply", "PURGED needs queue, cancelled and left")
        return Purged(check_queue(words[2]), _uint(words[3], "count"), _uint(words[4], "count"))
    if cmd == PAUSED:
        if len(words) != 5 or len(frames) != 1:
            raise ProtocolError("bad reply", "PAUSED needs queue, queued and changed")
        return Paused(check_queue(words[2]), _uint(words[3], "count"), _flag(words[4], "changed"))
    if cmd == RESUMED:
        if len(words) != 6 or len(frames) != 1:
            raise ProtocolError("bad reply", "RESUMED needs queue, dispatched, queued and changed")
        return Resumed(check_queue(words[2]), _uint(words[3], "count"), _uint(words[4], "count"),
                       _flag(words[5], "changed"))
    if len(words) < 3:
        raise ProtocolError("bad reply", f"{cmd[:20]!r} without job id")
    job_id = check_job_id(words[2])
    if cmd == RESULT:
        if len(words) != 3 or len(frames) < 2:
            raise ProtocolError("bad reply", "RESULT needs a job id and >= 1 frame")
        return Result(job_id, frames[1:])
    if cmd in (FAILED, REFUSED):
        if len(words) != 4 or not words[3]:
            raise ProtocolError("bad reply", f"{cmd.decode()} needs a job id and a word")
        word, text = _text(words[3]), _text(_tail(frames, cmd.decode()))
        return Failed(job_id, word, text) if cmd == FAILED else Refused(job_id, word, text)
    if cmd == INFO:
        if len(words) != 3:
            raise ProtocolError("bad reply", "INFO needs one job id")
        return Info(job_id, _json_object(_tail(frames, "INFO"), "info", MAX_REPLY_INFO_BYTES))
    if cmd == ACCEPTED:
        if len(frames) != 1 or b"" in words:
            raise ProtocolError("bad reply", "ACCEPTED is one line of job ids")
        return Accepted([job_id, *(check_job_id(w) for w in words[3:])])
    if cmd in (CANCELLED, UNKNOWN, EXPIRED):
        if len(words) != 3 or len(frames) != 1:
            raise ProtocolError("bad reply", f"{cmd.decode()} takes one job id")
        return (Cancelled(job_id) if cmd == CANCELLED else Unknown(job_id) if cmd == UNKNOWN
                else Expired(job_id))
    if cmd == PROGRESS:
        if len(words) != 3:
            raise ProtocolError("bad reply", "PROGRESS needs one job id")
        return Progress(job_id, _json_object(_tail(frames, "PROGRESS"), "progress"))
    raise ProtocolError("unknown command", repr(cmd[:20]))


# ================================================================================================
# workers endpoint
# ================================================================================================


class Hello(NamedTuple):
    queues: tuple[str, ...]
    info: dict[str, Any]
    job_id: str | None  # the job the worker holds, when it re-registers mid-job
    attempt: int
    token: bytes  # that attempt's token (b"" without a job)
    prefetch: int = 1  #: jobs it may hold at once (info ``prefetch``; absent: 1, on demand)


class WorkerResult(NamedTuple):
    job_id: str
    attempt: int
    token: bytes
    ready: bool
    payload: list[bytes]


class WorkerError(NamedTuple):
    """ERROR: the attempt raised. ``then`` says what the worker asks for: ``""`` (retry as
    the job's policy says), ``"fail"`` (no further tries), ``"abandoned"`` (it stopped
    because the broker said ABANDON; not an error) or ``"retry"`` (after ``retry_after``)."""

    job_id: str
    attempt: int
    token: bytes
    ready: bool
    error: str
    then: str = ""
    retry_after: float | None = None


class WorkerProgress(NamedTuple):
    job_id: str
    attempt: int
    token: bytes
    progress: dict[str, Any]


class Return(NamedTuple):
    job_id: str
    attempt: int
    token: bytes


class Answers(NamedTuple):
    """RESULTS: several answers in one message, oldest job first (a prefetching worker).
    The last one's ``ready`` says whether the worker wants more."""

    answers: list[WorkerResult | WorkerError]


class Heartbeat(NamedTuple):
    pass


class Bye(NamedTuple):
    pass


class Vacate(NamedTuple):
    slot: str
    incarnation: str | None = None  #: the process that died; None: whichever is in the slot


WorkerMessage = Union[Hello, WorkerResult, WorkerError, WorkerProgress, Return, Heartbeat, Bye,
                      Vacate, Answers]

_HEARTBEAT = Heartbeat()
_BYE = Bye()


def check_token(raw: bytes) -> bytes:
    """An attempt token is opaque to the worker: 1..64 bytes, echoed as received."""
    if not 0 < len(raw) <= MAX_TOKEN_BYTES:
        raise ProtocolError("bad token", f"must be 1..{MAX_TOKEN_BYTES} bytes, got {len(raw)}")
    return raw


def check_prefetch(value: Any) -> int:
    """HELLO info ``prefetch``: a whole number of jobs, 1..MAX_PREFETCH (absent: 1)."""
    if value is None:
        return 1
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_PREFETCH:
        raise ProtocolError("bad prefetch", f"{str(value)[:20]!r} is not a whole number "
                            f"from 1 to {MAX_PREFETCH}")
    return value


def _counts(words: list[bytes], what: str, per: int) -> list[int]:
    """The frame counts of a JOBS or RESULTS line: 1..MAX_PREFETCH numbers, each >= ``per``."""
    if not 0 < len(words) <= MAX_PREFETCH:
        raise ProtocolError(f"bad {what}", f"needs 1..{MAX_PREFETCH} frame counts")
    return [_uint(w, "frame count", per, 6) for w in words]


def _split(frames: list[bytes], counts: list[int], what: str) -> list[list[bytes]]:
    """The messages a JOBS or RESULTS carries, each as its own frames."""
    if sum(counts) != len(frames) - 1:
        raise ProtocolError(f"bad {what}", f"the counts add up to {sum(counts)} frames, "
                            f"but {len(frames) - 1} follow the line")
    out, pos = [], 1
    for n in counts:
        out.append(frames[pos:pos + n])
        pos += n
    return out


def check_slot(raw: bytes) -> str:
    if not 0 < len(raw) <= MAX_SLOT_BYTES:
        raise ProtocolError("bad slot", f"must be 1..{MAX_SLOT_BYTES} bytes, got {len(raw)}")
    return _text(raw)


def _then(raw: bytes) -> tuple[str, float | None]:
    """ERROR's last word: ``-``, ``fail``, ``abandoned`` or a retry delay in milliseconds."""
    if raw == b"-":
        return "", None
    if raw in (b"fail", b"abandoned"):
        return raw.decode(), None
    return "retry", _uint(raw, "then") / 1000.0


def decode_worker(frames: list[bytes]) -> WorkerMessage:
    """Decode what a worker sent (frames after the ROUTER identity)."""
    if not frames:
        raise ProtocolError("empty message", "no frames")
    words = _line(frames, RWW)
    cmd = words[1]
    if cmd == RESULT:
        if len(words) != 6 or len(frames) < 2:
            raise ProtocolError("bad RESULT", "needs id, attempt, token, ready and >= 1 frame")
        return WorkerResult(
            check_job_id(words[2]), _uint(words[3], "attempt", 1), check_token(words[4]),
            _flag(words[5], "ready"), frames[1:],
        )
    if cmd == HEARTBEAT:
        if len(words) != 2:
            raise ProtocolError("bad HEARTBEAT", "takes no fields")
        return _HEARTBEAT
    if cmd == ERROR:
        if len(words) != 7:
            raise ProtocolError("bad ERROR", "needs id, attempt, token, ready, then and an error "
                                "text frame")
        then, after = _then(words[6])
        return WorkerError(
            check_job_id(words[2]), _uint(words[3], "attempt", 1), check_token(words[4]),
            _flag(words[5], "ready"), _text(_tail(frames, "ERROR")), then, after,
        )
    if cmd == PROGRESS:
        if len(words) != 5:
            raise ProtocolError("bad PROGRESS", "needs id, attempt and token, then one JSON frame")
        return WorkerProgress(check_job_id(words[2]), _uint(words[3], "attempt", 1),
                              check_token(words[4]), _progress_report(_tail(frames, "PROGRESS")))
    if cmd == HELLO:
        if len(words) not in (3, 6):
            raise ProtocolError("bad HELLO", "needs queues, then optionally job id, attempt and token")
        names = words[2].split(b",")
        if len(names) > MAX_WORKER_QUEUES:
            raise ProtocolError("bad HELLO", f"more than {MAX_WORKER_QUEUES} queues")
        queues = tuple(dict.fromkeys(check_queue(q) for q in names))
        if len(frames) != 2:
            raise ProtocolError("bad HELLO", "needs exactly one info frame after the line "
                                "(an empty frame means {})")
        info = _json_object(frames[1], "info")
        prefetch = check_prefetch(info.get("prefetch"))
        if len(words) == 3:
            return Hello(queues, info, None, 0, b"", prefetch)
        return Hello(queues, info, check_job_id(words[3]), _uint(words[4], "attempt", 1),
                     check_token(words[5]), prefetch)
    if cmd == RETURN:
        if len(words) != 5 or len(frames) != 1:
            raise ProtocolError("bad RETURN", "needs id, attempt and token, and nothing more")
        return Return(check_job_id(words[2]), _uint(words[3], "attempt", 1), check_token(words[4]))
    if cmd == BYE:
        if len(words) != 2:
            raise ProtocolError("bad BYE", "takes no fields")
        return _BYE
    if cmd == VACATE:
        if len(words) != 2 or len(frames) not in (2, 3):
            raise ProtocolError("bad VACATE", "takes no fields, then the slot and optionally "
                                "the incarnation, one frame each")
        return Vacate(check_slot(frames[1]), check_slot(frames[2]) if len(frames) == 3 else None)
    if cmd == RESULTS:
        answers: list[WorkerResult | WorkerError] = []
        for part in _split(frames, _counts(words[2:], "RESULTS", 2), "RESULTS"):
            if not part[0].startswith(b"RWW3 RESULT ") and not part[0].startswith(b"RWW3 ERROR "):
                raise ProtocolError("bad RESULTS", "carries only RESULT and ERROR messages")
            answer = decode_worker(part)
            assert isinstance(answer, (WorkerResult, WorkerError))
            answers.append(answer)
        return Answers(answers)
    raise ProtocolError("unknown command", repr(cmd[:20]))


def encode_hello(
    queues: tuple[str, ...] | list[str], info: dict[str, Any], job_id: str | None = None,
    attempt: int = 0, token: bytes = b"",
) -> list[bytes]:
    line = b"RWW3 HELLO " + ",".join(queues).encode()
    if job_id:
        line += b" %s %d %s" % (job_id.encode(), attempt, token)
    return [line, json.dumps(info).encode()]


def encode_worker_result(
    job_id: str, attempt: int, token: bytes, ready: bool, payload: list[bytes]
) -> list[bytes]:
    if not payload:
        raise ValueError("a result needs at least one frame")
    return [b"RWW3 RESULT %s %d %s %d" % (job_id.encode(), attempt, token, ready), *payload]


def encode_worker_error(job_id: str, attempt: int, token: bytes, ready: bool, error: str,
                        then: str = "", retry_after: float | None = None) -> list[bytes]:
    if then == "retry":
        word = b"%d" % max(0, round((retry_after or 0.0) * 1000))
    else:
        word = then.encode() or b"-"
    return [b"RWW3 ERROR %s %d %s %d %s" % (job_id.encode(), attempt, token, ready, word),
            error.encode("utf-8", "replace")]


def encode_worker_progress(job_id: str, attempt: int, token: bytes, report: bytes) -> list[bytes]:
    """``report`` is the JSON object already encoded (the worker checks its size as it does)."""
    return [b"RWW3 PROGRESS %s %d %s" % (job_id.encode(), attempt, token), report]


def encode_worker_answers(answers: list[list[bytes]]) -> list[bytes]:
    """RESULTS: RESULT and ERROR messages (as their encoders made them), oldest job first,
    after one line giving each one's frame count."""
    if len(answers) == 1:
        return answers[0]
    line = b"RWW3 RESULTS " + b" ".join(b"%d" % len(a) for a in answers)
    return [line, *(f for a in answers for f in a)]


def encode_return(job_id: str, attempt: int, token: bytes) -> list[bytes]:
    return [b"RWW3 RETURN %s %d %s" % (job_id.encode(), attempt, token)]


def encode_vacate(slot: str, incarnation: str | None = None) -> list[bytes]:
    frames = [b"RWW3 VACATE", slot.encode()]
    if incarnation:
        frames.append(incarnation.encode())
    return frames


HEARTBEAT_FRAMES = [b"RWW3 HEARTBEAT"]  #: both directions; never mutate
BYE_FRAMES = [b"RWW3 BYE"]


# --- broker -> worker ------------------------------------------------------------------------


class Welcome(NamedTuple):
    broker_id: str
    heartbeat: float  # seconds between the broker's heartbeats
    liveness: int  # beats the broker may miss before the worker reconnects
    max_message_size: int | None = None  # the largest frame the broker takes


class Dispatch(NamedTuple):
    """JOB: an attempt of a job, for this worker to run."""

    job_id: str
    attempt: int
    timeout: float
    token: bytes
    queue: str
    priority: int
    tries: int
    created: float  #: when the broker took the job in (epoch seconds)
    payload: list[bytes]


class Dispatches(NamedTuple):
    """JOBS: attempts for a prefetching worker to run one at a time, in this order.
    ``answered``: how many answers the broker has applied from this registration (the
    worker's answers up to that count are confirmed)."""

    answered: int
    jobs: list[Dispatch]


class Abandon(NamedTuple):
    """The job has ended (done elsewhere, failed, cancelled): stop this attempt."""

    job_id: str
    attempt: int
    why: str  #: how the job ended: done, failed, cancelled or expired


class Ack(NamedTuple):
    job_id: str
    attempt: int


class Disconnect(NamedTuple):
    reason: str


class DrainOrder(NamedTuple):
    """DRAIN from the broker: finish the job in hand (if any), answer it, say BYE and leave,
    as on a first SIGTERM."""


BrokerMessage = Union[Welcome, Dispatch, Dispatches, Abandon, Ack, Heartbeat, Disconnect,
                      DrainOrder]

_DRAIN_ORDER = DrainOrder()
DRAIN_FRAMES = [b"RWW3 DRAIN"]  #: broker -> worker; never mutate


def encode_welcome(
    broker_id: str, heartbeat: float, liveness: int, max_message_size: int | None = None
) -> list[bytes]:
    info = {"broker": broker_id, "heartbeat": heartbeat, "liveness": liveness,
            "max_message_size": max_message_size}
    return [b"RWW3 WELCOME", json.dumps(info).encode()]


#: (timeout, queue, priority, tries) -> their words in JOB: most jobs share a few of these,
#: and formatting them once is the cheapest part of the broker's hot path to save.
_JOB_WORDS: dict[tuple[float, bytes, int, int], tuple[bytes, bytes]] = {}


def encode_job(
    job_id: bytes, attempt: int, timeout: float, token: bytes, queue: bytes, priority: int,
    tries: int, created: float, payload: list[bytes],
) -> list[bytes]:
    key = (timeout, queue, priority, tries)
    words = _JOB_WORDS.get(key)
    if words is None:
        if len(_JOB_WORDS) >= 4096:
            _JOB_WORDS.clear()
        words = _JOB_WORDS[key] = (b"%d" % max(1, round(timeout * 1000)),
                                   b"%s %d %d" % (queue, priority, tries))
    return [b"RWW3 JOB %s %d %s %s %s %d" % (
        job_id, attempt, words[0], token, words[1], round(created * 1000)), *payload]


def encode_jobs(answered: int, jobs: list[list[bytes]]) -> list[bytes]:
    """JOBS: JOB messages (as :func:`encode_job` made them), after one line giving the
    answers applied so far and each JOB's frame count."""
    line = b"RWW3 JOBS %d " % answered + b" ".join(b"%d" % len(j) for j in jobs)
    return [line, *(f for j in jobs for f in j)]


def encode_abandon(job_id: bytes, attempt: int, why: str) -> list[bytes]:
    return [b"RWW3 ABANDON %s %d %s" % (job_id, attempt, why.encode())]


def encode_ack(job_id: bytes, attempt: int) -> list[bytes]:
    return [b"RWW3 ACK %s %d" % (job_id, attempt)]


def encode_disconnect(reason: str, version: bytes = RWW) -> list[bytes]:
    """DISCONNECT in ``version``'s words (an old worker is told why in its own version)."""
    return [version + b" DISCONNECT", reason.encode()]


def decode_broker(frames: list[bytes]) -> BrokerMessage:
    """Decode what the broker sent a worker's DEALER."""
    if not frames:
        raise ProtocolError("empty message", "no frames")
    words = _line(frames, RWW)
    cmd = words[1]
    if cmd == JOB:
        if len(words) != 10 or len(frames) < 2:
            raise ProtocolError("bad JOB", "needs id, attempt, timeout, token, queue, priority, "
                                "tries, created and >= 1 payload frame")
        return Dispatch(
            check_job_id(words[2]), _uint(words[3], "attempt", 1),
            _uint(words[4], "timeout", 1) / 1000.0, check_token(words[5]), check_queue(words[6]),
            _uint(words[7], "priority"), _uint(words[8], "tries", 1),
            _uint(words[9], "created", digits=15) / 1000.0, frames[1:],
        )
    if cmd == JOBS:
        if len(words) < 4:
            raise ProtocolError("bad JOBS", "needs the answers applied and >= 1 frame count")
        answered = _uint(words[2], "answered")
        jobs: list[Dispatch] = []
        for part in _split(frames, _counts(words[3:], "JOBS", 2), "JOBS"):
            if not part[0].startswith(b"RWW3 JOB "):
                raise ProtocolError("bad JOBS", "carries only JOB messages")
            job = decode_broker(part)
            assert isinstance(job, Dispatch)
            jobs.append(job)
        return Dispatches(answered, jobs)
    if cmd == ABANDON:
        if len(words) != 5 or len(frames) != 1:
            raise ProtocolError("bad ABANDON", "needs id, attempt and why, and nothing more")
        return Abandon(check_job_id(words[2]), _uint(words[3], "attempt", 1),
                       check_name(words[4], "why"))
    if cmd == HEARTBEAT:
        if len(words) != 2 or len(frames) != 1:
            raise ProtocolError("bad HEARTBEAT", "takes no fields or frames")
        return _HEARTBEAT
    if cmd == ACK:
        if len(words) != 4 or len(frames) != 1:
            raise ProtocolError("bad ACK", "needs id and attempt, and nothing more")
        return Ack(check_job_id(words[2]), _uint(words[3], "attempt", 1))
    if cmd == WELCOME:
        if len(words) != 2:
            raise ProtocolError("bad WELCOME", "takes no fields")
        info = _json_object(_tail(frames, "WELCOME"), "welcome")
        try:
            size = info.get("max_message_size")
            return Welcome(str(info["broker"]), float(info["heartbeat"]), int(info["liveness"]),
                           None if size is None else int(size))
        except (KeyError, TypeError, ValueError, OverflowError) as exc:
            raise ProtocolError("bad WELCOME", f"missing or wrong field {exc}") from None
    if cmd == DISCONNECT:
        if len(words) != 2 or len(frames) > 2:
            raise ProtocolError("bad DISCONNECT", "takes no fields and at most a reason frame")
        return Disconnect(_text(frames[1]) if len(frames) > 1 else "")
    if cmd == DRAIN:
        if len(words) != 2 or len(frames) != 1:
            raise ProtocolError("bad DRAIN", "takes no fields or frames")
        return _DRAIN_ORDER
    raise ProtocolError("unknown command", repr(cmd[:20]))


# ================================================================================================
# status endpoint
# ================================================================================================


def decode_status_request(frames: list[bytes]) -> None:
    """Validate a status request (frames after the ROUTER identity)."""
    if len(frames) != 3 or frames[0] or frames[1] != RWS or frames[2] != STATUS:
        raise ProtocolError("bad status request", "expected '' RWS1 STATUS")


def encode_status_request() -> list[bytes]:
    return [_EMPTY, RWS, STATUS]


def encode_snapshot(snapshot: dict[str, Any]) -> list[bytes]:
    return [_EMPTY, RWS, SNAPSHOT, json.dumps(snapshot).encode()]


def encode_status_invalid(reason: str) -> list[bytes]:
    return [_EMPTY, RWS, INVALID, reason.encode()]


def decode_snapshot(frames: list[bytes]) -> dict[str, Any]:
    """Decode a status reply as received by a REQ socket (delimiter already stripped)."""
    if len(frames) == 4 and not frames[0]:
        frames = frames[1:]  # a DEALER sees the delimiter
    if len(frames) != 3 or frames[0] != RWS:
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
