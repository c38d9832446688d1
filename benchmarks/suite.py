"""The respworkers benchmark suite: every load and its references, side by side, in one run.

    python benchmarks/suite.py [--jobs N] [--rounds R] [--only GROUP[/LOAD],...] [--json PATH]
    python benchmarks/suite.py --scale 1000000      # the scale tests instead (scale.py)

These machines are shared and noisy, so every figure is a ratio to a reference measured in
the same run, round by round (the report gives the median over rounds), plus the broker
process's CPU time per job read from /proc, which is far steadier than throughput. Loads
that measure the same thing (e.g. the baseline at 100 in flight) run once per round and
are shown in every group that uses them. Groups (see RESULTS.md for what each answers):

- ``req``: the original load, plain REQ envelope on a DEALER (docs/protocol.md section 6);
  references: the baseline broker and libzmq's C proxy with REP workers;
- ``od-100``, ``od-1000``, ``od-1w``: strict on-demand, one job per message, with 100 or
  1000 jobs in flight and 4 workers, or 100 in flight and 1 worker;
- ``batch``: 100 jobs per SUBMITS, journal on;
- ``latency``: one job at a time (quantiles and a log-bucket histogram);
- ``mixed``: makespan of a workload where every 10th job is long, against the ideal;
- ``prefetch``: prefetching workers (``Worker.prefetch``): real worker processes with the
  REQ envelope (against the C proxy) and on the mixed workload; then raw prefetching
  workers, and SUBMITS batches, to show what limits the first.
"""

from __future__ import annotations

import argparse
import bisect
import json
import math
import os
import statistics
import sys
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

from respworkers.client import fetch_status

from brokers import compiled_build, start_broker
from harness import Fleet, Machine, cpu_seconds, event, loadavg, queue_, sigterm_as_interrupt
from peers import WORKERS, Measured, Plan, raw_client, real_client, sleep_payload

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_JSON = os.path.join(HERE, "results", "latest.json")


# ================================================================================ what is measured
@dataclass(frozen=True)
class Setup:
    """One measurement: a broker, its workers, one client process and what it does.

    ``client``: ``envelope`` (plain REQ envelope, raw DEALER), ``rwc`` (raw RWC3 DEALER) or
    ``client`` (``respworkers.Client``); ``worker`` as in peers.WORKERS.
    """

    broker: str
    worker: str
    client: str
    mode: str = "throughput"  # throughput | latency | makespan
    workers: int = 4
    window: int = 100
    per_message: int = 1
    prefetch: int | None = None


@dataclass(frozen=True)
class Load:
    """A row of the table: a setup, in a group, compared with another row of the same run."""

    group: str
    name: str
    setup: Setup
    ref: str | None = None  # "group/name" of the reference row
    needs: str | None = None  # "prefetch" (respworkers.Worker has it), "compiled" (make compiled)

    @property
    def key(self) -> str:
        return f"{self.group}/{self.name}"


GROUPS = {
    "req": "original REQ-client load: plain REQ envelope, 100 in flight, 4 workers",
    "od-100": "strict on-demand, 1 job per message, 100 in flight, 4 workers",
    "od-1000": "strict on-demand, 1 job per message, 1000 in flight, 4 workers",
    "od-1w": "strict on-demand, 1 job per message, 100 in flight, 1 worker",
    "batch": "100 jobs per SUBMITS, 1000 in flight, 4 workers, journal on",
    "latency": "latency: one job at a time, 4 workers",
    "mixed": "makespan: every 10th job sleeps 200 ms, the rest 1 ms, 4 workers, all at once",
    "prefetch": "prefetching workers: Worker.prefetch = 4 (or 16), 4 workers",
}

PREFETCH = 4  #: jobs a prefetching worker process holds (Worker.prefetch), the running one included


