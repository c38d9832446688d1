"""Unit tests of the RWP/2 wire protocol: encode/decode round trips and rejections.

On the clients and workers endpoints a message is one command line frame (``RWC3 ...`` or
``RWW3 ...``: words separated by single spaces) followed by payload or text frames.
"""

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
    [b"", b"x" * 201, b"\xff\xfe", b"a b", b"a\tb", b"a\nb", b"a\x00b", "a\u00a0b".encode(), b"\x7f",
     b"a\x1bb", "a\u200bb".encode(), "a\u2028b".encode()],
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
    frames = p.encode_submit("job-1", "gpu", p.Options(2.5, 4), [b"a", b"", b"c"])
    assert frames == [b"RWC3 SUBMIT job-1 gpu timeout=2500,tries=4", b"a", b"", b"c"]
    assert p.decode_client(frames) == p.Submit("job-1", "gpu", p.Options(2.5, 4), [b"a", b"", b"c"])


def test_submit_round_trip_defaults():
    frames = p.encode_submit("j", p.DEFAULT_QUEUE, None, [b"x"])
    assert frames == [b"RWC3 SUBMIT j default -", b"x"]  # "-": the broker's defaults
    assert p.decode_client(frames) == p.Submit("j", p.DEFAULT_QUEUE, p.NO_OPTIONS, [b"x"])
    assert p.encode_submit("j", "q", p.Options(), [b"x"])[0] == b"RWC3 SUBMIT j q -"
    # leading zeros are accepted; options come in any order
    assert p.decode_client([b"RWC3 SUBMIT j q tries=007,timeout=0050", b"x"]) == p.Submit(
        "j", "q", p.Options(0.05, 7), [b"x"])


def test_submit_every_option_round_trips():
    opts = p.Options(timeout=2.5, tries=4, priority=9, delay=0.0, expires=3600.0, tenant="acme-1",
                     backoff=0.25, backoff_max=60.0)
    frames = p.encode_submit("j", "q", opts, [b"x"])
    assert frames[0] == (b"RWC3 SUBMIT j q timeout=2500,tries=4,priority=9,delay=0,"
                         b"expires=3600000,tenant=acme-1,backoff=250,backoff_max=60000")
    assert p.decode_client(frames).options == opts


def test_submit_timeout_rounds_to_at_least_one_ms():
    frames = p.encode_submit("j", "q", p.Options(0.0001, 1), [b"x"])
    assert frames[0] == b"RWC3 SUBMIT j q timeout=1,tries=1"
    assert p.decode_client(frames).options.timeout == 0.001


def test_submit_payload_frames_are_opaque():
    # payload frames that look like command lines, or are empty, are payload
    payload = [b"RWC3 PING", b"", b"a b  c", b"\x00\xff"]
    got = p.decode_client(p.encode_submit("j", "q", None, payload))
    assert got.payload == payload


def test_encode_submit_needs_payload():
    with pytest.raises(ValueError):
        p.encode_submit("j", "q", None, [])


@pytest.mark.parametrize("cmd, record", [(p.QUERY, p.Query), (p.CANCEL, p.Cancel)])
def test_job_ref_round_trip(cmd, record):
    frames = p.encode_job_ref(cmd, "job-9")
    assert frames == [b"RWC3 " + cmd + b" job-9"]
    assert p.decode_client(frames) == record("job-9")
    unicode_id = "caf\u00e9:\u2603"
    assert p.decode_client(p.encode_job_ref(cmd, unicode_id)) == record(unicode_id)


def test_wait_names_one_or_many_jobs():
    assert p.encode_wait(["job-9"]) == [b"RWC3 WAIT job-9"]
    assert p.decode_client(p.encode_job_ref(p.WAIT, "job-9")) == p.Wait(["job-9"])
    assert p.decode_client([b"RWC3 WAIT a b c"]) == p.Wait(["a", "b", "c"])
    many = [f"j{i}" for i in range(p.MAX_BATCH)]
    assert p.decode_client(p.encode_wait(many)) == p.Wait(many)
    assert reason_of(p.decode_client, [b"RWC3 WAIT " + b" ".join(b"j%d" % i for i in range(1001))]
                     ) == "bad WAIT"
    assert reason_of(p.decode_client, [b"RWC3 WAIT a  b"]) == "bad job id"
    with pytest.raises(ValueError):
        p.encode_wait([])


def test_pause_resume_and_drain_round_trip():
    assert p.encode_pause("gpu") == [b"RWC3 PAUSE gpu"]
    assert p.decode_client(p.encode_pause("gpu")) == p.Pause("gpu")
    assert p.encode_resume("gpu") == [b"RWC3 RESUME gpu"]
    assert p.decode_client(p.encode_resume("gpu")) == p.Resume("gpu")
    assert p.encode_drain(["box:42"]) == [b"RWC3 DRAIN", b'{"workers": ["box:42"]}']
    assert p.decode_client(p.encode_drain(["a:1", "a:1", "b:2"], ["h"])) == p.Drain(
        ("a:1", "b:2"), ("h",), False)  # repeats collapsed
    assert p.decode_client(p.encode_drain(everyone=True)) == p.Drain((), (), True)
    # null is absent, unknown keys are ignored, any name a HELLO may carry is fine
    assert p.decode_client([b"RWC3 DRAIN", b'{"workers": null, "hosts": ["h \\u00e9"], "all": false,'
                            b' "future": 1}']) == p.Drain((), ("h \u00e9",), False)
    assert reason_of(p.decode_client, p.encode_drain()) == "bad selector"
    assert reason_of(p.decode_client, [b"RWC3 DRAIN", b'{"workers": ["' + b"x" * 201 + b'"]}']
                     ) == "bad selector"
    assert reason_of(p.decode_client, [b"RWC3 DRAIN", b"{}", b"{}"]) == "bad DRAIN"


def test_paused_resumed_and_draining_replies_round_trip():
    assert p.encode_paused("q", 12, True) == [b"RWC3 PAUSED q 12 1"]
    assert p.decode_reply(p.encode_paused("q", 12, True)) == p.Paused("q", 12, True)
    assert p.decode_reply(p.encode_paused("q", 0, False)) == p.Paused("q", 0, False)
    assert p.encode_resumed("q", 2, 5, True) == [b"RWC3 RESUMED q 2 5 1"]
    assert p.decode_reply(p.encode_resumed("q", 2, 5, False)) == p.Resumed("q", 2, 5, False)
    report = {"asked": [{"name": "box:1", "job": "j"}], "unknown": ["x:2"]}
    assert p.decode_reply(p.encode_draining(report)) == p.Draining(report)
    assert reason_of(p.decode_reply, [b"RWC3 PAUSED q 1 2"]) == "bad changed"
    assert reason_of(p.decode_reply, [b"RWC3 PAUSED q 1"]) == "bad reply"
    assert reason_of(p.decode_reply, [b"RWC3 RESUMED q 1 2 1 x"]) == "bad reply"
    assert reason_of(p.decode_reply, [b"RWC3 DRAINING", b"[]"]) == "bad report"


def test_drain_to_a_worker_round_trips():
    assert p.DRAIN_FRAMES == [b"RWW3 DRAIN"]
    assert p.decode_broker(p.DRAIN_FRAMES) == p.DrainOrder()
    assert reason_of(p.decode_broker, [b"RWW3 DRAIN now"]) == "bad DRAIN"
    assert reason_of(p.decode_broker, [b"RWW3 DRAIN", b"x"]) == "bad DRAIN"


def test_ping_round_trip():
    assert p.encode_ping() == [b"RWC3 PING"]
    assert p.decode_client(p.encode_ping()) == p.Ping()


def test_plain_request():
    """An empty first frame is a REQ envelope: everything after it is the payload."""
    assert p.decode_client([b"", b"hello", b"world"]) == p.Plain([b"hello", b"world"])
    assert p.decode_client([b"", b""]) == p.Plain([b""])
    # behind a REQ envelope nothing is parsed, not even what looks like a command line
    assert p.decode_client([b"", b"RWC3 PING"]) == p.Plain([b"RWC3 PING"])
    # a REQ envelope with nothing after it is refused, not taken for an empty job
    assert reason_of(p.decode_client, [b""]) == "empty request"


