"""Prometheus metrics of the broker (``[broker] metrics = "HOST:PORT"``, README: Metrics).

The broker's state belongs to its loop thread, and a scrape must never delay dispatch. So
the work is split three ways:

- :class:`Recorder`: the loop records per-job observations (queue wait, run time, ends,
  journal commits) into plain lists, O(1) each. With metrics off the core holds ``None``
  instead and pays one ``is not None`` per job.
- :meth:`Exporter.publish`: at most every :data:`PUBLISH_EVERY` seconds the loop builds an
  immutable :class:`Snapshot` of gauges, counters and histograms, O(queues + workers)
  (no job is looked at), and swaps it in with one reference assignment.
- The HTTP server runs in a thread of its own and renders only the latest snapshot.

``prometheus_client`` is an optional extra (``pip install respworkers[metrics]``); nothing
imports it unless the key is set.
"""

from __future__ import annotations

import logging
import socket
import threading
from bisect import bisect_left
from collections.abc import Iterator
from dataclasses import dataclass, field
from types import ModuleType
from typing import TYPE_CHECKING, Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from .. import __version__
from ..errors import ConfigError, RespWorkersError
from ..security import is_loopback
from .model import DONE, EXPIRED, FAILED, RUNNING, JobState

if TYPE_CHECKING:
    from .core import BrokerCore

log = logging.getLogger(__name__)

#: Seconds between two snapshots the scrapes read (the loop publishes no more often).
PUBLISH_EVERY = 0.5
#: Queue names that get series of their own; jobs of further queues count under OTHER_QUEUE,
#: so a client inventing queue names cannot grow the broker's memory or Prometheus's series.
MAX_QUEUE_LABELS = 500
OTHER_QUEUE = "_other"
#: Histogram bounds, seconds: from a job picked up at once to one that waited an hour.
TIME_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
                30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0)
COMMIT_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
                  0.5, 1.0, 2.5)
ROWS_BUCKETS = (1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1000.0, 2000.0, 5000.0,
                10000.0)
INSTALL_HINT = "pip install respworkers[metrics]"


class MetricsUnavailable(ConfigError):
    """``[broker] metrics`` is set but prometheus_client cannot be imported."""


def load_prometheus() -> ModuleType:
    """prometheus_client, or a ConfigError (exit 2) that says how to install it."""
    try:
        import prometheus_client
    except ImportError as exc:
        raise MetricsUnavailable(
            f"[broker] metrics needs the prometheus_client package ({exc}); install it with: "
            f"{INSTALL_HINT}") from None
    return prometheus_client


class Histogram:
    """Bucket counts (not cumulative) and a sum, written by the loop thread only."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last one is +Inf
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1  # value <= bound: Prometheus's le
        self.sum += value

    def frozen(self) -> tuple[tuple[int, ...], float]:
        return tuple(self.counts), self.sum


class QueueRecord:
    """One queue's observations: queue waits, run times and how its jobs ended."""

    __slots__ = ("wait", "run", "done", "failed", "cancelled", "expired")

    def __init__(self) -> None:
        self.wait = Histogram(TIME_BUCKETS)
        self.run = Histogram(TIME_BUCKETS)
        self.done = self.failed = self.cancelled = self.expired = 0

    def ended(self) -> dict[str, int]:
        return {state: n for state in ("done", "failed", "cancelled", "expired")
                if (n := getattr(self, state))}


