"""Scale tests, behind ``suite.py --scale N`` (minutes, not part of ``make bench``).

    python benchmarks/suite.py --scale 1000000 [--scale-peers 200]
    python benchmarks/suite.py --scale 100000     # the same, smaller, for development

Each test compares the broker with itself at a different size in the same run, so the
ratios hold on a noisy machine:

a. N jobs (100-byte payloads) submitted with ``Client.submit_many`` to a broker with the
   sqlite journal and no workers: the submit rate (until confirmed) of the first tenth vs
   the last, the broker's RSS per queued job beyond its payload, the journal's bytes per
   job; then 4 raw workers drain the queue: the dispatch rate of the first tenth vs the last.
b. Restart time (process start until the status snapshot says ``running``) with the N
   jobs unfinished in the journal, and again once they are all finished and retained.
c. ``--scale-peers`` workers and as many clients connected at once (sockets spread over a
   few processes) vs 4 workers and 1 client, the same number of jobs in flight: throughput,
   broker CPU per job, and the time to fetch a status snapshot during the load.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import threading
import time
from typing import Any

import zmq

from respworkers.client import fetch_status
from respworkers.errors import BrokerUnavailable

from brokers import rw_broker, rw_settings, start_broker
from harness import (
    ChildFailed,
    Fleet,
    Machine,
    cpu_seconds,
    event,
    loadavg,
    pid_of,
    queue_,
    report_errors,
    rss_bytes,
)
from peers import Plan, raw_client, rww3_worker

PAYLOAD_BYTES = 100
SEGMENTS = 10  # the submit rate is compared between the first and the last of these
DRAIN_WORKERS = 4


# ================================================================================ a, b: a big queue
def _submitter(front: str, n: int, broker_pid: int, ctl: Any, close: Any) -> None:
    report_errors(ctl, _submit_segments, front, n, broker_pid, ctl, close)


def _submit_segments(front: str, n: int, broker_pid: int, ctl: Any, close: Any) -> None:
    """Submit n jobs in SEGMENTS calls of submit_many, each timed until the broker has
    confirmed (journaled) all of it; keep the connection until told to close."""
    from respworkers import Client

    payload = b"p" * PAYLOAD_BYTES
    c = Client(front, request_timeout=120)
    try:
        out = []
        for k in range(SEGMENTS):
            size = n // SEGMENTS + (k < n % SEGMENTS)
            cpu0, t0 = cpu_seconds(broker_pid), time.monotonic()
            ids = c.submit_many([payload] * size)
            sent = time.monotonic()
            c.wait_confirmed(ids)
            t1 = time.monotonic()
            out.append({"jobs": size, "seconds": round(t1 - t0, 3), "send_seconds": round(sent - t0, 3),
                        "jobs_per_s": round(size / (t1 - t0)),
                        "broker_cpu_us_per_job": round((cpu_seconds(broker_pid) - cpu0) / size * 1e6, 1)})
        ctl.put(("submitted", out))
        close.wait()
    finally:
        c.close(timeout=120)
    ctl.put(("closed", None))


def _journal_bytes(path: str) -> dict[str, int]:
    return {suffix or "db": os.path.getsize(path + suffix) for suffix in ("", "-wal", "-shm")
            if os.path.exists(path + suffix)}


def _wait_running(fleet: Fleet, proc: Any, status: str, started: float) -> dict[str, Any]:
    """Poll the status endpoint until the broker says ``running``; time from ``started``."""
    progress = []
    while True:
        if proc.exitcode is not None:
            raise ChildFailed(f"the broker exited with {proc.exitcode} while starting")
        try:
            snap = fetch_status(status, timeout=0.5)
        except BrokerUnavailable:
            time.sleep(0.02)
            continue
        b = snap["broker"]
        elapsed = time.monotonic() - started
        progress.append([round(elapsed, 3), b.get("restored")])
        if b["state"] == "running":
            starting = [p for p in progress if p[1] is not None]
            return {"seconds": round(elapsed, 3), "queued": snap["queued"], "retained": snap["retained"],
                    # the last snapshot while loading: [seconds, rows restored by then]
                    "last_seen_loading": starting[-1] if starting else None,
                    "progress": progress[-20:]}
        time.sleep(0.05)


def _restart(fleet: Fleet, old: Any, settings: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
    """Stop a broker warmly (SIGTERM: it flushes its journal), start a new one on the same
    journal and time it until it serves."""
    stop = fleet.stop(old, timeout=600)
    started = time.monotonic()
    proc = fleet.start(rw_broker, settings, name="rw-sqlite")
    got = _wait_running(fleet, proc, settings["status"], started)
    got["previous_stop_seconds"] = round(stop, 3)
    got["rss_bytes"] = rss_bytes(pid_of(proc))
    return proc, got


def _rate_between(series: list[tuple[float, int, float]], lo: float, hi: float) -> dict[str, float]:
    """Jobs per second and broker CPU per job while ``done`` went from lo to hi (interpolated)."""
    def at(target: float) -> tuple[float, float]:
        for (t0, d0, c0), (t1, d1, c1) in zip(series, series[1:]):
            if d0 <= target <= d1 and d1 > d0:
                f = (target - d0) / (d1 - d0)
                return t0 + f * (t1 - t0), c0 + f * (c1 - c0)
        raise ValueError(f"done never reached {target}")

    (ta, ca), (tb, cb) = at(lo), at(hi)
    return {"jobs_per_s": round((hi - lo) / (tb - ta)),
            "broker_cpu_us_per_job": round((cb - ca) / (hi - lo) * 1e6, 1)}


def queue_restart_drain(n: int) -> dict[str, Any]:
    out: dict[str, Any] = {"jobs": n, "payload_bytes": PAYLOAD_BYTES}
    with Fleet() as fleet:
        journal = os.path.join(fleet.tmp, "journal.sqlite3")
        settings = rw_settings(fleet, journal, max_queued=n + 10_000, max_retained=n + 10_000,
                               retention=7 * 86400.0, log_level="warning")
        started = time.monotonic()
        broker = fleet.start(rw_broker, settings, name="rw-sqlite")
        out["start_empty"] = _wait_running(fleet, broker, settings["status"], started)
        rss0 = rss_bytes(pid_of(broker))

        # a. submit
        ctl, close = queue_(), event()
        fleet.start(_submitter, settings["clients"], n, pid_of(broker), ctl, close)
        print(f"scale: submitting {n:,} jobs ...", file=sys.stderr)
        _, segments = fleet.get(ctl, 3600, "submissions")
        rss1 = rss_bytes(pid_of(broker))
        fetches = []
        for _ in range(10):  # a snapshot of a broker holding n queued jobs
            t = time.monotonic()
            snap = fetch_status(settings["status"], timeout=30)
            fetches.append(time.monotonic() - t)
        close.set()
        fleet.get(ctl, 600, "the client's close")
        first, last = segments[0], segments[-1]
        out["submit"] = {
            "segments": segments,
            "first_jobs_per_s": first["jobs_per_s"], "last_jobs_per_s": last["jobs_per_s"],
            "last_over_first": round(last["jobs_per_s"] / first["jobs_per_s"], 3),
            "first_broker_cpu_us_per_job": first["broker_cpu_us_per_job"],
            "last_broker_cpu_us_per_job": last["broker_cpu_us_per_job"],
            "queued": snap["queued"], "longest_turn_s": snap["broker"]["longest_turn"],
            "status_fetch_ms_median": round(statistics.median(fetches) * 1e3, 2),
            "status_fetch_ms_max": round(max(fetches) * 1e3, 2),
            "snapshot_took_ms": round(snap["broker"]["snapshot_took"] * 1e3, 3),
        }
        files = _journal_bytes(journal)
        out["memory"] = {
            "rss_empty_bytes": rss0, "rss_queued_bytes": rss1,
            "bytes_per_job_beyond_payload": round((rss1 - rss0) / n - PAYLOAD_BYTES, 1),
        }
        out["journal"] = {"files_bytes": files, "bytes_per_job": round(sum(files.values()) / n, 1)}

        # b. restart with n unfinished jobs
        print("scale: restarting with the jobs unfinished ...", file=sys.stderr)
        broker, out["restart_unfinished"] = _restart(fleet, broker, settings)
        out["restart_unfinished"]["rss_bytes_per_job_beyond_payload"] = round(
            (out["restart_unfinished"]["rss_bytes"] - rss0) / n - PAYLOAD_BYTES, 1)

        # a. drain
        print(f"scale: draining with {DRAIN_WORKERS} workers ...", file=sys.stderr)
        workers = [fleet.start(rww3_worker, settings["workers"]) for _ in range(DRAIN_WORKERS)]
        series: list[tuple[float, int, float]] = []
        fetches = []
        t0 = time.monotonic()
        while True:
            t = time.monotonic()
            snap = fetch_status(settings["status"], timeout=30)
            fetches.append(time.monotonic() - t)
            series.append((t - t0, snap["totals"]["done"], cpu_seconds(pid_of(broker))))
            if snap["totals"]["done"] >= n:
                break
            if any(w.exitcode is not None for w in workers) or broker.exitcode is not None:
                raise ChildFailed("a worker died while draining")
            if t - t0 > 7200:
                raise ChildFailed("the drain took over 2 hours")
            time.sleep(0.1)
        start = _rate_between(series, 0.01 * n, 0.11 * n)
        end = _rate_between(series, 0.89 * n, 0.99 * n)
        out["drain"] = {"seconds": round(series[-1][0], 3), "first_tenth": start, "last_tenth": end,
                        "last_over_first": round(end["jobs_per_s"] / start["jobs_per_s"], 3),
                        "status_fetch_ms_median": round(statistics.median(fetches) * 1e3, 2),
                        "longest_turn_s": snap["broker"]["longest_turn"]}
        for w in workers:
            fleet.stop(w)

        # b. restart with n finished jobs retained
        print("scale: restarting with the jobs finished and retained ...", file=sys.stderr)
        broker, out["restart_finished"] = _restart(fleet, broker, settings)
        out["restart_finished"]["rss_bytes_per_retained_job"] = round(
            (out["restart_finished"]["rss_bytes"] - rss0) / n, 1)
        out["journal_after_drain"] = {"files_bytes": _journal_bytes(journal)}
    return out


# ================================================================================ c: many peers
def _split(total: int, parts: int) -> list[int]:
    return [total // parts + (i < total % parts) for i in range(parts)]


def _wait_workers(status: str, count: int, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while True:
        snap = fetch_status(status, timeout=10)
        if len(snap["workers"]) >= count:
            return
        if time.monotonic() > deadline:
            raise ChildFailed(f"only {len(snap['workers'])} of {count} workers registered")
        time.sleep(0.1)


def _fetch_times(status: str, stop: threading.Event, out: list[float]) -> None:
    ctx = zmq.Context()
    try:
        while not stop.is_set():
            t = time.monotonic()
            fetch_status(status, timeout=30, ctx=ctx)
            out.append(time.monotonic() - t)
            stop.wait(0.2)
    finally:
        ctx.term()


def peers_run(workers: int, clients: int, jobs: int, in_flight: int) -> dict[str, Any]:
    """Throughput with ``workers`` raw workers (sockets over 4 processes) and ``clients``
    raw RWC3 clients (sockets over 1 or 2 processes) keeping ``in_flight`` jobs in all."""
    with Fleet() as fleet:
        b = start_broker(fleet, "rw-memory", log_level="warning")
        assert b.status is not None
        for k in _split(workers, min(4, workers)):
            fleet.start(rww3_worker, b.workers, k)
        _wait_workers(b.status, workers)
        ctl, go = queue_(), event()
        procs = 1 if clients == 1 else 2
        for k, share in zip(_split(clients, procs), _split(jobs, procs)):
            plan = Plan("throughput", share, max(1, in_flight // clients), sockets=k, expect_workers=1)
            fleet.start(raw_client, "rwc", b.clients, plan, ctl, go)
        for _ in range(procs):
            fleet.get(ctl, 120, "client warm-up")
        busy: list[float] = []
        stop = threading.Event()
        poller = threading.Thread(target=_fetch_times, args=(b.status, stop, busy), daemon=True)
        cpu0 = cpu_seconds(b.pid)
        go.set()
        poller.start()
        try:
            done = [fleet.get(ctl, 600, "measurement")[1] for _ in range(procs)]
        finally:
            stop.set()
            poller.join(60)
        cpu = cpu_seconds(b.pid) - cpu0
        idle = []
        for _ in range(10):
            t = time.monotonic()
            snap = fetch_status(b.status, timeout=30)
            idle.append(time.monotonic() - t)
        seconds = max(m.ended for m in done) - min(m.started for m in done)
    return {
        "workers": workers, "clients": clients, "in_flight": in_flight, "jobs": jobs,
        "jobs_per_s": round(jobs / seconds), "broker_cpu_us_per_job": round(cpu / jobs * 1e6, 1),
        "status_fetch_ms_under_load": {"median": round(statistics.median(busy) * 1e3, 2) if busy else None,
                                       "max": round(max(busy) * 1e3, 2) if busy else None,
                                       "fetches": len(busy)},
        "status_fetch_ms_idle": {"median": round(statistics.median(idle) * 1e3, 2),
                                 "max": round(max(idle) * 1e3, 2)},
        "snapshot_bytes": len(json.dumps(snap)), "registered_workers": len(snap["workers"]),
        # how long the broker took to make it (the rest of a fetch is waiting for its turn)
        "snapshot_took_ms": round(snap["broker"]["snapshot_took"] * 1e3, 3),
    }


def many_peers(peers: int, jobs: int) -> dict[str, Any]:
    """As many jobs in flight as there are clients: one each, or all on the single client."""
    print(f"scale: {peers} workers and {peers} clients vs 4 and 1 ...", file=sys.stderr)
    in_flight = peers
    small = peers_run(4, 1, jobs, in_flight)
    big = peers_run(peers, peers, jobs, in_flight)
    cpu_ratio = big["broker_cpu_us_per_job"] / small["broker_cpu_us_per_job"]
    return {"small": small, "big": big,
            "throughput_big_over_small": round(big["jobs_per_s"] / small["jobs_per_s"], 3),
            "broker_cpu_big_over_small": round(cpu_ratio, 3)}


# ================================================================================ report
#: What the scale target names, and its aim: (figure, where in the JSON, the aim, higher is
#: better). Every figure is also in the JSON's ``summary``.
TARGETS = (
    ("broker bytes per queued job beyond its payload",
     ("queue", "memory", "bytes_per_job_beyond_payload"), 300, False),
    ("journal bytes per job", ("queue", "journal", "bytes_per_job"), None, False),
    ("submit rate, last tenth / first tenth", ("queue", "submit", "last_over_first"), 0.8, True),
    ("dispatch rate, last tenth / first tenth", ("queue", "drain", "last_over_first"), 0.8, True),
    ("status fetch with the queue full, ms (median)",
     ("queue", "submit", "status_fetch_ms_median"), 50, False),
    ("restart with the jobs unfinished, s", ("queue", "restart_unfinished", "seconds"), 10, False),
    ("restart with the jobs retained, s", ("queue", "restart_finished", "seconds"), 10, False),
    ("throughput, many peers / 4 workers + 1 client", ("peers", "throughput_big_over_small"), 0.8, True),
    ("status fetch with many peers under load, ms (median)",
     ("peers", "big", "status_fetch_ms_under_load", "median"), 50, False),
    ("status fetch with many peers under load, ms (max)",
     ("peers", "big", "status_fetch_ms_under_load", "max"), 50, False),
)


def summary(d: dict[str, Any]) -> list[dict[str, Any]]:
    """The target's figures, each with its aim and whether it is met."""
    out = []
    for name, path, aim, higher in TARGETS:
        value: Any = d
        for key in path:
            value = value[key]
        met = None if aim is None or value is None else (value >= aim if higher else value <= aim)
        out.append({"figure": name, "value": value, "aim": aim,
                    "aim_is": None if aim is None else ("at least" if higher else "at most"),
                    "met": met})
    return out