def test_other_versions_are_refused_not_taken_for_a_payload():
    assert reason_of(p.decode_client, [b"RWC1 SUBMIT j q -", b"x"]) == "unsupported version"
    assert reason_of(p.decode_client, [b"RWC9 PING"]) == "unsupported version"
    assert reason_of(p.decode_client, [b"RWX2 SUBMIT j q -", b"x"]) == "bad header"
    with pytest.raises(ProtocolError, match="RWC3"):  # the detail names the version spoken
        p.decode_client([b"RWC1 PING"])


@pytest.mark.parametrize(
    "frames, reason",
    [
        # framing and the version word
        ([], "empty message"),
        ([b""], "empty request"),
        ([b"x", b"RWC3 PING"], "bad header"),  # the command line must be the first frame
        ([b"nonsense"], "bad header"),
        ([b"RWW2 PING"], "bad header"),  # the workers' version word
        ([b"rwc2 PING"], "bad header"),
        ([b" RWC3 PING"], "bad header"),  # no space before the first word
        ([b"RWC3\tPING"], "bad header"),  # words are separated by a space, nothing else
        ([b"RWC32 PING"], "bad header"),
        ([b"RWC1 PING"], "unsupported version"),
        ([b"RWC1"], "unsupported version"),
        ([b"RWC9 SUBMIT j default -", b"x"], "unsupported version"),
        ([b"RWC3"], "no command"),
        # commands
        ([b"RWC3 FROB"], "unknown command"),
        ([b"RWC3 submit j default 0 0", b"x"], "unknown command"),
        ([b"RWC3  PING"], "unknown command"),  # double space: an empty command word
        ([b"RWC3 PING\x00"], "unknown command"),
        # SUBMIT: word and frame counts
        ([b"RWC3 SUBMIT j default -"], "bad SUBMIT"),  # no payload frame
        ([b"RWC3 SUBMIT j default", b"x"], "bad SUBMIT"),
        ([b"RWC3 SUBMIT j default - 1", b"x"], "bad SUBMIT"),
        ([b"RWC3 SUBMIT j  default -", b"x"], "bad SUBMIT"),  # double space: 6 words
        ([b"RWC3 SUBMIT", b"x"], "bad SUBMIT"),
        # SUBMIT: fields
        ([b"RWC3 SUBMIT  default -", b"x"], "bad job id"),  # double space: empty id
        ([b"RWC3 SUBMIT a\x00b default -", b"x"], "bad job id"),
        ([b"RWC3 SUBMIT a\tb default -", b"x"], "bad job id"),
        ([b"RWC3 SUBMIT a\nb default -", b"x"], "bad job id"),
        ([b"RWC3 SUBMIT a\x7fb default -", b"x"], "bad job id"),
        ([b"RWC3 SUBMIT \xff default -", b"x"], "bad job id"),
        ([b"RWC3 SUBMIT " + b"x" * 201 + b" default -", b"x"], "bad job id"),
        ([b"RWC3 SUBMIT j  -", b"x"], "bad queue"),  # an empty queue no longer means default
        ([b"RWC3 SUBMIT j no/slash -", b"x"], "bad queue"),
        ([b"RWC3 SUBMIT j a,b -", b"x"], "bad queue"),
        ([b"RWC3 SUBMIT j " + b"q" * 65 + b" -", b"x"], "bad queue"),
        # SUBMIT: options
        ([b"RWC3 SUBMIT j default ", b"x"], "bad options"),  # trailing space: empty options
        ([b"RWC3 SUBMIT j default timeout", b"x"], "bad options"),
        ([b"RWC3 SUBMIT j default colour=red", b"x"], "bad options"),
        ([b"RWC3 SUBMIT j default tries=1,tries=2", b"x"], "bad options"),
        ([b"RWC3 SUBMIT j default tries=1,", b"x"], "bad options"),
        ([b"RWC3 SUBMIT j default timeout=", b"x"], "bad timeout"),
        ([b"RWC3 SUBMIT j default timeout=-5", b"x"], "bad timeout"),
        ([b"RWC3 SUBMIT j default timeout=+5", b"x"], "bad timeout"),
        ([b"RWC3 SUBMIT j default timeout=1.5", b"x"], "bad timeout"),
        ([b"RWC3 SUBMIT j default timeout=1e3", b"x"], "bad timeout"),
        ([b"RWC3 SUBMIT j default timeout=0", b"x"], "bad timeout"),
        ([b"RWC3 SUBMIT j default timeout=" + b"1" * 13, b"x"], "bad timeout"),
        ([b"RWC3 SUBMIT j default tries=two", b"x"], "bad tries"),
        ([b"RWC3 SUBMIT j default tries=0", b"x"], "bad tries"),
        ([b"RWC3 SUBMIT j default tries=-1", b"x"], "bad tries"),
        ([b"RWC3 SUBMIT j default tries=" + b"9" * 13, b"x"], "bad tries"),
        ([b"RWC3 SUBMIT j default priority=10", b"x"], "bad priority"),
        ([b"RWC3 SUBMIT j default priority=x", b"x"], "bad priority"),
        ([b"RWC3 SUBMIT j default delay=-1", b"x"], "bad delay"),
        ([b"RWC3 SUBMIT j default expires=1.5", b"x"], "bad expires"),
        ([b"RWC3 SUBMIT j default tenant=a/b", b"x"], "bad tenant"),
        ([b"RWC3 SUBMIT j default tenant=" + b"t" * 65, b"x"], "bad tenant"),
        ([b"RWC3 SUBMIT j default backoff=x", b"x"], "bad backoff"),
        ([b"RWC3 SUBMIT j default backoff_max=-1", b"x"], "bad backoff_max"),
        # WAIT, QUERY, CANCEL
        ([b"RWC3 WAIT"], "bad WAIT"),
        ([b"RWC3 WAIT j", b"extra"], "bad WAIT"),
        ([b"RWC3 QUERY a b"], "bad QUERY"),
        ([b"RWC3 QUERY j "], "bad QUERY"),  # trailing space: 4 words
        ([b"RWC3 CANCEL j", b""], "bad CANCEL"),
        ([b"RWC3 CANCEL "], "bad job id"),
        ([b"RWC3 WAIT a\nb"], "bad job id"),
        ([b"RWC3 QUERY \xc3"], "bad job id"),
    ],
)
def test_decode_client_rejects(frames, reason):
    assert reason_of(p.decode_client, frames) == reason


# --- broker -> client ------------------------------------------------------------------------


def test_reply_frames_are_one_command_line_plus_text():
    assert p.encode_accepted([b"j"]) == [b"RWC3 ACCEPTED j"]
    assert p.encode_accepted([b"j", b"k", b"j"]) == [b"RWC3 ACCEPTED j k j"]
    assert p.encode_result(b"j", [b"r1", b""]) == [b"RWC3 RESULT j", b"r1", b""]
    assert p.encode_failed(b"j", "timeout", "no answer") == [b"RWC3 FAILED j timeout", b"no answer"]
    assert p.encode_cancelled(b"j") == [b"RWC3 CANCELLED j"]
    assert p.encode_refused("j", "full", "no room") == [b"RWC3 REFUSED j full", b"no room"]
    assert p.encode_info("j", {"a": 1}) == [b"RWC3 INFO j", b'{"a": 1}']
    assert p.encode_unknown("j") == [b"RWC3 UNKNOWN j"]
    assert p.encode_pong("brk", {"max_tries": 3}) == [b"RWC3 PONG brk", b'{"max_tries": 3}']
    assert p.encode_invalid("bad job id: x") == [b"RWC3 INVALID", b"bad job id: x"]