class Recorder:
    """Per-job observations, each O(1), made on the loop thread and read by it to publish.

    The hot ones are written out inline (one dict lookup, one bisect): they run for every
    job, a few times, and method calls are what Python charges for.
    """

    __slots__ = ("queues", "commit_seconds", "commit_rows")

    def __init__(self) -> None:
        self.queues: dict[str, QueueRecord] = {}
        self.commit_seconds = Histogram(COMMIT_BUCKETS)
        self.commit_rows = Histogram(ROWS_BUCKETS)

    def _queue(self, name: str) -> QueueRecord:
        queues = self.queues
        if name not in queues and len(queues) >= MAX_QUEUE_LABELS:
            name = OTHER_QUEUE
        q = queues.get(name)
        if q is None:
            q = queues[name] = QueueRecord()
        return q

    def started(self, queue: str, waited: float) -> None:
        """A job's first attempt began ``waited`` seconds after it was submitted."""
        h = (self.queues.get(queue) or self._queue(queue)).wait
        if waited < 0.0:
            waited = 0.0  # the wall clock stepped back
        h.counts[bisect_left(TIME_BUCKETS, waited)] += 1
        h.sum += waited

    def answered(self, queue: str, seconds: float) -> None:
        """A worker answered an attempt (result or error) after ``seconds``."""
        h = (self.queues.get(queue) or self._queue(queue)).run
        h.counts[bisect_left(TIME_BUCKETS, seconds)] += 1
        h.sum += seconds

    def finished(self, queue: str, state: JobState) -> None:
        q = self.queues.get(queue) or self._queue(queue)
        if state is DONE:  # identity tests: an enum's hash is a Python-level call
            q.done += 1
        elif state is FAILED:
            q.failed += 1
        elif state is EXPIRED:
            q.expired += 1
        else:
            q.cancelled += 1

    def committed(self, seconds: float, rows: int) -> None:
        self.commit_seconds.observe(seconds)
        self.commit_rows.observe(rows)


HistogramData = tuple[tuple[int, ...], float]


@dataclass(frozen=True)
class QueueGauges:
    depth: int = 0
    scheduled: int = 0
    running: int = 0
    workers: int = 0
    idle: int = 0
    paused: bool = False


@dataclass(frozen=True)
class Snapshot:
    """What a scrape shows; never changed once published (the HTTP thread reads it)."""

    state: str = "starting"
    broker_id: str = ""
    uptime: float = 0.0
    queues: dict[str, QueueGauges] = field(default_factory=dict)
    workers: dict[tuple[str, str], int] = field(default_factory=dict)  # (state, host) -> n
    counters: dict[str, int] = field(default_factory=dict)
    bad: dict[tuple[str, str], int] = field(default_factory=dict)  # (socket, reason) -> n
    held: int = 0
    in_flight: int = 0
    retained: int = 0
    journal_failing: bool = False
    queue_wait: dict[str, HistogramData] = field(default_factory=dict)
    run: dict[str, HistogramData] = field(default_factory=dict)
    ended: dict[tuple[str, str], int] = field(default_factory=dict)
    commit_seconds: HistogramData = ((), 0.0)
    commit_rows: HistogramData = ((), 0.0)


def take_snapshot(core: BrokerCore, recorder: Recorder, state: str) -> Snapshot:
    """Gauges and counters as they are now: O(queues + workers), no job is looked at."""
    q_paused = core.queues.paused
    running: dict[str, int] = {}
    workers: dict[tuple[str, str], int] = {}
    for w in core.workers.records.values():
        job = w.job
        if job is not None and job.state is RUNNING and job.worker is w:
            running[job.queue] = running.get(job.queue, 0) + 1
        host = w.info.get("host")
        key = (w.state, str(host)[:80] if host else "unknown")
        workers[key] = workers.get(key, 0) + 1
    queues: dict[str, QueueGauges] = {}
    for name, q in core.queues.by_name.items():
        queues[name] = QueueGauges(q.depth, len(q.scheduled), running.pop(name, 0), q.serving,
                                   len(q.ready), q.paused)
    for name in (recorder.queues.keys() | q_paused | running.keys()) - queues.keys():
        # Known but unused just now: 0 rather than a series that vanishes.
        queues[name] = QueueGauges(running=running.get(name, 0), paused=name in q_paused)
    bad: dict[tuple[str, str], int] = {}
    for what, n in core.stats.bad.items():
        where, _, reason = what.partition(": ")
        bad[(where, reason)] = bad.get((where, reason), 0) + n
    return Snapshot(
        state=state, broker_id=core.broker_id, uptime=core.wall - core.started_wall,
        queues=queues, workers=workers, counters=core.stats.counters.as_dict(), bad=bad,
        held=len(core.queues.held), in_flight=len(core.deadlines), retained=len(core.finished),
        journal_failing=core.commits.problem is not None,
        queue_wait={k: r.wait.frozen() for k, r in recorder.queues.items() if any(r.wait.counts)},
        run={k: r.run.frozen() for k, r in recorder.queues.items() if any(r.run.counts)},
        ended={(k, state): n for k, r in recorder.queues.items() for state, n in r.ended().items()},
        commit_seconds=recorder.commit_seconds.frozen(),
        commit_rows=recorder.commit_rows.frozen(),
    )