def _loads() -> list[Load]:
    loads: list[Load] = []
    env = Setup("baseline", "dealer", "envelope")
    proxy = Setup("c-proxy", "rep", "envelope")
    loads += [
        Load("req", "baseline", env),
        Load("req", "c-proxy", proxy, "req/baseline"),
        Load("req", "rw-memory", Setup("rw-memory", "rww3", "envelope"), "req/baseline"),
        Load("req", "rw-sqlite", Setup("rw-sqlite", "rww3", "envelope"), "req/baseline"),
    ]
    for group, window, workers in (("od-100", 100, 4), ("od-1000", 1000, 4), ("od-1w", 100, 1)):
        ref = f"{group}/baseline"
        loads += [
            Load(group, "baseline", Setup("baseline", "dealer", "envelope", workers=workers,
                                          window=window)),
            Load(group, "rw-memory", Setup("rw-memory", "rww3", "rwc", workers=workers,
                                           window=window), ref),
            Load(group, "rw-sqlite", Setup("rw-sqlite", "rww3", "rwc", workers=workers,
                                           window=window), ref),
            Load(group, "rw-full", Setup("rw-sqlite", "runner", "client", workers=workers,
                                         window=window), ref),
        ]
        if group != "od-100":  # the compiled broker (make compiled): the same loads
            loads += [
                Load(group, "rw-memory-c", Setup("rw-memory+c", "rww3", "rwc", workers=workers,
                                                 window=window), ref, needs="compiled"),
                Load(group, "rw-sqlite-c", Setup("rw-sqlite+c", "rww3", "rwc", workers=workers,
                                                 window=window), ref, needs="compiled"),
                Load(group, "rw-full-c", Setup("rw-sqlite+c", "runner", "client", workers=workers,
                                               window=window), ref, needs="compiled"),
            ]
    loads += [
        Load("batch", "baseline", Setup("baseline", "dealer", "envelope", window=1000)),
        Load("batch", "rw-batch", Setup("rw-sqlite", "rww3", "rwc", window=1000, per_message=100),
             "batch/baseline"),
        Load("batch", "rw-full-batch", Setup("rw-sqlite", "runner", "client", window=1000,
                                             per_message=100), "batch/baseline"),
        Load("batch", "rw-batch-c", Setup("rw-sqlite+c", "rww3", "rwc", window=1000, per_message=100),
             "batch/baseline", needs="compiled"),
    ]
    def lat(broker: str, worker: str, client: str) -> Setup:
        return Setup(broker, worker, client, mode="latency", window=1)

    def mix(broker: str, worker: str, client: str, prefetch: int | None = None) -> Setup:
        return Setup(broker, worker, client, mode="makespan", window=0, prefetch=prefetch)  # 0: all at once

    loads += [
        Load("latency", "baseline", lat("baseline", "dealer", "envelope")),
        Load("latency", "rw-memory", lat("rw-memory", "rww3", "rwc"), "latency/baseline"),
        Load("latency", "rw-sqlite", lat("rw-sqlite", "rww3", "rwc"), "latency/baseline"),
        Load("latency", "rw-full", lat("rw-sqlite", "runner", "client"), "latency/baseline"),
        Load("latency", "rw-memory-c", lat("rw-memory+c", "rww3", "rwc"), "latency/baseline",
             needs="compiled"),
        Load("latency", "rw-sqlite-c", lat("rw-sqlite+c", "rww3", "rwc"), "latency/baseline",
             needs="compiled"),
    ]
    loads += [
        Load("mixed", "baseline", mix("baseline", "dealer", "envelope")),
        Load("mixed", "c-proxy", mix("c-proxy", "rep", "envelope"), "mixed/baseline"),
        Load("mixed", "rw-memory", mix("rw-memory", "rww3", "rwc"), "mixed/baseline"),
        Load("mixed", "rw-full", mix("rw-sqlite", "runner", "client"), "mixed/baseline"),
    ]
    # Real worker processes whose Worker class sets `prefetch` (and the same on demand),
    # measured against the C proxy (throughput) and on the mixed workload; then raw prefetching
    # workers (the broker's share), and SUBMITS batches instead of the REQ envelope.
    loads += [
        Load("prefetch", "rw-on-demand", Setup("rw-memory", "runner", "envelope"), "req/c-proxy"),
        Load("prefetch", "rw-prefetch", Setup("rw-memory", "runner", "envelope", prefetch=PREFETCH),
             "req/c-proxy", needs="prefetch"),
        Load("prefetch", "rw-prefetch-mixed", mix("rw-memory", "runner", "envelope", PREFETCH),
             "mixed/c-proxy", needs="prefetch"),
        Load("prefetch", "rw-prefetch-16", Setup("rw-memory", "runner", "envelope", prefetch=16),
             "req/c-proxy", needs="prefetch"),
        Load("prefetch", "rw-prefetch-mixed-16", mix("rw-memory", "runner", "envelope", 16),
             "mixed/c-proxy", needs="prefetch"),
        Load("prefetch", "raw-prefetch", Setup("rw-memory", "rww3", "envelope", prefetch=PREFETCH),
             "req/c-proxy", needs="prefetch"),
        Load("prefetch", "rw-prefetch-submits", Setup("rw-memory", "runner", "rwc", window=1000,
                                                      per_message=100, prefetch=PREFETCH),
             "req/c-proxy", needs="prefetch"),
        # the compiled broker (make compiled) with the same workers and client
        Load("prefetch", "rw-prefetch-c", Setup("rw-memory+c", "runner", "envelope",
                                                prefetch=PREFETCH), "req/c-proxy", needs="compiled"),
        Load("prefetch", "rw-prefetch-16-c", Setup("rw-memory+c", "runner", "envelope", prefetch=16),
             "req/c-proxy", needs="compiled"),
        Load("prefetch", "raw-prefetch-c", Setup("rw-memory+c", "rww3", "envelope",
                                                 prefetch=PREFETCH), "req/c-proxy", needs="compiled"),
    ]
    return loads


LOADS = _loads()