def test_reply_round_trips():
    assert p.decode_reply(p.encode_accepted([b"j"])) == p.Accepted(["j"])
    assert p.decode_reply(p.encode_accepted([b"j", b"k"])) == p.Accepted(["j", "k"])
    assert p.decode_reply(p.encode_result(b"j", [b"r1", b"r2"])) == p.Result("j", [b"r1", b"r2"])
    assert p.decode_reply(p.encode_result(b"j", [b""])) == p.Result("j", [b""])
    assert p.decode_reply(p.encode_failed(b"j", "timeout", "boom")) == p.Failed("j", "timeout", "boom")
    # the error text is one frame whatever it holds: spaces, newlines, nothing
    tb = "Traceback (most recent call last):\n  File \"x\", line 1\nKeyError: 'a b'"
    assert p.decode_reply(p.encode_failed(b"j", "error", tb)) == p.Failed("j", "error", tb)
    assert p.decode_reply(p.encode_failed(b"j", "worker-lost", "")) == p.Failed("j", "worker-lost", "")
    assert p.decode_reply(p.encode_cancelled(b"j")) == p.Cancelled("j")
    assert p.decode_reply(p.encode_refused("j", "full", "no room")) == p.Refused("j", "full", "no room")
    info = {"state": "running", "attempt": 2, "workers_tried": ["a", "b"]}
    assert p.decode_reply(p.encode_info("j", info)) == p.Info("j", info)
    assert p.decode_reply(p.encode_unknown("j")) == p.Unknown("j")
    assert p.decode_reply(p.encode_pong("brk", {"max_tries": 3})) == p.Pong("brk", {"max_tries": 3})
    assert p.decode_reply(p.encode_pong("brk", {"max_tries": 3, "starting": True})) == p.Pong(
        "brk", {"max_tries": 3}, True)
    assert p.decode_reply(p.encode_invalid("bad job id")) == p.Invalid("bad job id")
    text = "bad header: messages start with RWC3"  # INVALID text keeps its spaces
    assert p.decode_reply(p.encode_invalid(text)) == p.Invalid(text)
    assert p.decode_reply(p.RESYNC_FRAMES) == p.Resync()
    assert p.decode_reply(p.encode_results([(b"a", [b"1"]), (b"b", [b"2", b"3"])])) == p.Results(
        [("a", [b"1"]), ("b", [b"2", b"3"])])


def test_encode_failed_and_invalid_never_raise_on_odd_text():
    # a lone surrogate (e.g. from a worker's name) is replaced, not raised on
    assert p.decode_reply(p.encode_failed(b"j", "error", "bad\ud800name")) == p.Failed(
        "j", "error", "bad?name")
    assert p.decode_reply(p.encode_invalid("x\ud800")) == p.Invalid("x?")


def test_decode_pong_rejects_a_missing_id_and_bad_limits():
    assert reason_of(p.decode_reply, [b"RWC3 PONG ", b"{}"]) == "bad reply"  # no broker id
    assert reason_of(p.decode_reply, [b"RWC3 PONG b"]) == "bad PONG"  # no limits frame
    assert reason_of(p.decode_reply, [b"RWC3 PONG b", b"[]"]) == "bad limits"
    assert reason_of(p.decode_reply, [b"RWC3 PONG b", b"{"]) == "bad limits"


def test_plain_reply():
    assert p.encode_plain_reply([b"a", b"b"]) == [b"", b"a", b"b"]
    assert p.encode_plain_reply(None) == [b"", b""]
    assert p.encode_plain_reply([]) == [b"", b""]


@pytest.mark.parametrize(
    "frames, reason",
    [
        ([], "bad reply"),
        ([b""], "bad header"),  # a DEALER client is sent no delimiter
        ([b"", b"RWC3 RESULT j", b"r"], "bad header"),
        ([b"RWW2 RESULT j", b"r"], "bad header"),
        ([b"RWC1 RESULT j", b"r"], "unsupported version"),
        ([b"RWC3"], "no command"),
        ([b"RWC3 RESULT"], "bad reply"),
        ([b"RWC3 RESULT j"], "bad reply"),  # no result frame
        ([b"RWC3 RESULT j k", b"r"], "bad reply"),
        ([b"RWC3 FAILED j", b"boom"], "bad reply"),  # no reason word
        ([b"RWC3 FAILED j timeout x", b"boom"], "bad reply"),
        ([b"RWC3 FAILED j timeout"], "bad FAILED"),  # no error text frame
        ([b"RWC3 FAILED j timeout", b"a", b"b"], "bad FAILED"),
        ([b"RWC3 REFUSED j full x", b"t"], "bad reply"),
        ([b"RWC3 REFUSED j full"], "bad REFUSED"),
        ([b"RWC3 INFO j"], "bad INFO"),
        ([b"RWC3 INFO j", b"{}", b"{}"], "bad INFO"),
        ([b"RWC3 INFO j k", b"{}"], "bad reply"),
        ([b"RWC3 INFO j", b"{nope"], "bad info"),
        ([b"RWC3 INFO j", b"[1, 2]"], "bad info"),
        ([b"RWC3 PONG"], "bad reply"),
        ([b"RWC3 PONG a b", b"{}"], "bad reply"),
        ([b"RWC3 ACCEPTED"], "bad reply"),
        ([b"RWC3 CANCELLED"], "bad reply"),
        ([b"RWC3 UNKNOWN"], "bad reply"),
        ([b"RWC3 WHAT j"], "unknown command"),
        ([b"RWC3 result j", b"r"], "unknown command"),
    ],
)
def test_decode_reply_rejects(frames, reason):
    assert reason_of(p.decode_reply, frames) == reason


# ================================================================================================
# workers endpoint
# ================================================================================================


def test_hello_round_trip():
    info = {"name": "w1", "slot": "h:1:0", "heartbeat": 2.0}
    frames = p.encode_hello(("a", "b"), info)
    assert frames == [b"RWW3 HELLO a,b", json.dumps(info).encode()]
    assert p.decode_worker(frames) == p.Hello(("a", "b"), info, None, 0, b"")


def test_hello_round_trip_mid_job():
    frames = p.encode_hello(["q"], {}, "job-7", 3, b"t0k")
    assert frames == [b"RWW3 HELLO q job-7 3 t0k", b"{}"]
    assert p.decode_worker(frames) == p.Hello(("q",), {}, "job-7", 3, b"t0k")


def test_hello_empty_info_and_dedup():
    # an empty info frame means {}
    assert p.decode_worker([b"RWW3 HELLO default", b""]) == p.Hello(("default",), {}, None, 0, b"")
    # repeated queue names collapse, order kept
    assert p.decode_worker([b"RWW3 HELLO b,a,b", b"{}"]) == p.Hello(("b", "a"), {}, None, 0, b"")
    many = ",".join(f"q{i}" for i in range(p.MAX_WORKER_QUEUES)).encode()
    assert len(p.decode_worker([b"RWW3 HELLO " + many, b"{}"]).queues) == p.MAX_WORKER_QUEUES


def test_worker_result_round_trip():
    frames = p.encode_worker_result("j", 2, b"tk", True, [b"r", b""])
    assert frames == [b"RWW3 RESULT j 2 tk 1", b"r", b""]
    assert p.decode_worker(frames) == p.WorkerResult("j", 2, b"tk", True, [b"r", b""])
    assert p.encode_worker_result("j", 1, b"tk", False, [b"x"])[0] == b"RWW3 RESULT j 1 tk 0"
    assert p.decode_worker(p.encode_worker_result("j", 1, b"tk", False, [b"x"])).ready is False
    with pytest.raises(ValueError):
        p.encode_worker_result("j", 1, b"tk", True, [])


def test_worker_error_round_trip():
    frames = p.encode_worker_error("j", 3, b"tk", False, "Traceback: \u2603 boom")
    assert frames == [b"RWW3 ERROR j 3 tk 0 -", "Traceback: \u2603 boom".encode()]
    assert p.decode_worker(frames) == p.WorkerError("j", 3, b"tk", False, "Traceback: \u2603 boom")
    # undecodable error text is replaced, never rejected
    raw = [b"RWW3 ERROR j 1 tk 1 -", b"bad \xff"]
    assert p.decode_worker(raw) == p.WorkerError("j", 1, b"tk", True, "bad \ufffd")
    assert p.decode_worker([b"RWW3 ERROR j 1 tk 1 -", b""]) == p.WorkerError("j", 1, b"tk", True, "")