def _mb(v: float) -> str:
    return f"{v / 1e6:,.1f} MB"


def print_report(d: dict[str, Any]) -> None:
    q = d["queue"]
    n = q["jobs"]
    m = d["machine"]
    print(f"respworkers scale tests, {m['date']}: {m['cores']} cores ({m['cpu']}), Python {m['python']}, "
          f"pyzmq {m['pyzmq']}, libzmq {m['libzmq']}"
          + (f", respworkers @ {m['commit']}" if m["commit"] else "") + f" ({m['respworkers_path']})")
    s = q["submit"]
    print(f"a. {n:,} jobs of {q['payload_bytes']} bytes, submit_many into the sqlite journal, no workers")
    print(f"   submit until confirmed: first tenth {s['first_jobs_per_s']:,} jobs/s (broker "
          f"{s['first_broker_cpu_us_per_job']} us/job), last tenth {s['last_jobs_per_s']:,} jobs/s "
          f"({s['last_broker_cpu_us_per_job']} us/job): last/first x{s['last_over_first']:.2f}; "
          f"longest loop turn {s['longest_turn_s'] * 1e3:.0f} ms")
    print("   per tenth: " + "  ".join(f"{g['jobs_per_s']:,}/s {g['broker_cpu_us_per_job']}us"
                                      for g in s["segments"]))
    mem = q["memory"]
    print(f"   broker RSS {_mb(mem['rss_empty_bytes'])} empty, {_mb(mem['rss_queued_bytes'])} with "
          f"{s['queued']:,} queued: {mem['bytes_per_job_beyond_payload']:,.0f} bytes per job "
          "beyond the payload")
    print(f"   journal {_mb(sum(q['journal']['files_bytes'].values()))}: "
          f"{q['journal']['bytes_per_job']:,.0f} bytes per job")
    print(f"   status fetch with {s['queued']:,} queued: median {s['status_fetch_ms_median']} ms "
          f"(max {s['status_fetch_ms_max']}; the snapshot itself {s['snapshot_took_ms']} ms)")
    dr = q["drain"]
    a, z = dr["first_tenth"], dr["last_tenth"]
    print(f"   drain by {DRAIN_WORKERS} workers in {dr['seconds']:.1f} s: first tenth "
          f"{a['jobs_per_s']:,} jobs/s ({a['broker_cpu_us_per_job']} us/job), last tenth "
          f"{z['jobs_per_s']:,} jobs/s ({z['broker_cpu_us_per_job']} us/job): "
          f"last/first x{dr['last_over_first']:.2f}")
    ru, rf = q["restart_unfinished"], q["restart_finished"]
    def loading(r: dict[str, Any]) -> str:
        seen = r.get("last_seen_loading")
        return f", still loading at {seen[0]:.2f} s ({seen[1]:,} rows)" if seen else ""

    print(f"b. restart with {ru['queued']:,} unfinished jobs: running after {ru['seconds']:.2f} s"
          f"{loading(ru)}; the warm stop before it took {ru['previous_stop_seconds']:.2f} s; RSS "
          f"{ru['rss_bytes_per_job_beyond_payload']:,.0f} bytes per job beyond the payload")
    print(f"   restart with {rf['retained']:,} finished jobs retained: running after {rf['seconds']:.2f} s"
          f"{loading(rf)}; warm stop {rf['previous_stop_seconds']:.2f} s; RSS "
          f"{rf['rss_bytes_per_retained_job']:,.0f} bytes per retained job; empty broker: "
          f"{q['start_empty']['seconds']:.2f} s")
    p = d["peers"]
    sm, bg = p["small"], p["big"]
    print(f"c. {bg['workers']} workers + {bg['clients']} clients: {bg['jobs_per_s']:,} jobs/s, broker "
          f"{bg['broker_cpu_us_per_job']} us/job; 4 workers + 1 client: {sm['jobs_per_s']:,} jobs/s, "
          f"{sm['broker_cpu_us_per_job']} us/job ({bg['in_flight']} in flight, {bg['jobs']:,} jobs each): "
          f"throughput x{p['throughput_big_over_small']:.2f}, "
          f"broker CPU x{p['broker_cpu_big_over_small']:.2f}")
    bl, sl = bg["status_fetch_ms_under_load"], sm["status_fetch_ms_under_load"]
    print(f"   status snapshot ({bg['snapshot_bytes']:,} bytes, made in {bg['snapshot_took_ms']} ms): "
          f"median {bl['median']} ms (max {bl['max']}) "
          f"under load, {bg['status_fetch_ms_idle']['median']} ms idle; with 4 workers "
          f"{sl['median']} ms under load, {sm['status_fetch_ms_idle']['median']} ms idle")
    print("summary:")
    for row in d["summary"]:
        aim = "" if row["aim"] is None else f"  (aim: {row['aim_is']} {row['aim']}: " + (
            "met)" if row["met"] else "NOT met)")
        print(f"   {row['figure']}: {row['value']}{aim}")


def main(n: int, peers: int, json_path: str) -> int:
    from suite import write_json

    machine = Machine.now()
    data: dict[str, Any] = {"suite": "respworkers benchmarks/scale.py", "machine": vars(machine)}
    data["queue"] = queue_restart_drain(n)
    data["peers"] = many_peers(peers, max(20_000, n // 20))
    data["machine"]["loadavg_end"] = loadavg()
    data["summary"] = summary(data)
    write_json(data, json_path)
    print_report(data)
    print(f"\nJSON: {os.path.relpath(json_path)}")
    return 0