def missing_feature(load: Load) -> str | None:
    """Why a load cannot run on this respworkers, or None."""
    if load.needs == "compiled":
        return compiled_build()
    if load.needs == "prefetch":
        from respworkers import Worker

        if not hasattr(Worker, "prefetch"):
            return "respworkers.Worker has no `prefetch` attribute yet"
    return None


# ================================================================================ one measurement
@dataclass
class Sizes:
    jobs: int = 10_000  #: jobs per throughput measurement
    samples: int = 2_000  #: jobs timed one at a time per latency measurement
    mixed_jobs: int = 200
    mixed_every: int = 10  #: every Nth job of the mixed workload is long
    mixed_long: float = 0.200
    mixed_short: float = 0.001

    def mixed_payloads(self) -> list[bytes]:
        return [sleep_payload(self.mixed_long if i % self.mixed_every == 0 else self.mixed_short)
                for i in range(self.mixed_jobs)]

    def ideal_makespan(self, workers: int) -> float:
        """Total work spread evenly over the workers, or the longest job if that is longer."""
        longs = len(range(0, self.mixed_jobs, self.mixed_every))
        total = longs * self.mixed_long + (self.mixed_jobs - longs) * self.mixed_short
        return max(total / workers, self.mixed_long)


def measure(s: Setup, sizes: Sizes, trace: bool = False) -> dict[str, Any]:
    """Start the broker, its workers and the client; return the figures of one run.

    ``trace``: a respworkers broker times its slow steps (brokers.rw_broker), kept with the
    client's timings so that slow jobs can be matched with what the broker was doing.
    """
    if s.mode == "throughput":
        plan = Plan("throughput", sizes.jobs, s.window, s.per_message, expect_workers=s.workers)
    elif s.mode == "latency":
        plan = Plan("latency", sizes.samples, 1, expect_workers=s.workers)
    else:
        payloads = sizes.mixed_payloads()
        plan = Plan("makespan", len(payloads), len(payloads), payloads=payloads,
                    expect_workers=s.workers)
    with Fleet() as fleet:
        broker = start_broker(fleet, s.broker, trace=trace and s.broker.startswith("rw-"))
        plan.status = broker.status
        for _ in range(s.workers):
            if s.worker == "runner":
                fleet.start(WORKERS["runner"], broker.workers, s.prefetch)
            elif s.worker == "rww3" and s.prefetch:
                fleet.start(WORKERS["rww3"], broker.workers, 1, s.prefetch)
            else:
                fleet.start(WORKERS[s.worker], broker.workers)
        ctl, go = queue_(), event()
        if s.client == "client":
            fleet.start(real_client, broker.clients, plan, ctl, go)
        else:
            fleet.start(raw_client, s.client, broker.clients, plan, ctl, go)
        fleet.get(ctl, 60, "client warm-up")
        cpu0 = cpu_seconds(broker.pid)
        go.set()
        _, m = fleet.get(ctl, max(120.0, plan.jobs / 200), "measurement")
        cpu = cpu_seconds(broker.pid) - cpu0
        status = broker_status(broker.status) if broker.status else None
        stalls = None
        if broker.trace:
            fleet.stop(broker.proc, timeout=30)  # it writes the trace as it stops
            with open(broker.trace) as fh:
                stalls = json.load(fh)
    assert isinstance(m, Measured)
    seconds = m.ended - m.started
    out: dict[str, Any] = {
        "jobs": m.jobs, "seconds": round(seconds, 4), "jobs_per_s": m.jobs / seconds,
        "broker_cpu_us_per_job": cpu / m.jobs * 1e6, "client_cpu_us_per_job": m.cpu / m.jobs * 1e6,
    }
    if status is not None:
        out["broker_status"] = status
    if s.mode == "latency":
        out["latencies_ns"] = m.latencies_ns
        out["offsets_ns"] = m.offsets_ns
        if stalls is not None:
            out["tail"] = attribute_tail(m, stalls)
    if s.mode == "makespan":
        ideal = sizes.ideal_makespan(s.workers)
        out.update(makespan_s=seconds, ideal_s=ideal, makespan_ratio=seconds / ideal)
    return out


def broker_status(endpoint: str) -> dict[str, Any]:
    """What the respworkers broker says about the run: whether messages to the client had
    to wait (its socket queue was full), its longest loop turn, and anything malformed."""
    snap = fetch_status(endpoint, timeout=10)
    return {"clients": snap["clients"], "longest_turn_ms": round(snap["broker"]["longest_turn"] * 1e3, 1),
            "bad_messages": snap["bad_messages"], "totals": snap["totals"]}


# ================================================================================ statistics
def quantile(sorted_values: list[int], q: float) -> int:
    """Nearest-rank quantile of sorted values."""
    if not sorted_values:
        return 0
    return sorted_values[min(len(sorted_values) - 1, max(0, math.ceil(q * len(sorted_values)) - 1))]