#: Counters of stats.Counters, as (metric name without _total, help).
COUNTERS = {
    "submitted": ("respworkers_jobs_submitted", "Jobs accepted (new ids)."),
    "done": ("respworkers_jobs_done", "Jobs that ended with a result."),
    "failed": ("respworkers_jobs_failed", "Jobs that ended failed (tries used up, or Fail)."),
    "cancelled": ("respworkers_jobs_cancelled", "Jobs cancelled by a client."),
    "expired": ("respworkers_jobs_expired", "Jobs not started before their expiry."),
    "retried": ("respworkers_jobs_retried", "Attempts that failed and were retried."),
    "refused": ("respworkers_jobs_refused", "Submissions refused (limits, full, journal down)."),
    "resubmitted": ("respworkers_jobs_resubmitted", "Submissions of an id already held."),
    "requeued": ("respworkers_jobs_requeued", "Ended jobs run again (rw requeue)."),
    "duplicates": ("respworkers_duplicate_answers", "Answers dropped: the job had ended."),
    "late": ("respworkers_late_answers", "Answers of timed-out attempts that were taken."),
    "lost_workers": ("respworkers_workers_lost", "Workers dropped: silent, or died."),
    "abandoned": ("respworkers_attempts_abandoned", "Running attempts told to stop."),
    "drained": ("respworkers_workers_drained", "Workers told to drain (rw drain)."),
}


def _buckets(bounds: tuple[float, ...], data: HistogramData) -> list[tuple[str, float]]:
    counts, _ = data
    out: list[tuple[str, float]] = []
    total = 0
    for bound, n in zip((*map(repr, bounds), "+Inf"), counts):
        total += n
        out.append((bound, total))
    return out


class _Collector:
    """Renders the latest snapshot; runs on the HTTP server's thread."""

    def __init__(self, exporter: Exporter) -> None:
        import prometheus_client.core

        self.exporter = exporter
        self.core = prometheus_client.core

    def describe(self) -> list[Any]:
        return []  # unchecked: the families vary with the queues seen

    def collect(self) -> Iterator[Any]:
        snap = self.exporter.snapshot  # one read: the loop may publish a new one meanwhile
        c = self.core
        info = c.GaugeMetricFamily("respworkers_broker_info", "The broker: 1, with its id and version.",
                                   labels=["broker_id", "version", "state"])
        info.add_metric([snap.broker_id, __version__, snap.state], 1)
        yield info
        yield c.GaugeMetricFamily("respworkers_broker_uptime_seconds",
                                  "Seconds since the broker started.", value=snap.uptime)
        gauges = (
            ("respworkers_queue_depth", "Jobs queued, waiting for a worker.", "depth"),
            ("respworkers_queue_scheduled", "Jobs waiting for their time (delay, eta, backoff).",
             "scheduled"),
            ("respworkers_queue_running", "Jobs running.", "running"),
            ("respworkers_queue_workers", "Workers serving the queue.", "workers"),
            ("respworkers_queue_idle_workers", "Idle workers serving the queue.", "idle"),
            ("respworkers_queue_paused", "1 while the queue is paused (rw pause).", "paused"),
        )
        for name, text, attr in gauges:
            family = c.GaugeMetricFamily(name, text, labels=["queue"])
            for queue, g in sorted(snap.queues.items()):
                family.add_metric([queue], int(getattr(g, attr)))
            yield family
        family = c.GaugeMetricFamily("respworkers_workers", "Registered workers by state and host.",
                                     labels=["state", "host"])
        for (state, host), n in sorted(snap.workers.items()):
            family.add_metric([state, host], n)
        yield family
        for name, text, value in (
            ("respworkers_jobs_held", "Jobs running at the last broker's end, not yet claimed.",
             snap.held),
            ("respworkers_jobs_in_flight", "Attempts running (with a time limit).", snap.in_flight),
            ("respworkers_jobs_retained", "Ended jobs kept with their results.", snap.retained),
            ("respworkers_journal_failing", "1 while the journal cannot be written.",
             int(snap.journal_failing)),
        ):
            yield c.GaugeMetricFamily(name, text, value=value)
        for key, (name, text) in COUNTERS.items():
            yield c.CounterMetricFamily(name, text, value=snap.counters.get(key, 0))
        family = c.CounterMetricFamily("respworkers_jobs_ended", "Jobs ended, by queue and state.",
                                       labels=["queue", "state"])
        for (queue, state), n in sorted(snap.ended.items()):
            family.add_metric([queue, state], n)
        yield family
        family = c.CounterMetricFamily("respworkers_bad_messages",
                                       "Malformed or unexpected messages dropped.",
                                       labels=["socket", "reason"])
        for (where, reason), n in sorted(snap.bad.items()):
            family.add_metric([where, reason], n)
        yield family
        for name, text, table in (
            ("respworkers_queue_wait_seconds", "From submission to the first attempt's start.",
             snap.queue_wait),
            ("respworkers_run_seconds", "From an attempt's start to its worker's answer.", snap.run),
        ):
            family = c.HistogramMetricFamily(name, text, labels=["queue"])
            for queue, data in sorted(table.items()):
                family.add_metric([queue], _buckets(TIME_BUCKETS, data), data[1])
            yield family
        for name, text, bounds, data in (
            ("respworkers_journal_commit_seconds", "Time one journal commit took.",
             COMMIT_BUCKETS, snap.commit_seconds),
            ("respworkers_journal_commit_rows", "Rows (job changes) written by one commit.",
             ROWS_BUCKETS, snap.commit_rows),
        ):
            family = c.HistogramMetricFamily(name, text)
            if data[0]:
                family.add_metric([], _buckets(bounds, data), data[1])
            yield family