def test_worker_error_says_what_the_worker_asks_for():
    for then, after, word in (("fail", None, b"fail"), ("abandoned", None, b"abandoned"),
                              ("retry", 2.5, b"2500"), ("retry", 0.0, b"0")):
        frames = p.encode_worker_error("j", 1, b"tk", True, "e", then, after)
        assert frames[0] == b"RWW3 ERROR j 1 tk 1 " + word
        assert p.decode_worker(frames) == p.WorkerError("j", 1, b"tk", True, "e", then, after)


def test_progress_round_trip_and_size_limit():
    frames = p.encode_worker_progress("j", 2, b"tk", b'{"fraction":0.5}')
    assert frames == [b"RWW3 PROGRESS j 2 tk", b'{"fraction":0.5}']
    assert p.decode_worker(frames) == p.WorkerProgress("j", 2, b"tk", {"fraction": 0.5})
    big = b'{"m":"' + b"x" * p.MAX_PROGRESS_BYTES + b'"}'
    assert reason_of(p.decode_worker, [b"RWW3 PROGRESS j 2 tk", big]) == "bad progress"
    assert reason_of(p.decode_worker, [b"RWW3 PROGRESS j 2 tk", b"[1]"]) == "bad progress"
    assert reason_of(p.decode_worker, [b"RWW3 PROGRESS j 2", b"{}"]) == "bad PROGRESS"


def test_return_heartbeat_bye_vacate_round_trip():
    assert p.encode_return("j", 4, b"tk") == [b"RWW3 RETURN j 4 tk"]
    assert p.decode_worker(p.encode_return("j", 4, b"tk")) == p.Return("j", 4, b"tk")
    assert p.decode_worker(p.HEARTBEAT_FRAMES) == p.Heartbeat()
    assert p.decode_worker(p.BYE_FRAMES) == p.Bye()
    assert p.HEARTBEAT_FRAMES == [b"RWW3 HEARTBEAT"]
    assert p.BYE_FRAMES == [b"RWW3 BYE"]
    assert p.encode_vacate("h:1:0:ab") == [b"RWW3 VACATE", b"h:1:0:ab"]
    assert p.decode_worker(p.encode_vacate("h:1:0:ab")) == p.Vacate("h:1:0:ab")
    frames = p.encode_vacate("h:1:0:ab", "inc9")  # naming the process that died
    assert frames == [b"RWW3 VACATE", b"h:1:0:ab", b"inc9"]
    assert p.decode_worker(frames) == p.Vacate("h:1:0:ab", "inc9")


@pytest.mark.parametrize(
    "frames, reason",
    [
        # framing and the version word
        ([], "empty message"),
        ([b""], "bad header"),
        ([b"", b"RWW3 HEARTBEAT"], "bad header"),  # workers send no delimiter
        ([b"RWC3 HELLO a", b"{}"], "bad header"),
        ([b"RWW3HEARTBEAT"], "bad header"),
        ([b"RWW1 HEARTBEAT"], "unsupported version"),
        ([b"RWW2 HEARTBEAT"], "unsupported version"),  # the previous version: refused
        ([b"RWW9 HEARTBEAT"], "unsupported version"),
        ([b"RWW3"], "no command"),
        ([b"RWW3 NOPE"], "unknown command"),
        ([b"RWW3 hello a", b"{}"], "unknown command"),
        ([b"RWW3  HEARTBEAT"], "unknown command"),  # double space: an empty command word
        # RESULT
        ([b"RWW3 RESULT j 1 t 1"], "bad RESULT"),  # no result frame
        ([b"RWW3 RESULT j 1 1", b"r"], "bad RESULT"),  # no token: RWW2's shape
        ([b"RWW3 RESULT j 1 t 1 1", b"r"], "bad RESULT"),
        ([b"RWW3 RESULT j  1 t 1", b"r"], "bad RESULT"),  # double space: 7 words
        ([b"RWW3 RESULT  1 t 1", b"r"], "bad job id"),
        ([b"RWW3 RESULT a\x1bb 1 t 1", b"r"], "bad job id"),
        ([b"RWW3 RESULT j 0 t 1", b"r"], "bad attempt"),
        ([b"RWW3 RESULT j x t 1", b"r"], "bad attempt"),
        ([b"RWW3 RESULT j -1 t 1", b"r"], "bad attempt"),
        ([b"RWW3 RESULT j 1 t 2", b"r"], "bad ready"),
        ([b"RWW3 RESULT j 1 t ", b"r"], "bad ready"),
        ([b"RWW3 RESULT j 1 t yes", b"r"], "bad ready"),
        ([b"RWW3 RESULT j 1  1", b"r"], "bad token"),  # double space: an empty token
        ([b"RWW3 RESULT j 1 " + b"t" * 65 + b" 1", b"r"], "bad token"),
        # ERROR
        ([b"RWW3 ERROR j 1 t 1 -"], "bad ERROR"),  # no error text frame
        ([b"RWW3 ERROR j 1 t 1 -", b"e", b"extra"], "bad ERROR"),
        ([b"RWW3 ERROR j 1 t 1", b"e"], "bad ERROR"),  # no then-word
        ([b"RWW3 ERROR j 1 t 1 - Traceback", b"e"], "bad ERROR"),
        ([b"RWW3 ERROR j 1 t T -", b"e"], "bad ready"),
        ([b"RWW3 ERROR j 0 t 1 -", b"e"], "bad attempt"),
        ([b"RWW3 ERROR a\x00 1 t 1 -", b"e"], "bad job id"),
        ([b"RWW3 ERROR j 1  1 -", b"e"], "bad token"),
        ([b"RWW3 ERROR j 1 t 1 later", b"e"], "bad then"),
        ([b"RWW3 ERROR j 1 t 1 -5", b"e"], "bad then"),
        # HELLO
        ([b"RWW3 HELLO a"], "bad HELLO"),  # no info frame: exactly one is needed
        ([b"RWW3 HELLO a", b"{}", b"x"], "bad HELLO"),
        ([b"RWW3 HELLO", b"{}"], "bad HELLO"),
        ([b"RWW3 HELLO a j", b"{}"], "bad HELLO"),  # a job id without an attempt
        ([b"RWW3 HELLO a j 1", b"{}"], "bad HELLO"),  # and without a token: RWW2's shape
        ([b"RWW3 HELLO a b", b"{}"], "bad HELLO"),  # queues are separated by commas
        ([b"RWW3 HELLO a j 1 t x", b"{}"], "bad HELLO"),
        ([b"RWW3 HELLO " + b",".join(b"q%d" % i for i in range(p.MAX_WORKER_QUEUES + 1)), b"{}"],
         "bad HELLO"),
        ([b"RWW3 HELLO ", b"{}"], "bad queue"),  # an empty list no longer means default
        ([b"RWW3 HELLO a,,b", b"{}"], "bad queue"),
        ([b"RWW3 HELLO a,", b"{}"], "bad queue"),
        ([b"RWW3 HELLO a/b", b"{}"], "bad queue"),
        ([b"RWW3 HELLO a", b"{"], "bad info"),
        ([b"RWW3 HELLO a", b"[]"], "bad info"),
        ([b"RWW3 HELLO a", b'"s"'], "bad info"),
        ([b"RWW3 HELLO a", b"\xff"], "bad info"),
        ([b"RWW3 HELLO a", b'{"a": "' + b"x" * 8200 + b'"}'], "bad info"),
        ([b"RWW3 HELLO a j  t", b"{}"], "bad attempt"),
        ([b"RWW3 HELLO a j 0 t", b"{}"], "bad attempt"),
        ([b"RWW3 HELLO a  1 t", b"{}"], "bad job id"),  # double space: an empty job id
        ([b"RWW3 HELLO a a\x00b 1 t", b"{}"], "bad job id"),
        ([b"RWW3 HELLO a j 1 ", b"{}"], "bad token"),
        # RETURN
        ([b"RWW3 RETURN j 1"], "bad RETURN"),
        ([b"RWW3 RETURN j 1 t x"], "bad RETURN"),
        ([b"RWW3 RETURN j 1 t "], "bad RETURN"),  # trailing space: 6 words
        ([b"RWW3 RETURN j -1 t"], "bad attempt"),
        ([b"RWW3 RETURN j 0 t"], "bad attempt"),
        ([b"RWW3 RETURN  1 t"], "bad job id"),
        ([b"RWW3 RETURN j 1 "], "bad token"),
        # VACATE
        ([b"RWW3 VACATE"], "bad VACATE"),
        ([b"RWW3 VACATE", b""], "bad slot"),
        ([b"RWW3 VACATE x", b"slot"], "bad VACATE"),
        ([b"RWW3 VACATE", b"slot", b"inc", b"more"], "bad VACATE"),
        ([b"RWW3 VACATE", b"slot", b""], "bad slot"),
    ],
)
def test_decode_worker_rejects(frames, reason):
    assert reason_of(p.decode_worker, frames) == reason