QUANTILES = {"p50": 0.50, "p90": 0.90, "p99": 0.99, "p999": 0.999, "max": 1.0}
BUCKETS_PER_DECADE = 5


def latency_summary(samples_ns: list[int]) -> dict[str, Any]:
    s = sorted(samples_ns)
    q = {k: round(quantile(s, v) / 1000, 1) for k, v in QUANTILES.items()}  # microseconds
    q["mean"] = round(statistics.fmean(s) / 1000, 1) if s else 0.0
    return {"samples": len(s), "quantiles_us": q, "histogram": histogram(s)}


def histogram(sorted_ns: list[int]) -> list[dict[str, float]]:
    """Counts in log-spaced buckets (5 per decade) of microseconds: [lo, hi)."""
    counts: dict[int, int] = {}
    for v in sorted_ns:
        b = math.floor(math.log10(max(v, 1) / 1000) * BUCKETS_PER_DECADE)
        counts[b] = counts.get(b, 0) + 1
    if not counts:
        return []
    return [{"lo_us": round(10 ** (b / BUCKETS_PER_DECADE), 1),
             "hi_us": round(10 ** ((b + 1) / BUCKETS_PER_DECADE), 1), "count": counts.get(b, 0)}
            for b in range(min(counts), max(counts) + 1)]


def text_histogram(name: str, summary: dict[str, Any], width: int = 40) -> list[str]:
    """A histogram whose bars are log-scaled counts, so a handful of slow jobs still shows."""
    q = summary["quantiles_us"]
    lines = [f"  {name}: {summary['samples']} jobs, p50 {q['p50']:,.0f} us, p90 {q['p90']:,.0f}, "
             f"p99 {q['p99']:,.0f}, p99.9 {q['p999']:,.0f}, max {q['max']:,.0f}"]
    top = max((b["count"] for b in summary["histogram"]), default=1)
    for b in summary["histogram"]:
        bar = "#" * (round(width * math.log10(1 + b["count"]) / math.log10(1 + top)) if b["count"] else 0)
        lines.append(f"    {b['lo_us']:>9,.0f} - {b['hi_us']:>9,.0f} us |{bar:<{width}} {b['count']:>6,}")
    return lines


def slowest(runs: list[dict[str, Any]], k: int = 10) -> list[dict[str, float]]:
    """The k slowest timed jobs: when they were sent (ms from the start of their run) and how
    long they took, to see whether the tail is periodic (timers) or random."""
    out = []
    for r, run in enumerate(runs):
        for lat, off in zip(run.get("latencies_ns", []), run.get("offsets_ns", [])):
            out.append({"round": r + 1, "sent_ms": round(off / 1e6, 2), "latency_us": round(lat / 1e3, 1)})
    return sorted(out, key=lambda d: -d["latency_us"])[:k]


def attribute_tail(m: Measured, stalls: list[list[Any]], top: float = 0.01) -> dict[str, Any]:
    """For the slowest ``top`` of the timed jobs, what the broker was doing meanwhile.

    Each slow job is put down to the longest broker step (journal commit, tick, GC, ...)
    that overlaps its round trip, else to a long loop turn with no slower step named, else
    to nothing the broker did ("outside the broker": the scheduler, the peers, the machine).
    A step that used under half its duration in CPU is marked "waiting" (disk or a core).
    Since overlaps happen by chance too, ``overlap`` gives for each kind of step the share
    of slow jobs and the share of all jobs that overlapped one: only a kind much more
    frequent among slow jobs is a cause.
    """
    lat = m.latencies_ns
    if not lat:
        return {}
    cut = sorted(lat)[max(0, int(len(lat) * (1 - top)) - 1)]
    steps = sorted((t, t + d, what, d, c) for what, t, d, c in stalls)
    starts = [st[0] for st in steps]
    longest = max((st[1] - st[0] for st in steps), default=0)
    causes: dict[str, int] = {}
    seen_all: dict[str, int] = {}
    seen_slow: dict[str, int] = {}
    slow = 0
    for off, d in zip(m.offsets_ns, lat):
        a, b = m.t0_ns + off, m.t0_ns + off + d
        lo = bisect.bisect_left(starts, a - longest)
        hi = bisect.bisect_right(starts, b)
        over = [(dur, what, c) for s0, s1, what, dur, c in steps[lo:hi] if s0 <= b and s1 >= a]
        kinds = {what for _, what, _ in over}
        for k in kinds:
            seen_all[k] = seen_all.get(k, 0) + 1
        if d < cut:
            continue
        slow += 1
        for k in kinds:
            seen_slow[k] = seen_slow.get(k, 0) + 1
        over = [x for x in over if x[1] != "timer wake-up"]
        named = [x for x in over if x[1] != "loop turn"] or over
        if named:
            dur, what, c = max(named)
            cause = what + (" (waiting)" if c < dur / 2 else "")
        else:
            cause = "outside the broker"
        causes[cause] = causes.get(cause, 0) + 1
    summary: dict[str, list[tuple[int, int]]] = {}
    for what, _, d, c in stalls:
        summary.setdefault(what, []).append((d, c))
    return {"slow_jobs": slow, "slower_than_us": round(cut / 1e3, 1), "causes": causes,
            "overlap": {k: {"slow": round(seen_slow.get(k, 0) / max(1, slow), 3),
                            "all": round(v / len(lat), 3)} for k, v in seen_all.items()},
            "broker_steps": {
                k: {"count": len(v), "max_us": round(max(d for d, _ in v) / 1e3, 1),
                    "total_ms": round(sum(d for d, _ in v) / 1e6, 1),
                    "cpu_share": round(sum(c for _, c in v) / max(1, sum(d for d, _ in v)), 2)}
                for k, v in summary.items()}}