class _Quiet(WSGIRequestHandler):
    timeout = 10  # a client that connects and sends nothing does not hold the server up for long

    def log_message(self, format: str, *args: Any) -> None:
        pass  # a scrape every few seconds is not news


def _server_class(host: str) -> type[WSGIServer]:
    """One request at a time: rendering a snapshot takes milliseconds."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    return type("MetricsServer", (WSGIServer,), {"address_family": family})


class MetricsBindError(RespWorkersError):
    """The metrics address could not be bound (in use, no such interface, no permission)."""


class Exporter:
    """The recorder the core writes to, the snapshot scrapes read, and the HTTP server."""

    def __init__(self, address: str, prom: ModuleType | None = None) -> None:
        prom = prom or load_prometheus()
        self.address = address
        self.recorder = Recorder()
        self.snapshot = Snapshot()
        self.next_publish = 0.0
        registry = prom.CollectorRegistry(auto_describe=False)
        registry.register(_Collector(self))
        prom.ProcessCollector(registry=registry)  # the broker's CPU, memory, open files
        host, _, port = address.rpartition(":")
        host = host.strip("[]")
        if not is_loopback(f"tcp://{address}"):
            log.warning("serving metrics on %s WITHOUT AUTHENTICATION: anyone who can reach it "
                        "sees queue names, worker hosts and counts", address)
        try:
            self.server = make_server(host, int(port), prom.make_wsgi_app(registry),
                                      _server_class(host), handler_class=_Quiet)
        except OSError as exc:
            raise MetricsBindError(
                f"cannot serve metrics on {address} ([broker] metrics): {exc.strerror or exc}"
            ) from None
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.5},
                                       name="rw-metrics", daemon=True)
        self.thread.start()
        log.info("metrics on http://%s/metrics", address)

    def publish(self, core: BrokerCore, state: str) -> None:
        """A fresh snapshot for the scrapes (loop thread; see the module docstring)."""
        self.next_publish = core.now + PUBLISH_EVERY
        self.snapshot = take_snapshot(core, self.recorder, state)

    def close(self) -> None:
        self.server.shutdown()  # waits for serve_forever to return (at most poll_interval)
        self.server.server_close()
        self.thread.join(5)