# --- broker -> worker ------------------------------------------------------------------------


def test_welcome_round_trip():
    frames = p.encode_welcome("brk1", 2.5, 4)
    assert frames[0] == b"RWW3 WELCOME" and len(frames) == 2
    assert json.loads(frames[1]) == {"broker": "brk1", "heartbeat": 2.5, "liveness": 4,
                                     "max_message_size": None}
    assert p.decode_broker(frames) == p.Welcome("brk1", 2.5, 4)
    assert p.decode_broker(p.encode_welcome("b", 1.0, 3, 4096)) == p.Welcome("b", 1.0, 3, 4096)


def test_job_round_trip():
    frames = p.encode_job(b"job-1", 2, 1.5, b"tk", b"gpu", 7, 3, 1700000000.25, [b"in", b""])
    assert frames == [b"RWW3 JOB job-1 2 1500 tk gpu 7 3 1700000000250", b"in", b""]
    assert p.decode_broker(frames) == p.Dispatch("job-1", 2, 1.5, b"tk", "gpu", 7, 3, 1700000000.25,
                                                 [b"in", b""])
    # JOB's timeout is at least 1 ms
    assert p.encode_job(b"j", 1, 0.0, b"tk", b"q", 5, 1, 0, [b"x"])[0] == b"RWW3 JOB j 1 1 tk q 5 1 0"


def test_abandon_round_trip():
    assert p.encode_abandon(b"job-1", 2, "cancelled") == [b"RWW3 ABANDON job-1 2 cancelled"]
    assert p.decode_broker([b"RWW3 ABANDON job-1 2 done"]) == p.Abandon("job-1", 2, "done")
    assert reason_of(p.decode_broker, [b"RWW3 ABANDON job-1 2"]) == "bad ABANDON"
    assert reason_of(p.decode_broker, [b"RWW3 ABANDON job-1 0 done"]) == "bad attempt"


def test_ack_round_trip():
    assert p.encode_ack(b"job-1", 2) == [b"RWW3 ACK job-1 2"]
    assert p.decode_broker(p.encode_ack(b"job-1", 2)) == p.Ack("job-1", 2)


def test_broker_heartbeat_and_disconnect_round_trip():
    assert p.decode_broker(p.HEARTBEAT_FRAMES) == p.Heartbeat()
    assert p.encode_disconnect("go away") == [b"RWW3 DISCONNECT", b"go away"]
    assert p.decode_broker(p.encode_disconnect("go away")) == p.Disconnect("go away")
    assert p.decode_broker([b"RWW3 DISCONNECT"]) == p.Disconnect("")  # the reason may be absent
    # an old worker is told why in its own version's words
    assert p.encode_disconnect("upgrade", b"RWW2") == [b"RWW2 DISCONNECT", b"upgrade"]


@pytest.mark.parametrize(
    "frames, reason",
    [
        ([], "empty message"),
        ([b"", b"RWW3 JOB j 1 1000 t q 5 1 0", b"x"], "bad header"),
        ([b"RWC3 JOB j 1 1000 t q 5 1 0", b"x"], "bad header"),
        ([b"RWW1 JOB j 1 1000", b"x"], "unsupported version"),
        ([b"RWW3"], "no command"),
        ([b"RWW3 JOB j 1 1000 t q 5 1 0"], "bad JOB"),  # no payload frame
        ([b"RWW3 JOB j 1 1000 t", b"x"], "bad JOB"),  # the RWW2 layout
        ([b"RWW3 JOB j 1 1000 t q 5 1 0 x", b"x"], "bad JOB"),
        ([b"RWW3 JOB j  1 1000 t q 5 1 0", b"x"], "bad JOB"),  # double space: 11 words
        ([b"RWW3 JOB j 0 1000 t q 5 1 0", b"x"], "bad attempt"),
        ([b"RWW3 JOB j 1 0 t q 5 1 0", b"x"], "bad timeout"),
        ([b"RWW3 JOB j 1 x t q 5 1 0", b"x"], "bad timeout"),
        ([b"RWW3 JOB  1 10 t q 5 1 0", b"x"], "bad job id"),
        ([b"RWW3 JOB a\x00b 1 10 t q 5 1 0", b"x"], "bad job id"),
        ([b"RWW3 JOB j 1 10 t a/b 5 1 0", b"x"], "bad queue"),
        ([b"RWW3 JOB j 1 10 t q x 1 0", b"x"], "bad priority"),
        ([b"RWW3 JOB j 1 10 t q 5 0 0", b"x"], "bad tries"),
        ([b"RWW3 JOB j 1 10 t q 5 1 -1", b"x"], "bad created"),
        ([b"RWW3 ACK j"], "bad ACK"),
        ([b"RWW3 ACK j 1", b"x"], "bad ACK"),
        ([b"RWW3 ACK j 0"], "bad attempt"),
        ([b"RWW3 WELCOME"], "bad WELCOME"),
        ([b"RWW3 WELCOME", b"{}", b"x"], "bad WELCOME"),
        ([b"RWW3 WELCOME", b"{}"], "bad WELCOME"),
        ([b"RWW3 WELCOME", b'{"broker": "b", "heartbeat": 1}'], "bad WELCOME"),
        ([b"RWW3 WELCOME", b'{"broker": "b", "heartbeat": "x", "liveness": 3}'], "bad WELCOME"),
        ([b"RWW3 WELCOME", b'{"broker": "b", "heartbeat": [], "liveness": 3}'], "bad WELCOME"),
        ([b"RWW3 WELCOME", b'{"broker": "b", "heartbeat": 1, "liveness": 3, "max_message_size": "x"}'],
         "bad WELCOME"),
        ([b"RWW3 WELCOME", b"nope"], "bad welcome"),
        ([b"RWW3 READY"], "unknown command"),
    ],
)
def test_decode_broker_rejects(frames, reason):
    assert reason_of(p.decode_broker, frames) == reason


@pytest.mark.parametrize("liveness", [b"Infinity", b"1e400"])
def test_decode_broker_welcome_infinite_liveness_is_a_protocol_error(liveness):
    frames = [b"RWW3 WELCOME", b'{"broker": "b", "heartbeat": 1, "liveness": ' + liveness + b"}"]
    assert reason_of(p.decode_broker, frames) == "bad WELCOME"


# ================================================================================================
# the number of words of a command line is fixed per command
# ================================================================================================


