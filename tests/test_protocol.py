"""Unit tests of the RWP/1 wire protocol: encode/decode round trips and rejections."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from respworkers import protocol as p
from respworkers.errors import ProtocolError

pytestmark = pytest.mark.timeout(30)


def reason_of(fn, *args) -> str:
    with pytest.raises(ProtocolError) as info:
        fn(*args)
    return info.value.reason


# ================================================================================================
# field codecs
# ================================================================================================


@pytest.mark.parametrize("raw", [b"a", b"job-1", "caf\u00e9:\u2603".encode(), b"x" * 200, b"a/b?c=d"])
def test_check_job_id_accepts(raw):
    assert p.check_job_id(raw) == raw.decode()


@pytest.mark.parametrize(
    "raw",
    [b"", b"x" * 201, b"\xff\xfe", b"a b", b"a\tb", b"a\nb", b"a\x00b", "a\u00a0b".encode(), b"\x7f"],
)
def test_check_job_id_rejects(raw):
    assert reason_of(p.check_job_id, raw) == "bad job id"


@pytest.mark.parametrize("raw", [b"default", b"a", b"A.b_c-9", b"q" * 64])
def test_check_queue_accepts(raw):
    assert p.check_queue(raw) == raw.decode()
    assert p.check_queue(raw) == raw.decode()  # memoised path


@pytest.mark.parametrize("raw", [b"", b"q" * 65, b"a/b", b"a b", b"a,b", "caf\u00e9".encode(), b"\xff"])
def test_check_queue_rejects(raw):
    assert reason_of(p.check_queue, raw) == "bad queue"


# ================================================================================================
# clients endpoint
# ================================================================================================


def test_submit_round_trip():
    frames = p.encode_submit("job-1", "gpu", 2.5, 4, [b"a", b"", b"c"])
    assert frames == [b"", b"RWC1", b"SUBMIT", b"job-1", b"gpu", b"2500", b"4", b"a", b"", b"c"]
    assert p.decode_client(frames) == p.Submit("job-1", "gpu", 2.5, 4, [b"a", b"", b"c"])


def test_submit_round_trip_defaults():
    frames = p.encode_submit("j", "", None, None, [b"x"])
    assert frames[4:7] == [b"", b"", b""]
    assert p.decode_client(frames) == p.Submit("j", p.DEFAULT_QUEUE, None, None, [b"x"])


def test_submit_timeout_rounds_to_at_least_one_ms():
    frames = p.encode_submit("j", "q", 0.0001, 1, [b"x"])
    assert frames[5] == b"1"
    assert p.decode_client(frames).timeout == 0.001


def test_encode_submit_needs_payload():
    with pytest.raises(ValueError):
        p.encode_submit("j", "q", None, None, [])


@pytest.mark.parametrize("cmd", [p.WAIT, p.QUERY, p.CANCEL])
def test_job_ref_round_trip(cmd):
    frames = p.encode_job_ref(cmd, "job-9")
    assert frames == [b"", b"RWC1", cmd, b"job-9"]
    assert p.decode_client(frames) == p.JobRef(cmd, "job-9")


def test_ping_round_trip():
    assert p.encode_ping() == [b"", b"RWC1", b"PING"]
    assert p.decode_client(p.encode_ping()) == p.Ping()


def test_plain_request():
    assert p.decode_client([b"", b"hello", b"world"]) == p.Plain([b"hello", b"world"])
    assert p.decode_client([b"", b""]) == p.Plain([b""])
    # another version of the header is refused, not taken for a payload
    with pytest.raises(ProtocolError) as err:
        p.decode_client([b"", b"RWC2", b"SUBMIT"])
    assert err.value.reason == "unsupported version"
    assert p.decode_client([b"", b"RWX2", b"SUBMIT"]) == p.Plain([b"RWX2", b"SUBMIT"])


@pytest.mark.parametrize(
    "frames, reason",
    [
        ([], "no delimiter"),
        ([b""], "no delimiter"),
        ([b"x", b"RWC1", b"PING"], "no delimiter"),
        ([b"", b"RWC1"], "no command"),
        ([b"", b"RWC1", b"FROB"], "unknown command"),
        ([b"", b"RWC1", b"submit", b"j", b"", b"", b"", b"x"], "unknown command"),
        ([b"", b"RWC1", b"SUBMIT", b"j", b"", b"", b""], "short SUBMIT"),
        ([b"", b"RWC1", b"SUBMIT", b"", b"", b"", b"", b"x"], "bad job id"),
        ([b"", b"RWC1", b"SUBMIT", b"a b", b"", b"", b"", b"x"], "bad job id"),
        ([b"", b"RWC1", b"SUBMIT", b"j", b"no/slash", b"", b"", b"x"], "bad queue"),
        ([b"", b"RWC1", b"SUBMIT", b"j", b"", b"0", b"", b"x"], "bad timeout"),
        ([b"", b"RWC1", b"SUBMIT", b"j", b"", b"-5", b"", b"x"], "bad timeout"),
        ([b"", b"RWC1", b"SUBMIT", b"j", b"", b"1.5", b"", b"x"], "bad timeout"),
        ([b"", b"RWC1", b"SUBMIT", b"j", b"", b"1" * 13, b"", b"x"], "bad timeout"),
        ([b"", b"RWC1", b"SUBMIT", b"j", b"", b"", b"0", b"x"], "bad tries"),
        ([b"", b"RWC1", b"SUBMIT", b"j", b"", b"", b"two", b"x"], "bad tries"),
        ([b"", b"RWC1", b"WAIT"], "bad WAIT"),
        ([b"", b"RWC1", b"QUERY", b"a", b"b"], "bad QUERY"),
        ([b"", b"RWC1", b"CANCEL", b""], "bad job id"),
    ],
)
def test_decode_client_rejects(frames, reason):
    assert reason_of(p.decode_client, frames) == reason


# --- broker -> client ------------------------------------------------------------------------


def test_reply_round_trips():
    assert p.decode_reply(p.encode_accepted([b"j"])) == p.Reply(p.ACCEPTED, "j", [])
    assert p.decode_reply(p.encode_accepted([b"j", b"k"])) == p.Reply(p.ACCEPTED, "j", [b"k"])
    assert p.decode_reply(p.encode_result("j", [b"r1", b"r2"])) == p.Reply(p.RESULT, "j", [b"r1", b"r2"])
    assert p.decode_reply(p.encode_failed("j", "timeout", "boom")) == p.Reply(
        p.FAILED, "j", [b"timeout", b"boom"]
    )
    assert p.decode_reply(p.encode_cancelled("j")) == p.Reply(p.CANCELLED, "j", [])
    assert p.decode_reply(p.encode_refused("j", "full", "no room")) == p.Reply(
        p.REFUSED, "j", [b"full", b"no room"]
    )
    info = {"state": "running", "attempt": 2, "workers_tried": ["a", "b"]}
    assert p.decode_reply(p.encode_info("j", info)) == p.Reply(p.INFO, "j", [json.dumps(info).encode()], info)
    assert p.decode_reply(p.encode_unknown("j")) == p.Reply(p.UNKNOWN, "j", [])
    pong = p.decode_reply(p.encode_pong("brk", {"max_tries": 3}))
    assert pong == p.Reply(p.PONG, "", [b"brk", b'{"max_tries": 3}'])
    assert p.decode_pong(pong) == ("brk", {"max_tries": 3})
    assert p.decode_reply(p.encode_invalid("bad job id")) == p.Reply(p.INVALID, "", [b"bad job id"])


def test_plain_reply():
    assert p.encode_plain_reply([b"a", b"b"]) == [b"", b"a", b"b"]
    assert p.encode_plain_reply(None) == [b"", b""]
    assert p.encode_plain_reply([]) == [b"", b""]


@pytest.mark.parametrize(
    "frames, reason",
    [
        ([b"", b"RWC1"], "bad reply"),
        ([b"x", b"RWC1", b"RESULT", b"j"], "bad reply"),
        ([b"", b"RWW1", b"RESULT", b"j"], "bad reply"),
        ([b"", b"RWC1", b"RESULT"], "bad reply"),
        ([b"", b"RWC1", b"FAILED", b"j", b"timeout"], "bad reply"),
        ([b"", b"RWC1", b"REFUSED", b"j", b"a", b"b", b"c"], "bad reply"),
        ([b"", b"RWC1", b"INFO", b"j"], "bad reply"),
        ([b"", b"RWC1", b"INFO", b"j", b"{nope"], "bad info"),
        ([b"", b"RWC1", b"INFO", b"j", b"[1, 2]"], "bad info"),
        ([b"", b"RWC1", b"WHAT", b"j"], "unknown command"),
    ],
)
def test_decode_reply_rejects(frames, reason):
    assert reason_of(p.decode_reply, frames) == reason


# ================================================================================================
# workers endpoint
# ================================================================================================


def test_hello_round_trip():
    info = {"name": "w1", "slot": "h:1:0", "heartbeat": 2.0}
    frames = p.encode_hello(("a", "b"), info, None, 0)
    assert frames[:3] == [b"RWW1", b"HELLO", b"a,b"]
    assert frames[4:] == [b"", b""]
    assert p.decode_worker(frames) == p.Hello(("a", "b"), info, None, 0)


def test_hello_round_trip_mid_job():
    frames = p.encode_hello(["q"], {}, "job-7", 3)
    assert frames[4:] == [b"job-7", b"3"]
    assert p.decode_worker(frames) == p.Hello(("q",), {}, "job-7", 3)


def test_hello_defaults_and_dedup():
    assert p.decode_worker([b"RWW1", b"HELLO", b"", b"", b"", b""]) == p.Hello(("default",), {}, None, 0)
    # repeated queue names collapse, order kept; the attempt is ignored without a job id
    got = p.decode_worker([b"RWW1", b"HELLO", b"b,a,b", b"{}", b"", b"9"])
    assert got == p.Hello(("b", "a"), {}, None, 0)


def test_worker_result_round_trip():
    frames = p.encode_worker_result("j", 2, True, [b"r", b""])
    assert frames == [b"RWW1", b"RESULT", b"j", b"2", b"1", b"r", b""]
    assert p.decode_worker(frames) == p.WorkerResult("j", 2, True, [b"r", b""])
    assert p.decode_worker(p.encode_worker_result("j", 1, False, [b"x"])).ready is False
    with pytest.raises(ValueError):
        p.encode_worker_result("j", 1, True, [])


def test_worker_error_round_trip():
    frames = p.encode_worker_error("j", 3, False, "Traceback: \u2603 boom")
    assert frames[:5] == [b"RWW1", b"ERROR", b"j", b"3", b"0"]
    assert p.decode_worker(frames) == p.WorkerError("j", 3, False, "Traceback: \u2603 boom")
    # undecodable error text is replaced, never rejected
    raw = [b"RWW1", b"ERROR", b"j", b"1", b"1", b"bad \xff"]
    assert p.decode_worker(raw) == p.WorkerError("j", 1, True, "bad \ufffd")


def test_return_heartbeat_bye_round_trip():
    assert p.decode_worker(p.encode_return("j", 4)) == p.Return("j", 4)
    assert p.decode_worker(p.HEARTBEAT_FRAMES) == p.Heartbeat()
    assert p.decode_worker(p.BYE_FRAMES) == p.Bye()
    assert p.HEARTBEAT_FRAMES == [b"RWW1", b"HEARTBEAT"]
    assert p.BYE_FRAMES == [b"RWW1", b"BYE"]


@pytest.mark.parametrize(
    "frames, reason",
    [
        ([], "bad header"),
        ([b"RWW1"], "bad header"),
        ([b"RWW2", b"HEARTBEAT"], "bad header"),
        ([b"RWC1", b"HELLO", b"", b"", b"", b""], "bad header"),
        ([b"RWW1", b"NOPE"], "unknown command"),
        ([b"RWW1", b"hello", b"", b"", b"", b""], "unknown command"),
        ([b"RWW1", b"RESULT", b"j", b"1", b"1"], "short RESULT"),
        ([b"RWW1", b"RESULT", b"", b"1", b"1", b"r"], "bad job id"),
        ([b"RWW1", b"RESULT", b"j", b"0", b"1", b"r"], "bad attempt"),
        ([b"RWW1", b"RESULT", b"j", b"x", b"1", b"r"], "bad attempt"),
        ([b"RWW1", b"RESULT", b"j", b"1", b"2", b"r"], "bad ready"),
        ([b"RWW1", b"RESULT", b"j", b"1", b"", b"r"], "bad ready"),
        ([b"RWW1", b"RESULT", b"j", b"1", b"yes", b"r"], "bad ready"),
        ([b"RWW1", b"ERROR", b"j", b"1", b"1"], "bad ERROR"),
        ([b"RWW1", b"ERROR", b"j", b"1", b"1", b"e", b"extra"], "bad ERROR"),
        ([b"RWW1", b"ERROR", b"j", b"1", b"T", b"e"], "bad ready"),
        ([b"RWW1", b"HELLO", b"", b"", b""], "bad HELLO"),
        ([b"RWW1", b"HELLO", b"", b"", b"", b"", b""], "bad HELLO"),
        ([b"RWW1", b"HELLO", b"a,,b", b"", b"", b""], "bad queue"),
        ([b"RWW1", b"HELLO", b"a b", b"", b"", b""], "bad queue"),
        ([b"RWW1", b"HELLO", b"", b"{", b"", b""], "bad info"),
        ([b"RWW1", b"HELLO", b"", b"[]", b"", b""], "bad info"),
        ([b"RWW1", b"HELLO", b"", b'"s"', b"", b""], "bad info"),
        ([b"RWW1", b"HELLO", b"", b'{"a": "' + b"x" * 8200 + b'"}', b"", b""], "bad info"),
        ([b"RWW1", b"HELLO", b"", b"{}", b"j", b""], "bad attempt"),
        ([b"RWW1", b"HELLO", b"", b"{}", b"j", b"0"], "bad attempt"),
        ([b"RWW1", b"HELLO", b"", b"{}", b"a b", b"1"], "bad job id"),
        ([b"RWW1", b"RETURN", b"j"], "bad RETURN"),
        ([b"RWW1", b"RETURN", b"j", b"1", b"x"], "bad RETURN"),
        ([b"RWW1", b"RETURN", b"j", b"-1"], "bad attempt"),
    ],
)
def test_decode_worker_rejects(frames, reason):
    assert reason_of(p.decode_worker, frames) == reason


# --- broker -> worker ------------------------------------------------------------------------


def test_welcome_round_trip():
    frames = p.encode_welcome("brk1", 2.5, 4)
    assert frames[:2] == [b"RWW1", b"WELCOME"]
    assert p.decode_broker(frames) == p.Welcome("brk1", 2.5, 4)


def test_job_round_trip():
    frames = p.encode_job(b"job-1", 2, 1.5, [b"in", b""])
    assert frames == [b"RWW1", b"JOB", b"job-1", b"2", b"1500", b"in", b""]
    assert p.decode_broker(frames) == p.Job("job-1", 2, 1.5, [b"in", b""])


def test_broker_heartbeat_and_disconnect_round_trip():
    assert p.decode_broker(p.HEARTBEAT_FRAMES) == p.Heartbeat()
    assert p.decode_broker(p.encode_disconnect("go away")) == p.Disconnect("go away")
    assert p.decode_broker([b"RWW1", b"DISCONNECT"]) == p.Disconnect("")


@pytest.mark.parametrize(
    "frames, reason",
    [
        ([b"RWC1", b"JOB", b"j", b"1", b"1000", b"x"], "bad header"),
        ([b"RWW1"], "bad header"),
        ([b"RWW1", b"JOB", b"j", b"1", b"1000"], "short JOB"),
        ([b"RWW1", b"JOB", b"j", b"0", b"1000", b"x"], "bad attempt"),
        ([b"RWW1", b"JOB", b"j", b"1", b"0", b"x"], "bad timeout"),
        ([b"RWW1", b"JOB", b"j j", b"1", b"10", b"x"], "bad job id"),
        ([b"RWW1", b"WELCOME"], "bad WELCOME"),
        ([b"RWW1", b"WELCOME", b"{}", b"x"], "bad WELCOME"),
        ([b"RWW1", b"WELCOME", b'{"broker": "b", "heartbeat": 1}'], "bad WELCOME"),
        ([b"RWW1", b"WELCOME", b'{"broker": "b", "heartbeat": "x", "liveness": 3}'], "bad WELCOME"),
        ([b"RWW1", b"WELCOME", b'{"broker": "b", "heartbeat": [], "liveness": 3}'], "bad WELCOME"),
        ([b"RWW1", b"WELCOME", b"nope"], "bad welcome"),
        ([b"RWW1", b"READY"], "unknown command"),
    ],
)
def test_decode_broker_rejects(frames, reason):
    assert reason_of(p.decode_broker, frames) == reason


@pytest.mark.parametrize("liveness", [b"Infinity", b"1e400"])
def test_decode_broker_welcome_infinite_liveness_is_a_protocol_error(liveness):
    frames = [b"RWW1", b"WELCOME", b'{"broker": "b", "heartbeat": 1, "liveness": ' + liveness + b"}"]
    assert reason_of(p.decode_broker, frames) == "bad WELCOME"


@pytest.mark.parametrize("which", ["hello-info", "reply-info", "snapshot"])
def test_deeply_nested_json_is_a_protocol_error(which):
    # json.loads raises RecursionError on deep nesting; it must surface as a ProtocolError
    nested = b"[" * 3000 + b"]" * 3000  # 6000 bytes: under MAX_INFO_BYTES
    assert len(nested) < p.MAX_INFO_BYTES
    if which == "hello-info":
        assert reason_of(p.decode_worker, [b"RWW1", b"HELLO", b"", nested, b"", b""]) == "bad info"
    elif which == "reply-info":
        assert reason_of(p.decode_reply, [b"", b"RWC1", b"INFO", b"j", nested]) == "bad info"
    else:
        assert reason_of(p.decode_snapshot, [b"RWS1", b"SNAPSHOT", nested]) == "bad status reply"


def test_large_info_reply_is_accepted_but_large_hello_info_is_not():
    info = {"error": "Traceback\n" + "x" * 50_000}
    assert p.decode_reply(p.encode_info("j", info)).info == info
    hello = p.encode_hello(("q",), info, None, 0)
    assert reason_of(p.decode_worker, hello) == "bad info"


def test_extra_frames_after_ping_heartbeat_and_bye_are_ignored():
    assert p.decode_client([b"", b"RWC1", b"PING", b"x"]) == p.Ping()
    assert p.decode_worker([b"RWW1", b"HEARTBEAT", b"x"]) == p.Heartbeat()
    assert p.decode_worker([b"RWW1", b"BYE", b"x", b"y"]) == p.Bye()
    assert p.decode_broker([b"RWW1", b"HEARTBEAT", b"x"]) == p.Heartbeat()


# ================================================================================================
# status endpoint
# ================================================================================================


def test_status_round_trip():
    p.decode_status_request(p.encode_status_request())
    snap = {"queued": 3, "workers": [{"name": "w"}]}
    frames = p.encode_snapshot(snap)
    assert p.decode_snapshot(frames) == snap  # as a DEALER sees it
    assert p.decode_snapshot(frames[1:]) == snap  # as a REQ sees it


@pytest.mark.parametrize(
    "frames",
    [[b"", b"RWS1"], [b"", b"RWS1", b"SNAPSHOT"], [b"x", b"RWS1", b"STATUS"], [b"", b"RWS2", b"STATUS"],
     [b"", b"RWS1", b"STATUS", b"x"]],
)
def test_decode_status_request_rejects(frames):
    assert reason_of(p.decode_status_request, frames) == "bad status request"


def test_decode_snapshot_rejects():
    assert reason_of(p.decode_snapshot, p.encode_status_invalid("nope")) == "status request refused"
    assert reason_of(p.decode_snapshot, [b"RWS1", b"SNAPSHOT"]) == "bad status reply"
    assert reason_of(p.decode_snapshot, [b"RWS1", b"OTHER", b"{}"]) == "bad status reply"
    assert reason_of(p.decode_snapshot, [b"RWS1", b"SNAPSHOT", b"{"]) == "bad status reply"
    assert reason_of(p.decode_snapshot, [b"RWS1", b"SNAPSHOT", b"[]"]) == "bad status reply"
    assert reason_of(p.decode_snapshot, [b"RWC1", b"SNAPSHOT", b"{}"]) == "bad status reply"


# ================================================================================================
# properties
# ================================================================================================

_TOKENS = [
    b"", b"RWC1", b"RWW1", b"RWS1", b"SUBMIT", b"WAIT", b"QUERY", b"CANCEL", b"PING", b"RESULT",
    b"ERROR", b"HELLO", b"RETURN", b"HEARTBEAT", b"BYE", b"JOB", b"WELCOME", b"DISCONNECT", b"INFO",
    b"FAILED", b"REFUSED", b"ACCEPTED", b"STATUS", b"SNAPSHOT", b"1", b"0", b"2", b"1000", b"job-1",
    b"a,b", b"{}", b"[]", b"{", b'{"broker": "b", "heartbeat": 1, "liveness": 3}', b'{"x": [1, {"y": null}]}',
    b"\xff", b"a b", b"999999999999999",
]
_frame = st.one_of(st.sampled_from(_TOKENS), st.binary(max_size=24))
_frames = st.lists(_frame, max_size=9)


@settings(max_examples=400, deadline=None, derandomize=True, database=None)
@given(_frames)
def test_decoders_raise_only_protocol_errors(frames):
    for decode in (p.decode_client, p.decode_worker, p.decode_broker, p.decode_reply,
                   p.decode_status_request, p.decode_snapshot):
        try:
            decode(list(frames))
        except ProtocolError as exc:
            assert isinstance(exc.reason, str) and exc.reason


@settings(max_examples=300, deadline=None, derandomize=True, database=None)
@given(st.lists(_frame, min_size=0, max_size=7))
def test_decoders_raise_only_protocol_errors_behind_valid_headers(rest):
    for head, decode in (([b"", b"RWC1"], p.decode_client), ([b"RWW1"], p.decode_worker),
                         ([b"RWW1"], p.decode_broker), ([b"", b"RWC1"], p.decode_reply)):
        try:
            decode(head + list(rest))
        except ProtocolError:
            pass


_job_ids = st.text(
    st.characters(whitelist_categories=("L", "M", "N", "P", "S")), min_size=1, max_size=40
).filter(lambda s: len(s.encode()) <= p.MAX_ID_BYTES)
_queues = st.text(st.sampled_from(sorted(p._QUEUE_CHARS)), min_size=1, max_size=64)
_payload = st.lists(st.binary(max_size=16), min_size=1, max_size=4)


@settings(max_examples=200, deadline=None, derandomize=True, database=None)
@given(
    _job_ids, _queues, st.one_of(st.none(), st.integers(1, 10**9)),
    st.one_of(st.none(), st.integers(1, 10**6)), _payload,
)
def test_submit_round_trip_property(job_id, queue, timeout_ms, tries, payload):
    timeout = None if timeout_ms is None else timeout_ms / 1000.0
    got = p.decode_client(p.encode_submit(job_id, queue, timeout, tries, payload))
    assert got == p.Submit(job_id, queue, timeout, tries, payload)


@settings(max_examples=200, deadline=None, derandomize=True, database=None)
@given(_job_ids, st.integers(1, 10**9), st.booleans(), _payload, st.text(max_size=30))
def test_worker_messages_round_trip_property(job_id, attempt, ready, payload, error):
    assert p.decode_worker(p.encode_worker_result(job_id, attempt, ready, payload)) == p.WorkerResult(
        job_id, attempt, ready, payload
    )
    got = p.decode_worker(p.encode_worker_error(job_id, attempt, ready, error))
    text = error.encode("utf-8", "replace").decode("utf-8", "replace")
    assert got == p.WorkerError(job_id, attempt, ready, text)
    assert p.decode_worker(p.encode_return(job_id, attempt)) == p.Return(job_id, attempt)
    hello = p.decode_worker(p.encode_hello(("q",), {}, job_id, attempt))
    assert hello == p.Hello(("q",), {}, job_id, attempt)
    job = p.decode_broker(p.encode_job(job_id.encode(), attempt, attempt / 1000.0, payload))
    assert job == p.Job(job_id, attempt, attempt / 1000.0, payload)


def test_as_frames_is_shared_by_payloads_and_results():
    assert p.as_frames(b"a", "x") == [b"a"]
    assert p.as_frames("é", "x") == ["é".encode()]
    assert p.as_frames([b"a", "b", bytearray(b"c")], "x") == [b"a", b"b", b"c"]
    for bad in ([], 5, [b"a", 5], None):
        with pytest.raises(TypeError):
            p.as_frames(bad, "x")