def median(values: Iterable[float]) -> float:
    v = list(values)
    return statistics.median(v) if v else math.nan


# ================================================================================ the run
@dataclass
class Report:
    machine: Machine
    sizes: Sizes
    rounds: int
    trace: bool = False
    runs: dict[Setup, list[dict[str, Any]]] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)


def selected(only: str | None) -> list[Load]:
    if not only:
        return LOADS
    wanted = [w.strip() for w in only.split(",") if w.strip()]
    chosen = [ld for ld in LOADS if any(ld.group == w or ld.key == w for w in wanted)]
    if not chosen:
        raise SystemExit(f"--only {only}: no such group or load; groups: {', '.join(GROUPS)}")
    # A row needs its reference in the same run.
    keys = {ld.key for ld in chosen}
    by_key = {ld.key: ld for ld in LOADS}
    todo = list(chosen)
    while todo:
        ld = todo.pop()
        if ld.ref and ld.ref not in keys:
            keys.add(ld.ref)
            todo.append(by_key[ld.ref])
    return [ld for ld in LOADS if ld.key in keys]


def run_suite(loads: list[Load], sizes: Sizes, rounds: int, trace: bool = False,
              verbose: bool = True) -> Report:
    report = Report(Machine.now(), sizes, rounds, trace)
    setups: list[Setup] = []
    for ld in loads:
        why = missing_feature(ld)
        if why:
            report.skipped[ld.key] = why
        elif ld.setup not in setups:
            setups.append(ld.setup)
    for key, why in report.skipped.items():
        print(f"{key}: skipped ({why})", file=sys.stderr)
    names: dict[Setup, str] = {}
    for ld in loads:
        names.setdefault(ld.setup, ld.key)
    for r in range(rounds):
        # Every other round runs backwards, so that a drift of the machine's load does not
        # always favour the same side of a ratio.
        order = setups if r % 2 == 0 else setups[::-1]
        for i, s in enumerate(order):
            started = time.monotonic()
            got = measure(s, sizes, trace=trace and s.mode == "latency")
            report.runs.setdefault(s, []).append(got)
            if verbose:
                extra = (f"  makespan x{got['makespan_ratio']:.2f}" if "makespan_ratio" in got else "")
                print(f"round {r + 1}/{rounds} [{i + 1}/{len(order)}] {names[s]:24s} "
                      f"{got['jobs_per_s']:>9,.0f} jobs/s  broker {got['broker_cpu_us_per_job']:6.1f} "
                      f"us/job{extra}  ({time.monotonic() - started:.1f}s)", file=sys.stderr)
    return report