_WRONG_WORD_COUNTS = [
    # clients endpoint, client -> broker
    (p.decode_client, [b"RWC3 SUBMIT j default 0", b"x"], "SUBMIT short"),
    (p.decode_client, [b"RWC3 SUBMIT j default 0 0 0", b"x"], "SUBMIT long"),
    (p.decode_client, [b"RWC3 WAIT"], "WAIT short"),
    (p.decode_client, [b"RWC3 WAIT j", b"x"], "WAIT with a frame"),
    (p.decode_client, [b"RWC3 QUERY"], "QUERY short"),
    (p.decode_client, [b"RWC3 QUERY j k"], "QUERY long"),
    (p.decode_client, [b"RWC3 CANCEL"], "CANCEL short"),
    (p.decode_client, [b"RWC3 CANCEL j k"], "CANCEL long"),
    (p.decode_client, [b"RWC3 PAUSE"], "PAUSE short"),
    (p.decode_client, [b"RWC3 PAUSE q r"], "PAUSE long"),
    (p.decode_client, [b"RWC3 RESUME"], "RESUME short"),
    (p.decode_client, [b"RWC3 RESUME q r"], "RESUME long"),
    pytest.param(p.decode_client, [b"RWC3 DRAIN a", b'{"all": true}'], "DRAIN long"),
    pytest.param(p.decode_client, [b"RWC3 PING j"], "PING long"),
    pytest.param(p.decode_client, [b"RWC3 PING "], "PING trailing space"),
    # clients endpoint, broker -> client
    (p.decode_reply, [b"RWC3 ACCEPTED"], "ACCEPTED short"),
    (p.decode_reply, [b"RWC3 RESULT", b"r"], "RESULT short"),
    (p.decode_reply, [b"RWC3 RESULT j k", b"r"], "RESULT long"),
    (p.decode_reply, [b"RWC3 FAILED j", b"e"], "FAILED short"),
    (p.decode_reply, [b"RWC3 FAILED j timeout x", b"e"], "FAILED long"),
    (p.decode_reply, [b"RWC3 CANCELLED"], "CANCELLED short"),
    pytest.param(p.decode_reply, [b"RWC3 CANCELLED j k"], "CANCELLED long"),
    (p.decode_reply, [b"RWC3 REFUSED j", b"t"], "REFUSED short"),
    (p.decode_reply, [b"RWC3 REFUSED j full x", b"t"], "REFUSED long"),
    (p.decode_reply, [b"RWC3 INFO", b"{}"], "INFO short"),
    (p.decode_reply, [b"RWC3 INFO j k", b"{}"], "INFO long"),
    (p.decode_reply, [b"RWC3 UNKNOWN"], "UNKNOWN short"),
    pytest.param(p.decode_reply, [b"RWC3 UNKNOWN j k"], "UNKNOWN long"),
    (p.decode_reply, [b"RWC3 PONG", b"{}"], "PONG short"),
    (p.decode_reply, [b"RWC3 PONG b c", b"{}"], "PONG long"),
    pytest.param(p.decode_reply, [b"RWC3 INVALID x", b"reason"], "INVALID long"),
    (p.decode_reply, [b"RWC3 PAUSED q 1"], "PAUSED short"),
    (p.decode_reply, [b"RWC3 PAUSED q 1 1 x"], "PAUSED long"),
    (p.decode_reply, [b"RWC3 RESUMED q 1 1"], "RESUMED short"),
    (p.decode_reply, [b"RWC3 RESUMED q 1 1 1 x"], "RESUMED long"),
    pytest.param(p.decode_reply, [b"RWC3 DRAINING x", b"{}"], "DRAINING long"),
    # workers endpoint, worker -> broker
    (p.decode_worker, [b"RWW3 HELLO", b"{}"], "HELLO short"),
    (p.decode_worker, [b"RWW3 HELLO q j 1", b"{}"], "HELLO 5 words"),
    (p.decode_worker, [b"RWW3 HELLO q j 1 t x", b"{}"], "HELLO long"),
    (p.decode_worker, [b"RWW3 RESULT j 1 t", b"r"], "RESULT short"),
    (p.decode_worker, [b"RWW3 RESULT j 1 t 1 x", b"r"], "RESULT long"),
    (p.decode_worker, [b"RWW3 ERROR j 1 t 1", b"e"], "ERROR short"),
    (p.decode_worker, [b"RWW3 ERROR j 1 t 1 - x", b"e"], "ERROR long"),
    (p.decode_worker, [b"RWW3 RETURN j 1"], "RETURN short"),
    (p.decode_worker, [b"RWW3 RETURN j 1 t x"], "RETURN long"),
    pytest.param(p.decode_worker, [b"RWW3 HEARTBEAT x"], "HEARTBEAT long"),
    pytest.param(p.decode_worker, [b"RWW3 BYE x"], "BYE long"),
    pytest.param(p.decode_worker, [b"RWW3 VACATE x", b"slot"], "VACATE long"),
    # workers endpoint, broker -> worker
    (p.decode_broker, [b"RWW3 JOB j 1 1000 t q 5 1", b"p"], "JOB short"),
    (p.decode_broker, [b"RWW3 JOB j 1 1000 t q 5 1 0 x", b"p"], "JOB long"),
    (p.decode_broker, [b"RWW3 ACK j"], "ACK short"),
    (p.decode_broker, [b"RWW3 ACK j 1 x"], "ACK long"),
    pytest.param(p.decode_broker, [b"RWW3 WELCOME x", b'{"broker": "b", "heartbeat": 1, "liveness": 3}'],
                 "WELCOME long"),
    pytest.param(p.decode_broker, [b"RWW3 HEARTBEAT x"], "HEARTBEAT long"),
    pytest.param(p.decode_broker, [b"RWW3 DISCONNECT x", b"reason"], "DISCONNECT long"),
    pytest.param(p.decode_broker, [b"RWW3 DRAIN x"], "DRAIN long"),
]


def _must_reject(decode, frames) -> ProtocolError:
    try:
        decode(frames)
    except ProtocolError as exc:
        return exc
    pytest.fail(f"{decode.__name__} accepted {frames!r}")


@pytest.mark.parametrize("decode, frames, case", _WRONG_WORD_COUNTS)
def test_a_command_line_with_a_wrong_number_of_words_is_rejected(decode, frames, case):
    # rejected for its shape, not taken for some other command
    assert _must_reject(decode, frames).reason != "unknown command", case


def test_a_command_line_with_a_wrong_number_of_words_is_rejected_for_every_command():
    """Every command of the spec has at least one wrong-word-count case above."""
    cases = [getattr(case, "values", case) for case in _WRONG_WORD_COUNTS]  # pytest.param or tuple
    covered = {(decode.__name__, frames[0].split(b" ")[1]) for decode, frames, _ in cases}
    expected = {("decode_client", c) for c in (p.SUBMIT, p.WAIT, p.QUERY, p.CANCEL, p.PING, p.PAUSE,
                                               p.RESUME, p.DRAIN)}
    expected |= {("decode_reply", c) for c in (p.ACCEPTED, p.RESULT, p.FAILED, p.CANCELLED, p.REFUSED,
                                               p.INFO, p.UNKNOWN, p.PONG, p.INVALID, p.PAUSED,
                                               p.RESUMED, p.DRAINING)}
    expected |= {("decode_worker", c)
                 for c in (p.HELLO, p.RESULT, p.ERROR, p.RETURN, p.HEARTBEAT, p.BYE, p.VACATE)}
    expected |= {("decode_broker", c) for c in (p.JOB, p.ACK, p.WELCOME, p.HEARTBEAT, p.DISCONNECT,
                                                p.DRAIN)}
    assert covered == expected


@pytest.mark.parametrize(
    "decode, frames",
    [
        pytest.param(p.decode_worker, [b"RWW3 RETURN j 1 t", b"extra"]),
    ],
)
def test_a_command_with_no_further_frames_rejects_extra_frames(decode, frames):
    _must_reject(decode, frames)


# ================================================================================================
# JSON frames
# ================================================================================================


@pytest.mark.parametrize("which", ["hello-info", "reply-info", "snapshot"])
def test_deeply_nested_json_is_a_protocol_error(which):
    # json.loads raises RecursionError on deep nesting; it must surface as a ProtocolError
    nested = b"[" * 3000 + b"]" * 3000  # 6000 bytes: under MAX_INFO_BYTES
    assert len(nested) < p.MAX_INFO_BYTES
    if which == "hello-info":
        assert reason_of(p.decode_worker, [b"RWW3 HELLO q", nested]) == "bad info"
    elif which == "reply-info":
        assert reason_of(p.decode_reply, [b"RWC3 INFO j", nested]) == "bad info"
    else:
        assert reason_of(p.decode_snapshot, [b"RWS1", b"SNAPSHOT", nested]) == "bad status reply"


def test_large_info_reply_is_accepted_but_large_hello_info_is_not():
    info = {"error": "Traceback\n" + "x" * 50_000}
    assert p.decode_reply(p.encode_info("j", info)).info == info
    hello = p.encode_hello(("q",), info)
    assert reason_of(p.decode_worker, hello) == "bad info"


def test_extra_frames_after_ping_heartbeat_and_bye_are_ignored():
    assert p.decode_client([b"RWC3 PING", b"x"]) == p.Ping()
    assert p.decode_worker([b"RWW3 HEARTBEAT", b"x"]) == p.Heartbeat()
    assert p.decode_worker([b"RWW3 BYE", b"x", b"y"]) == p.Bye()


# ================================================================================================
# status endpoint (RWS1: unchanged, a REQ exchange of several frames)
# ================================================================================================


def test_status_round_trip():
    assert p.encode_status_request() == [b"", b"RWS1", b"STATUS"]
    p.decode_status_request(p.encode_status_request())
    snap = {"queued": 3, "workers": [{"name": "w"}]}
    frames = p.encode_snapshot(snap)
    assert frames[:3] == [b"", b"RWS1", b"SNAPSHOT"]
    assert p.decode_snapshot(frames) == snap  # as a DEALER sees it
    assert p.decode_snapshot(frames[1:]) == snap  # as a REQ sees it


@pytest.mark.parametrize(
    "frames",
    [[b"", b"RWS1"], [b"", b"RWS1", b"SNAPSHOT"], [b"x", b"RWS1", b"STATUS"], [b"", b"RWS2", b"STATUS"],
     [b"", b"RWS1", b"STATUS", b"x"], [b"", b"RWS1 STATUS"], [b"RWS1 STATUS"], []],
)
def test_decode_status_request_rejects(frames):
    assert reason_of(p.decode_status_request, frames) == "bad status request"


def test_decode_snapshot_rejects():
    assert reason_of(p.decode_snapshot, p.encode_status_invalid("nope")) == "status request refused"
    assert reason_of(p.decode_snapshot, [b"RWS1", b"SNAPSHOT"]) == "bad status reply"
    assert reason_of(p.decode_snapshot, [b"RWS1", b"OTHER", b"{}"]) == "bad status reply"
    assert reason_of(p.decode_snapshot, [b"RWS1", b"SNAPSHOT", b"{"]) == "bad status reply"
    assert reason_of(p.decode_snapshot, [b"RWS1", b"SNAPSHOT", b"[]"]) == "bad status reply"
    assert reason_of(p.decode_snapshot, [b"RWC3", b"SNAPSHOT", b"{}"]) == "bad status reply"
    assert reason_of(p.decode_snapshot, [b"RWS1 SNAPSHOT", b"{}"]) == "bad status reply"


# ================================================================================================
# properties
# ================================================================================================

_WORDS = [
    b"", b"RWC3", b"RWW2", b"RWC1", b"RWW1", b"RWC9", b"RWS1", b"SUBMIT", b"WAIT", b"QUERY", b"CANCEL",
    b"PING", b"RESULT", b"ERROR", b"HELLO", b"RETURN", b"HEARTBEAT", b"BYE", b"JOB", b"WELCOME",
    b"DISCONNECT", b"ACK", b"VACATE", b"RESYNC", b"RWW3", b"INFO", b"FAILED", b"REFUSED", b"ACCEPTED",
    b"CANCELLED", b"UNKNOWN", b"PONG", b"PAUSE", b"RESUME", b"DRAIN", b"PAUSED", b"RESUMED",
    b"DRAINING",
    b"INVALID", b"STATUS", b"SNAPSHOT", b"1", b"0", b"2", b"1000", b"job-1", b"a,b", b"a,,b",
    b"default", b"\xff", b"\x00", b"a\tb", b"999999999999999", b"-1", b"+1",
]
_TOKENS = [
    b"", b"RWS1", b"STATUS", b"SNAPSHOT", b"{}", b"[]", b"{", b"1",
    b'{"broker": "b", "heartbeat": 1, "liveness": 3}', b'{"x": [1, {"y": null}]}', b"\xff",
    b"a b", b"999999999999999",
]
_word = st.one_of(st.sampled_from(_WORDS), st.binary(max_size=12))
_line = st.builds(
    lambda words, sep: sep.join(words), st.lists(_word, max_size=7),
    st.sampled_from([b" ", b" ", b"  ", b"\t"]),
)
_frame = st.one_of(_line, st.sampled_from(_TOKENS), st.binary(max_size=24))
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


@settings(max_examples=400, deadline=None, derandomize=True, database=None)
@given(st.sampled_from([p.SUBMIT, p.WAIT, p.QUERY, p.CANCEL, p.PING, p.RESULT, p.ERROR, p.HELLO, p.RETURN,
                        p.HEARTBEAT, p.BYE, p.JOB, p.WELCOME, p.DISCONNECT, p.INFO, p.FAILED, p.REFUSED,
                        p.ACCEPTED, p.CANCELLED, p.UNKNOWN, p.PONG, p.INVALID, p.ACK, p.VACATE,
                        p.RESYNC, p.PAUSE, p.RESUME, p.DRAIN, p.PAUSED, p.RESUMED, p.DRAINING]),
       st.lists(_word, max_size=6), st.lists(_frame, max_size=5))
def test_decoders_raise_only_protocol_errors_behind_valid_version_words(command, words, rest):
    for version, decode in ((p.RWC, p.decode_client), (p.RWW, p.decode_worker),
                            (p.RWW, p.decode_broker), (p.RWC, p.decode_reply)):
        line = b" ".join([version, command, *words])
        try:
            decode([line, *rest])
        except ProtocolError:
            pass


_job_ids = st.text(
    st.characters(whitelist_categories=("L", "M", "N", "P", "S")), min_size=1, max_size=40
).filter(lambda s: len(s.encode()) <= p.MAX_ID_BYTES)
_queues = st.text(st.sampled_from(sorted(p._QUEUE_CHARS)), min_size=1, max_size=64)
_payload = st.lists(st.binary(max_size=16), min_size=1, max_size=4)
_text = st.text(max_size=30)


@settings(max_examples=200, deadline=None, derandomize=True, database=None)
@given(
    _job_ids, _queues, st.one_of(st.none(), st.integers(1, 10**9)),
    st.one_of(st.none(), st.integers(1, 10**6)), _payload,
)
def test_submit_round_trip_property(job_id, queue, timeout_ms, tries, payload):
    timeout = None if timeout_ms is None else timeout_ms / 1000.0
    frames = p.encode_submit(job_id, queue, p.Options(timeout, tries), payload)
    assert len(frames) == 1 + len(payload) and frames[0].count(b" ") == 4
    got = p.decode_client(frames)
    assert got == p.Submit(job_id, queue, p.Options(timeout, tries), payload)


@settings(max_examples=200, deadline=None, derandomize=True, database=None)
@given(_job_ids, st.lists(_job_ids, max_size=4), _payload, _text, _text,
       st.dictionaries(st.text(max_size=5), st.integers(), max_size=3))