def summarise(loads: list[Load], report: Report) -> dict[str, Any]:
    """Everything as JSON-ready data: per-round figures, medians and ratios per load."""
    rows: list[dict[str, Any]] = []
    by_key = {ld.key: ld for ld in loads}
    for ld in loads:
        row: dict[str, Any] = {"group": ld.group, "load": ld.name, "ref": ld.ref, "setup": asdict(ld.setup)}
        if ld.key in report.skipped:
            row["skipped"] = report.skipped[ld.key]
            rows.append(row)
            continue
        runs = report.runs[ld.setup]
        row["rounds"] = [{k: (round(v, 4) if isinstance(v, float) else v) for k, v in run.items()
                          if k not in ("latencies_ns", "offsets_ns")} for run in runs]
        for k in ("jobs_per_s", "broker_cpu_us_per_job", "client_cpu_us_per_job", "makespan_ratio"):
            if k in runs[0]:
                row[k] = round(median(run[k] for run in runs), 3)
        ref = by_key.get(ld.ref) if ld.ref else None
        if ref is not None and ref.key not in report.skipped:
            ref_runs = report.runs[ref.setup]
            # Ratios round by round (same machine state), then their median.
            row["ratio_jobs_per_s"] = round(median(
                a["jobs_per_s"] / b["jobs_per_s"] for a, b in zip(runs, ref_runs)), 3)
            row["ratio_broker_cpu"] = round(median(
                a["broker_cpu_us_per_job"] / b["broker_cpu_us_per_job"] for a, b in zip(runs, ref_runs)), 3)
            if "makespan_ratio" in runs[0]:
                row["ratio_makespan"] = round(median(
                    a["makespan_s"] / b["makespan_s"] for a, b in zip(runs, ref_runs)), 3)
        if "latencies_ns" in runs[0]:
            pooled = [v for run in runs for v in run["latencies_ns"]]
            row["latency"] = latency_summary(pooled)
            row["latency"]["per_round_us"] = [latency_summary(run["latencies_ns"])["quantiles_us"]
                                              for run in runs]
            row["latency"]["slowest"] = slowest(runs)
            tails = [run["tail"] for run in runs if run.get("tail")]
            if tails:
                causes: dict[str, int] = {}
                for t in tails:
                    for k, v in t["causes"].items():
                        causes[k] = causes.get(k, 0) + v
                row["latency"]["tail_causes"] = dict(sorted(causes.items(), key=lambda kv: -kv[1]))
                row["latency"]["timer_wakeups_per_job"] = round(median(
                    t["broker_steps"].get("timer wake-up", {}).get("count", 0) / run["jobs"]
                    for t, run in zip(tails, runs)), 2)
                kinds = {k for t in tails for k in t["overlap"]}
                row["latency"]["tail_overlap"] = {
                    k: {w: round(median(t["overlap"].get(k, {}).get(w, 0.0) for t in tails), 3)
                        for w in ("slow", "all")} for k in sorted(kinds)}
            if ref is not None and ref.key not in report.skipped:
                ref_q = latency_summary([v for run in report.runs[ref.setup]
                                         for v in run["latencies_ns"]])["quantiles_us"]
                row["latency"]["ratio_to_ref"] = {
                    k: round(row["latency"]["quantiles_us"][k] / ref_q[k], 3) if ref_q[k] else None
                    for k in ("p50", "p90", "p99", "max")}
        rows.append(row)
    return {
        "suite": "respworkers benchmarks/suite.py",
        "machine": asdict(report.machine) | {"loadavg_end": loadavg()},
        "sizes": asdict(report.sizes),
        "rounds": report.rounds,
        "traced": report.trace,
        "groups": {g: t for g, t in GROUPS.items() if any(r["group"] == g for r in rows)},
        "loads": rows,
    }


def with_targets(data: dict[str, Any]) -> dict[str, Any]:
    data["targets"] = targets(data)
    return data


# ================================================================================ targets
#: The speed targets: (group, load, figure, goal, at most?). Figures: ``jobs`` (throughput
#: ratio to the reference), ``cpu`` (broker CPU per job, ratio), ``p50``/``p99`` (latency
#: ratio), ``makespan`` (makespan / ideal).
TARGETS: list[tuple[str, str, str, float, bool]] = [
    *[(g, load, "jobs", goal, False) for g in ("od-100", "od-1000", "od-1w")
      for load, goal in (("rw-memory", 1.3), ("rw-sqlite", 1.1), ("rw-full", 1.0))],
    *[(g, load, "cpu", goal, True) for g in ("od-100", "od-1000", "od-1w")
      for load, goal in (("rw-memory", 0.7), ("rw-sqlite", 0.9))],
    ("batch", "rw-batch", "jobs", 2.0, False),
    *[("latency", load, q, goal, True) for load in ("rw-memory", "rw-sqlite")
      for q, goal in (("p50", 1.0), ("p99", 1.5))],
    ("prefetch", "rw-prefetch", "jobs", 0.4, False),
    ("prefetch", "rw-prefetch-mixed", "makespan", 1.1, True),
]


def _figure(row: dict[str, Any] | None, what: str) -> float | None:
    if row is None or "skipped" in row:
        return None
    if what == "jobs":
        return row.get("ratio_jobs_per_s")
    if what == "cpu":
        return row.get("ratio_broker_cpu")
    if what == "makespan":
        return row.get("makespan_ratio")
    return row.get("latency", {}).get("ratio_to_ref", {}).get(what)


def targets(data: dict[str, Any]) -> list[dict[str, Any]]:
    """Each target with the pure broker's figure and the compiled one's (the ``-c`` row of
    the same load, when the run has it); met if either meets the goal."""
    rows = {(r["group"], r["load"]): r for r in data["loads"]}
    out = []
    for group, load, what, goal, at_most in TARGETS:
        if (group, load) not in rows:
            continue
        pure = _figure(rows.get((group, load)), what)
        comp = _figure(rows.get((group, f"{load}-c")), what)
        got = [v for v in (pure, comp) if v is not None]
        met = any(v <= goal if at_most else v >= goal for v in got) if got else None
        ref = rows[(group, load)].get("ref") or "ideal"
        out.append({"group": group, "load": load, "figure": what, "goal": goal,
                    "at_most": at_most, "pure": pure, "compiled": comp, "met": met, "ref": ref})
    return out