def test_reply_round_trip_property(job_id, more_ids, payload, error, text, info):
    bid = job_id.encode()
    assert p.decode_reply(p.encode_accepted([bid, *(i.encode() for i in more_ids)])) == p.Accepted(
        [job_id, *more_ids])
    assert p.decode_reply(p.encode_result(bid, payload)) == p.Result(job_id, payload)
    for reason in (p.FAIL_TIMEOUT, p.FAIL_ERROR, p.FAIL_LOST, p.FAIL_CANCELLED):
        assert p.decode_reply(p.encode_failed(bid, reason, error)) == p.Failed(
            job_id, reason, error.encode("utf-8", "replace").decode())
    assert p.decode_reply(p.encode_cancelled(bid)) == p.Cancelled(job_id)
    for code in (p.REFUSE_FULL, p.REFUSE_INVALID, p.REFUSE_LIMIT, p.REFUSE_SHUTDOWN, p.REFUSE_JOURNAL):
        assert p.decode_reply(p.encode_refused(job_id, code, text)) == p.Refused(job_id, code, text)
    assert p.decode_reply(p.encode_info(job_id, info)) == p.Info(job_id, info)
    assert p.decode_reply(p.encode_unknown(job_id)) == p.Unknown(job_id)
    assert p.decode_reply(p.encode_pong(job_id, info)) == p.Pong(job_id, info)
    assert p.decode_reply(p.encode_invalid(error)) == p.Invalid(
        error.encode("utf-8", "replace").decode())


@settings(max_examples=200, deadline=None, derandomize=True, database=None)
@given(_job_ids, st.integers(1, 10**9), st.booleans(), _payload, _text,
       st.lists(_queues, min_size=1, max_size=5))
def test_worker_messages_round_trip_property(job_id, attempt, ready, payload, error, queues):
    tok = b"%032x" % attempt
    assert p.decode_worker(p.encode_worker_result(job_id, attempt, tok, ready, payload)) == (
        p.WorkerResult(job_id, attempt, tok, ready, payload))
    got = p.decode_worker(p.encode_worker_error(job_id, attempt, tok, ready, error))
    text = error.encode("utf-8", "replace").decode("utf-8", "replace")
    assert got == p.WorkerError(job_id, attempt, tok, ready, text)
    assert p.decode_worker(p.encode_return(job_id, attempt, tok)) == p.Return(job_id, attempt, tok)
    hello = p.decode_worker(p.encode_hello(("q",), {}, job_id, attempt, tok))
    assert hello == p.Hello(("q",), {}, job_id, attempt, tok)
    hello = p.decode_worker(p.encode_hello(queues, {"name": job_id}))
    assert hello == p.Hello(tuple(dict.fromkeys(queues)), {"name": job_id}, None, 0, b"")
    job = p.decode_broker(p.encode_job(job_id.encode(), attempt, attempt / 1000.0, tok,
                                       queues[0].encode(), attempt % 10, attempt, attempt, payload))
    assert job == p.Dispatch(job_id, attempt, attempt / 1000.0, tok, queues[0], attempt % 10,
                             attempt, attempt, payload)
    assert p.decode_broker(p.encode_ack(job_id.encode(), attempt)) == p.Ack(job_id, attempt)
    assert p.decode_broker(p.encode_disconnect(job_id)) == p.Disconnect(job_id)
    welcome = p.decode_broker(p.encode_welcome(job_id, attempt / 1000.0, attempt, attempt))
    assert welcome == p.Welcome(job_id, attempt / 1000.0, attempt, attempt)


def test_as_frames_is_shared_by_payloads_and_results():
    assert p.as_frames(b"a", "x") == [b"a"]
    assert p.as_frames("é", "x") == ["é".encode()]
    assert p.as_frames([b"a", "b", bytearray(b"c")], "x") == [b"a", b"b", b"c"]
    for bad in ([], 5, [b"a", 5], None):
        with pytest.raises(TypeError):
            p.as_frames(bad, "x")


def test_an_rwp1_client_is_refused_not_run_as_a_plain_job():
    # RWP/1 clients sent a delimiter, then their header: that must not become a job.
    frames = [b"", b"RWC1", b"SUBMIT", b"j", b"", b"", b"", b"payload"]
    assert reason_of(p.decode_client, frames) == "unsupported version"
    assert reason_of(p.decode_client, [b"", b"RWC1 PING"]) == "unsupported version"
    assert p.decode_client([b"", b"RWC", b"x"]) == p.Plain([b"RWC", b"x"])  # 3 bytes: a payload


def test_encode_submit_with_no_queue_names_the_default_one():
    assert p.decode_client(p.encode_submit("j", "", None, [b"x"])).queue == p.DEFAULT_QUEUE


# ================================================================================================
# batches: SUBMITS and RESULTS
# ================================================================================================


def test_submits_round_trip_keeps_each_jobs_fields_and_frames():
    singles = [p.encode_submit("a", "default", None, [b"x"]),
               p.encode_submit("b", "gpu", p.Options(2.5, 4), [b"", b"two", b"frames"])]
    frames = p.encode_submits(singles)
    assert frames == [b"RWC3 SUBMITS a default - 1 b gpu timeout=2500,tries=4 3", b"x", b"", b"two",
                      b"frames"]
    assert p.decode_client(frames) == p.SubmitMany([
        p.Submit("a", "default", p.NO_OPTIONS, [b"x"]),
        p.Submit("b", "gpu", p.Options(2.5, 4), [b"", b"two", b"frames"]),
    ])


@pytest.mark.parametrize(
    "frames, why",
    [
        ([b"RWC3 SUBMITS"], "no jobs"),
        ([b"RWC3 SUBMITS a default 0 0", b"x"], "4 words for a job"),
        ([b"RWC3 SUBMITS a default 0 0 1 b", b"x"], "a job cut short"),
        ([b"RWC3 SUBMITS a default 0 0 2", b"x"], "fewer frames than announced"),
        ([b"RWC3 SUBMITS a default 0 0 1", b"x", b"y"], "more frames than announced"),
        ([b"RWC3 SUBMITS a default 0 0 0"], "a job with no payload"),
        ([b"RWC3 SUBMITS a default 0 0 x", b"p"], "a frame count that is not a number"),
        ([b"RWC3 SUBMITS a\x01 default 0 0 1", b"p"], "a bad id"),
        ([b"RWC3 SUBMITS a de/fault 0 0 1", b"p"], "a bad queue"),
        ([b"RWC3 SUBMITS a default -1 0 1", b"p"], "a bad timeout"),
        ([b"RWC3 SUBMITS a default 0 0 1  b default 0 0 1", b"p", b"q"], "a double space"),
    ],
)
def test_malformed_submits_is_rejected_whole(frames, why):
    with pytest.raises(ProtocolError):
        p.decode_client(frames)


def test_submits_carries_at_most_max_batch_jobs():
    one = p.encode_submit("j", "default", None, [b"x"])
    assert len(p.decode_client(p.encode_submits([one] * p.MAX_BATCH)).jobs) == p.MAX_BATCH
    with pytest.raises(ValueError):
        p.encode_submits([one] * (p.MAX_BATCH + 1))
    with pytest.raises(ValueError):
        p.encode_submits([])
    too_many = [b"RWC3 SUBMITS" + b" j default 0 0 1" * (p.MAX_BATCH + 1)] + [b"x"] * (p.MAX_BATCH + 1)
    assert reason_of(p.decode_client, too_many) == "bad SUBMITS"


def test_results_round_trip():
    frames = p.encode_results([(b"a", [b"r"]), (b"b", [b"", b"two"])])
    assert frames == [b"RWC3 RESULTS a 1 b 2", b"r", b"", b"two"]
    reply = p.decode_reply(frames)
    assert reply == p.Results([("a", [b"r"]), ("b", [b"", b"two"])])


@pytest.mark.parametrize(
    "frames",
    [
        [b"RWC3 RESULTS"],
        [b"RWC3 RESULTS a", b"r"],
        [b"RWC3 RESULTS a 2", b"r"],
        [b"RWC3 RESULTS a 1", b"r", b"extra"],
        [b"RWC3 RESULTS a 0"],
        [b"RWC3 RESULTS a\x00 1", b"r"],
    ],
)
def test_malformed_results_is_rejected(frames):
    with pytest.raises(ProtocolError):
        p.decode_reply(frames)