_FIGURES = {"jobs": "jobs/s", "cpu": "broker CPU/job", "p50": "latency p50",
            "p99": "latency p99", "makespan": "makespan"}


def _target_name(t: dict[str, Any]) -> str:
    return f"{t['group']}/{t['load']} {_FIGURES[t['figure']]} / {t['ref'].split('/')[-1]}"


def targets_table(rows: list[dict[str, Any]]) -> list[str]:
    head = f"{'target':44s} {'goal':>8s} {'pure':>7s} {'compiled':>9s}  met"
    lines = [head, "-" * len(head)]
    for t in rows:
        what = _target_name(t)
        goal = f"{'<=' if t['at_most'] else '>='} {t['goal']:.2f}"
        met = {True: "yes", False: "no", None: "-"}[t["met"]]
        lines.append(f"{what:44s} {goal:>8s} {_fmt(t['pure'], '7.2f'):>7s} "
                     f"{_fmt(t['compiled'], '9.2f'):>9s}  {met}")
    return lines


def _fmt(v: float | None, spec: str) -> str:
    return "" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)


def table(data: dict[str, Any]) -> list[str]:
    """The one table: every row with its reference's ratio, in group order."""
    head = (f"{'load':22s} {'jobs/s':>8s} {'x ref':>6s} {'broker us/job':>13s} {'x ref':>6s} "
            f"{'p50 us':>8s} {'p90':>7s} {'p99':>7s} {'max':>8s} {'makespan/ideal':>14s}  ref")
    lines = [head, "-" * len(head)]
    for g, title in data["groups"].items():
        lines.append(f"[{g}] {title}")
        for row in (r for r in data["loads"] if r["group"] == g):
            if "skipped" in row:
                lines.append(f"  {row['load']:20s} skipped: {row['skipped']}")
                continue
            q = row.get("latency", {}).get("quantiles_us", {})
            lines.append(
                f"  {row['load']:20s} {row['jobs_per_s']:>8,.0f} "
                f"{_fmt(row.get('ratio_jobs_per_s'), '6.2f'):>6s} "
                f"{row['broker_cpu_us_per_job']:>13.1f} {_fmt(row.get('ratio_broker_cpu'), '6.2f'):>6s} "
                f"{_fmt(q.get('p50'), ',.0f'):>8s} {_fmt(q.get('p90'), ',.0f'):>7s} "
                f"{_fmt(q.get('p99'), ',.0f'):>7s} {_fmt(q.get('max'), ',.0f'):>8s} "
                f"{_fmt(row.get('makespan_ratio'), '14.2f'):>14s}  {row['ref'] or ''}")
    return lines


def print_report(data: dict[str, Any]) -> None:
    m = data["machine"]
    print(f"respworkers benchmark suite, {m['date']}: {m['cores']} cores ({m['cpu']}), Python "
          f"{m['python']}, pyzmq {m['pyzmq']}, libzmq {m['libzmq']}, respworkers {m['respworkers']}"
          + (f" @ {m['commit']}" if m["commit"] else "") + f" ({m['respworkers_path']})")
    s = data["sizes"]
    print(f"{s['jobs']:,} jobs per throughput run, {s['samples']:,} timed jobs per latency run, "
          f"{s['mixed_jobs']} mixed jobs; median of {data['rounds']} round(s); load average "
          f"{' '.join(map(str, m['loadavg_start']))} at start, {' '.join(map(str, m['loadavg_end']))} at end")
    print("x ref: this row / its reference row in the same round (median over rounds); broker "
          "us/job: CPU of the broker process (all threads) per job")
    print()
    for line in table(data):
        print(line.rstrip())
    if data.get("targets"):
        print()
        print("speed targets (ratios to the reference in the same run; met if the pure or the "
              "compiled broker meets it)")
        for line in targets_table(data["targets"]):
            print(line.rstrip())
    for row in data["loads"]:  # a load that misbehaved would make its figures meaningless
        for r, run in enumerate(row.get("rounds", []), 1):
            st = run.get("broker_status") or {}
            odd = {**st.get("bad_messages", {}), **{k: v for k, v in st.get("totals", {}).items()
                                                    if k in ("failed", "retried", "lost_workers") and v}}
            if odd:
                print(f"WARNING {row['group']}/{row['load']} round {r}: the broker counted {odd}")
    lat = [r for r in data["loads"] if "latency" in r]
    if lat:
        print()
        print("latency histograms (log-spaced buckets; bar length is log-scaled so the tail shows)")
        for row in lat:
            for line in text_histogram(f"{row['group']}/{row['load']}", row["latency"]):
                print(line)
            causes = row["latency"].get("tail_causes")
            if causes:
                total = sum(causes.values())
                print(f"    slowest 1% ({total} jobs), each put down to the longest broker step it "
                      "overlapped: " + ", ".join(f"{k} {v}" for k, v in causes.items()))
                print("    share of the slowest 1% / of all jobs overlapping: " + ", ".join(
                    f"{k} {v['slow']:.0%} / {v['all']:.0%}"
                    for k, v in row["latency"]["tail_overlap"].items()))
                print(f"    the broker woke on its own timer {row['latency']['timer_wakeups_per_job']} "
                      "times per job")


def markdown(data: dict[str, Any]) -> str:
    """The README's table: the machine, every load's ratios, and the targets."""
    m = data["machine"]
    out = [f"Measured {m['date'][:10]} on {m['cores']} cores ({m['cpu']}), Python {m['python']}, "
           f"libzmq {m['libzmq']}, respworkers {m['respworkers']}"
           + (f" @ {m['commit']}" if m.get("commit") else "")
           + f"; median of {data['rounds']} rounds; load average "
           f"{' '.join(map(str, m['loadavg_start']))} at the start. Rerun: `make bench`.", "",
           "| load | jobs/s | × ref | broker µs/job | × ref | p50 µs | p99 µs | makespan / ideal "
           "| reference |",
           "|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for row in data["loads"]:
        if "skipped" in row:
            continue
        q = row.get("latency", {}).get("quantiles_us", {})
        out.append(
            f"| {row['group']}/{row['load']} | {row['jobs_per_s']:,.0f} | "
            f"{_fmt(row.get('ratio_jobs_per_s'), '.2f')} | {row['broker_cpu_us_per_job']:.1f} | "
            f"{_fmt(row.get('ratio_broker_cpu'), '.2f')} | {_fmt(q.get('p50'), ',.0f')} | "
            f"{_fmt(q.get('p99'), ',.0f')} | {_fmt(row.get('makespan_ratio'), '.2f')} | "
            f"{row['ref'] or ''} |")
    if data.get("targets"):
        out += ["", "| target | goal | pure | compiled | met |", "|---|---:|---:|---:|---|"]
        for t in data["targets"]:
            out.append(f"| {_target_name(t)} | {'≤' if t['at_most'] else '≥'} {t['goal']:.2f} | "
                       f"{_fmt(t['pure'], '.2f')} | {_fmt(t['compiled'], '.2f')} | "
                       f"{ {True: 'yes', False: 'no', None: '-'}[t['met']]} |")
    return "\n".join(out) + "\n"


def write_json(data: dict[str, Any], path: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as fh:
        json.dump(data, fh, indent=1)
        fh.write("\n")
    os.replace(tmp, path)


# ================================================================================ command line
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="groups:\n" + "\n".join(f"  {g:9s} {t}" for g, t in GROUPS.items()))
    ap.add_argument("--jobs", type=int, default=Sizes.jobs, help="jobs per throughput run")
    ap.add_argument("--samples", type=int, default=Sizes.samples, help="timed jobs per latency run")
    ap.add_argument("--mixed-jobs", type=int, default=Sizes.mixed_jobs)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--only", help="comma-separated groups or group/load (references are added)")
    ap.add_argument("--trace", action="store_true",
                    help="latency runs: time the respworkers broker's slow steps and match them "
                    "with the slowest 1%% of jobs (costs the broker a few us per loop turn)")
    ap.add_argument("--json", default=None, help=f"where to write the JSON (default {DEFAULT_JSON}; "
                    "with --scale, results/scale-latest.json)")
    ap.add_argument("--scale", type=int, metavar="N", default=0,
                    help="run the scale tests with N queued jobs instead of the suite (scale.py)")
    ap.add_argument("--scale-peers", type=int, default=200,
                    help="with --scale: workers and clients connected at once")
    ap.add_argument("--render", metavar="JSON",
                    help="print the report of an earlier run's JSON, then its Markdown table")
    args = ap.parse_args(argv)
    if args.render:
        with open(args.render) as fh:
            data = with_targets(json.load(fh))
        print_report(data)
        print()
        print(markdown(data), end="")
        return 0
    with sigterm_as_interrupt():
        try:
            if args.scale:
                import scale

                return scale.main(args.scale, args.scale_peers,
                                  args.json or os.path.join(HERE, "results", "scale-latest.json"))
            loads = selected(args.only)
            sizes = Sizes(jobs=args.jobs, samples=args.samples, mixed_jobs=args.mixed_jobs)
            report = run_suite(loads, sizes, args.rounds, args.trace)
            data = with_targets(summarise(loads, report))
            path = args.json or DEFAULT_JSON
            write_json(data, path)
            if not args.json:  # and a dated copy, so that earlier runs stay at hand
                stamp = data["machine"]["date"][:19].replace(":", "").replace("-", "")
                write_json(data, os.path.join(os.path.dirname(path), f"suite-{stamp}.json"))
            print_report(data)
            print(f"\nJSON: {os.path.relpath(path)}")
            return 0
        except KeyboardInterrupt:
            print("interrupted: every process started was stopped", file=sys.stderr)
            return 130


if __name__ == "__main__":
    sys.exit(main())
